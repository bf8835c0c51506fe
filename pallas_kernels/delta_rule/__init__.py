"""The chunked delta rule with the WY / UT transform (DeltaNet, Gated DeltaNet) as Pallas kernels.

For each head, with a `[K, V]` float32 state and the scaled query,

    S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,    o_t = S_t^T (scale q_t)

(`g = 0` is `delta_rule`, `g <= 0` `gated_delta_rule`; any real `beta`). Yang et al.,
"Parallelizing Linear Transformers with the Delta Rule over Sequence Length"; "Gated Delta
Networks"; fla's `chunk_delta_rule` / `chunk_gated_delta_rule`.

**Forward, per chunk** of `C` tokens entered with state `S` (`chunk.py` computes it; `b_t`
is the in-chunk cumulative log-decay, `E_ts = exp(b_t - b_s)` for `s <= t`):

    A_ts = beta_t E_ts k_t . k_s  (s < t, else 0),      T = (I + A)^-1   (matmuls only)
    U = T diag(beta) V,   W = T diag(beta exp(b)) K,    u = U - W S       (the writes)
    o = diag(exp(b)) Q S + (E * Q K^T) u
    S_leaving = gamma S + K~^T u,   gamma = exp(b_C),   K~_s = exp(b_C - b_s) k_s

The chunks run in order inside one kernel (TPU: the sequential last grid axis with the state
in VMEM scratch; GPU: a loop in each program), which stores the state entering every chunk:
those chunk-boundary states and the inputs are all the backward pass keeps.

**Backward, per chunk** (chunks last to first), given `dO` and `dS_leaving`; with
`P = E * Q K^T`, from `o` and `S_leaving`:

    du        = P^T dO + K~ dS_leaving
    dS        = (diag(exp(b)) Q)^T dO + gamma dS_leaving - W^T du      (carried to chunk n-1)
    dq_t      = exp(b_t) S dO_t + sum_{s<=t} E_ts (dO_t . u_s) k_s
    dk_s     += sum_{t>=s} E_ts (dO_t . u_s) q_t + exp(b_C - b_s) dS_leaving u_s

through `u = U - W S` (`dU = du`, `dW = -du S^T`) and the triangular solve (for
`X = T R`: `dR = T^T dX`, `dA = -strict_tril(sum dR X^T)`):

    dR_U = T^T dU,  dR_W = T^T dW,   dA = -strict_tril(dR_U U^T + dR_W W^T)
    dv_t = beta_t dR_U_t
    dbeta_t = dR_U_t . v_t + exp(b_t) dR_W_t . k_t + sum_s dA_ts E_ts k_t . k_s
    dk     += diag(beta exp(b)) dR_W + G K + G^T K,   G_ts = dA_ts beta_t E_ts

and the decays: every factor `exp(b_t - b_s)` passes its term's gradient `x` as `+x` to
`b_t` and `-x` to `b_s` (the terms of `o` through `P` and of `A`), `exp(b_t)` (in `o` and
`W`) to `b_t`, `gamma` and `K~` to `b_C` (and `-` to `b_s` for `K~`). Then
`dg_t = sum_{t' >= t in the chunk} db_t'` (a reverse cumulative sum, in the wrapper), and
`dS` of the first chunk is the initial state's gradient. A gradient summed over value columns
(`dq, dk, dbeta, db`) is summed over value tiles by the wrapper.

Padding: `T` is padded to whole chunks with `k = v = q = 0`, `beta = 0`, `g = 0`, which write
nothing and decay nothing, so the final state and the gradients of the real tokens are those
of the unpadded sequence. Reverse-mode differentiation only (a `jax.custom_vjp`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import blocks, common
from pallas_kernels.delta_rule import gpu, tpu

KERNEL = "delta_rule"
DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
BACKEND_MODULES = {"tpu": tpu, "gpu": gpu}


@dataclasses.dataclass(frozen=True)
class _Config:
    """The static arguments of one kernel call."""

    backend: str
    scale: float
    chunk_size: int
    sizes: blocks.BlockSizes
    interpret: bool

    def kernel_args(self) -> dict:
        return dict(
            scale=self.scale,
            sizes=self.sizes,
            chunk_size=self.chunk_size,
            interpret=self.interpret,
        )


def unsupported(q, k, v, beta, g, h0, backend) -> str | None:
    """Why the kernels cannot run this call (one line), or None when they can."""
    if reason := common.unknown_backend(backend):
        return reason
    arrays = {"q": q, "k": k, "v": v, "beta": beta, "g": g, "h0": h0}
    for name, x in arrays.items():
        if x is not None and jnp.dtype(x.dtype) not in DTYPES:
            return f"{name}: dtype {jnp.dtype(x.dtype).name} (the kernels take float32 or bfloat16)"
    if q.ndim != 4 or k.shape != q.shape or v.ndim != 4 or v.shape[:3] != q.shape[:3]:
        shapes = f"{q.shape}, {k.shape}, {v.shape}"
        return f"q, k, v: expected [B, T, H, K] and [B, T, H, V], got {shapes}"
    batch, length, heads, key_dim = q.shape
    for name, x in (("beta", beta), ("g", g)):
        if x is not None and x.shape != (batch, length, heads):
            return f"{name}: expected [B, T, H] = {(batch, length, heads)}, got {x.shape}"
    if h0 is not None and h0.shape != (batch, heads, key_dim, v.shape[3]):
        return f"h0: expected [B, H, K, V] = {(batch, heads, key_dim, v.shape[3])}, got {h0.shape}"
    if length == 0:
        return "T = 0: nothing to compute"
    if blocks.block_sizes(backend, KERNEL, key_dim, q.dtype) is None:
        return f"key dim K = {key_dim} exceeds the largest row of the {backend} block table"
    return None


def _check_chunk_size(chunk_size: int, backend: str, dtypes) -> None:
    """A power of 2 (the triangular inverse doubles blocks), at least 16 on GPU (Triton's
    smallest dot) and a whole number of sublane tiles on TPU (8, 16 for bfloat16)."""
    if backend == "gpu":
        smallest = gpu.MIN_DOT
    else:
        smallest = 16 if jnp.dtype(jnp.bfloat16) in dtypes else 8
    if chunk_size < smallest or chunk_size & (chunk_size - 1):
        raise ValueError(
            f"chunk_size: expected a power of 2 >= {smallest} on {backend}, got {chunk_size}"
        )


def delta_rule(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    beta: jax.Array,
    g: jax.Array | None,
    h0: jax.Array | None,
    *,
    scale: float,
    backend: str,
    interpret: bool = False,
    chunk_size: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """The delta rule (`g=None`) or the gated delta rule, by the Pallas kernels of `backend`.

    Args:
      q, k: `[B, T, H, K]`; v: `[B, T, H, V]`; float32 or bfloat16.
      beta: `[B, T, H]`, any real; g: None or log-decays `[B, T, H]`, `g <= 0`.
      h0: None (zeros) or the initial state `[B, H, K, V]` (float32).
      scale: multiplies `q`.
      backend: `"tpu"` (Mosaic) or `"gpu"` (Triton).
      interpret: run the kernels in Pallas interpret mode (on CPU).
      chunk_size: tokens per chunk; None takes the block table's.

    Returns:
      `o: [B, T, H, V]` in the dtype of `v` and the final state `[B, H, K, V]` float32.
      Differentiable in reverse mode w.r.t. q, k, v, beta, g and h0 (no `jvp`).

    Raises:
      ValueError: for an input `unsupported` rejects (with its reason) or a bad chunk_size.
    """
    reason = unsupported(q, k, v, beta, g, h0, backend)
    if reason is not None:
        raise ValueError(f"delta_rule kernel: {reason}")
    sizes = blocks.block_sizes(backend, KERNEL, q.shape[3], q.dtype)
    chunk_size = sizes.chunk if chunk_size is None else chunk_size
    _check_chunk_size(chunk_size, backend, {q.dtype, k.dtype, v.dtype})
    batch, length, heads, key_dim = q.shape
    if g is None:
        g = jnp.zeros((batch, length, heads), jnp.float32)
    if h0 is None:
        h0 = jnp.zeros((batch, heads, key_dim, v.shape[3]), jnp.float32)
    config = _Config(backend, float(scale), chunk_size, sizes, interpret)
    return _delta_rule(q, k, v, beta, g, h0, config)


def _chunk_cumsum(g: jax.Array, chunk_size: int, reverse: bool = False) -> jax.Array:
    """Cumulative sum within each chunk of `[B, T, H]` (T a multiple of `chunk_size`)."""
    batch, length, heads = g.shape
    chunks = g.astype(jnp.float32).reshape(batch, length // chunk_size, chunk_size, heads)
    return lax.cumsum(chunks, axis=2, reverse=reverse).reshape(batch, length, heads)


def _pad_time(config: _Config, *xs: jax.Array) -> list[jax.Array]:
    """Each `[B, T, ...]` zero-padded to whole chunks: tokens that change nothing."""
    return [common.pad_axis(x, 1, config.chunk_size) for x in xs]


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _delta_rule(q, k, v, beta, g, h0, config: _Config):
    return _forward(q, k, v, beta, g, h0, config)[0]


def _forward(q, k, v, beta, g, h0, config: _Config):
    length = q.shape[1]
    q, k, v, beta, g = _pad_time(config, q, k, v, beta, g)
    b = _chunk_cumsum(g, config.chunk_size)
    kernels = BACKEND_MODULES[config.backend]
    o, final, states = kernels.forward(q, k, v, beta, b, h0, **config.kernel_args())
    return (o[:, :length], final), states


def _delta_rule_fwd(q, k, v, beta, g, h0, config: _Config):
    out, states = _forward(q, k, v, beta, g, h0, config)
    return out, (q, k, v, beta, g, h0, states)


def _delta_rule_bwd(config: _Config, residuals, cotangents):
    q, k, v, beta, g, h0, states = residuals
    d_o, d_final = cotangents
    length = q.shape[1]
    q_p, k_p, v_p, beta_p, g_p, d_o_p = _pad_time(config, q, k, v, beta, g, d_o)
    b = _chunk_cumsum(g_p, config.chunk_size)
    kernels = BACKEND_MODULES[config.backend]
    dq, dk, dv, d_beta, d_b, d_h0 = kernels.backward(
        q_p, k_p, v_p, beta_p, b, states, d_o_p, d_final, **config.kernel_args()
    )
    # b_t = g_1 + ... + g_t within a chunk, so dg_t = db_t + ... + db_C.
    dg = _chunk_cumsum(d_b, config.chunk_size, reverse=True)
    grads = (dq, dk, dv, d_beta, dg)
    grads = tuple(
        d[:, :length].astype(x.dtype) for d, x in zip(grads, (q, k, v, beta, g), strict=True)
    )
    return (*grads, d_h0.astype(h0.dtype))


_delta_rule.defvjp(_delta_rule_fwd, _delta_rule_bwd)
