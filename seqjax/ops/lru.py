"""LRU: the complex diagonal linear recurrent unit of Orvieto et al. (2023), "Resurrecting RNNs".

With the exponential parameterization of the paper (section 3.3):

    lambda = exp(-exp(nu_log) + i exp(theta_log))          [N] complex, |lambda| < 1
    gamma  = exp(gamma_log)                                 [N], normalization of the input
    h_t = lambda * h_{t-1} + gamma * (B x_t)                B: [N, H] complex
    y_t = Re(C h_t) + D * x_t                               C: [H, N] complex, D: [H]

`gamma_log=None` uses the normalization the paper initializes it to, `sqrt(1 - |lambda|^2)`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from seqjax import checks
from seqjax.ops.common import SCAN_OP_IMPLS, ScanOpImpl, reset, scan_tokens
from seqjax.scan import linear_recurrence
from seqjax.scan.linear_recurrence import DEFAULT_CHUNK_SIZE, accumulation_dtype


def lru(
    x: jax.Array,
    nu_log: jax.Array,
    theta_log: jax.Array,
    B: jax.Array,
    C: jax.Array,
    D: jax.Array | None = None,
    gamma_log: jax.Array | None = None,
    initial_state: jax.Array | None = None,
    *,
    segment_ids: jax.Array | None = None,
    impl: ScanOpImpl = "auto",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[jax.Array, jax.Array]:
    """LRU over `x: [B, T, H]`; returns `(y [B, T, H], final_state [B, N] complex64)`.

    Args:
      x: real inputs `[B, T, H]`.
      nu_log, theta_log: `[N]`, log of the decay rate and of the phase of `lambda`.
      B: complex input matrix `[N, H]`.
      C: complex output matrix `[H, N]`.
      D: real skip `[H]`, or None.
      gamma_log: `[N]` log input normalization, or None for `sqrt(1 - |lambda|^2)`.
      initial_state: complex `[B, N]`; None means zeros.
      segment_ids: `[B, T]` ints; the state restarts at every new segment.
      impl: `"reference"` (token loop), or one of the scan layer's algorithms
        (`"sequential"`, `"associative"`, `"chunked"`, `"auto"`).
      chunk_size: chunk length of `"chunked"`.
    """
    dims = checks.Dims()
    dims.check("x", x, "B T H")
    checks.check_floating("x", x)
    for name, value in (("nu_log", nu_log), ("theta_log", theta_log)):
        dims.check(name, value, "N")
        checks.check_floating(name, value)
    dims.check("B", B, "N H")
    dims.check("C", C, "H N")
    checks.check_floating("B", B, allow_complex=True)
    checks.check_floating("C", C, allow_complex=True)
    if D is not None:
        dims.check("D", D, "H")
        checks.check_floating("D", D)
    if gamma_log is not None:
        dims.check("gamma_log", gamma_log, "N")
        checks.check_floating("gamma_log", gamma_log)
    if initial_state is not None:
        dims.check("initial_state", initial_state, "B N")
    checks.check_segment_ids(segment_ids, *x.shape[:2])
    checks.check_choice("impl", impl, SCAN_OP_IMPLS)
    if impl == "reference":
        return _lru_reference(x, nu_log, theta_log, B, C, D, gamma_log, initial_state, segment_ids)

    lam, gamma = lambda_and_gamma(nu_log, theta_log, gamma_log, x.dtype)
    u = gamma * jnp.einsum("bth,nh->btn", x.astype(lam.dtype), B.astype(lam.dtype))
    h, final = linear_recurrence(
        lam,
        u,
        initial_state,
        segment_ids=segment_ids,
        impl=impl,
        chunk_size=chunk_size,
    )
    return _readout(h, x, C, D), final


def lru_step(
    x_t: jax.Array,
    nu_log: jax.Array,
    theta_log: jax.Array,
    B: jax.Array,
    C: jax.Array,
    D: jax.Array | None,
    gamma_log: jax.Array | None,
    state: jax.Array | None,
) -> tuple[jax.Array, jax.Array]:
    """One token: `x_t: [B, H]`, `state: [B, N]` complex or None -> `(y_t [B, H], new_state)`."""
    lam, gamma = lambda_and_gamma(nu_log, theta_log, gamma_log, x_t.dtype)
    if state is None:
        state = jnp.zeros((x_t.shape[0], lam.shape[0]), lam.dtype)
    state = lam * state + gamma * (x_t.astype(lam.dtype) @ B.astype(lam.dtype).T)
    return _readout(state, x_t, C, D), state


def lambda_and_gamma(
    nu_log: jax.Array, theta_log: jax.Array, gamma_log: jax.Array | None, x_dtype
) -> tuple[jax.Array, jax.Array]:
    """The complex decays `lambda = exp(-exp(nu_log) + i exp(theta_log))` `[N]` and the input
    normalization `gamma` (`sqrt(1 - |lambda|^2)` without `gamma_log`), in the accumulation
    dtype."""
    real = accumulation_dtype(x_dtype, nu_log.dtype, theta_log.dtype)
    lam = jnp.exp(jax.lax.complex(-jnp.exp(nu_log.astype(real)), jnp.exp(theta_log.astype(real))))
    if gamma_log is None:
        gamma = jnp.sqrt(1.0 - jnp.abs(lam) ** 2)
    else:
        gamma = jnp.exp(gamma_log.astype(real))
    return lam, gamma


def _readout(h, x, C, D):
    """`Re(C h) + D x` in the dtype of `x`, for `h: [..., N]`, `x: [..., H]`."""
    y = jnp.real(jnp.einsum("...n,hn->...h", h, C.astype(h.dtype)))
    if D is not None:
        y = y + D.astype(y.dtype) * x.astype(y.dtype)
    return y.astype(x.dtype)


def _lru_reference(x, nu_log, theta_log, B, C, D, gamma_log, initial_state, segment_ids):
    lam, gamma = lambda_and_gamma(nu_log, theta_log, gamma_log, x.dtype)
    B = B.astype(lam.dtype)
    h0 = jnp.zeros((x.shape[0], lam.shape[0]), lam.dtype)
    if initial_state is not None:
        h0 = initial_state.astype(lam.dtype)

    def step(h, inputs):
        start, x_t = inputs
        h = reset(start, h)
        h = lam * h + gamma * (x_t.astype(lam.dtype) @ B.T)
        return h, _readout(h, x_t, C, D)

    return scan_tokens(step, h0, x, segment_ids)
