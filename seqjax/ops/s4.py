"""The S4 family: linear time-invariant state-space models (HiPPO, S4, S4D, S5).

A continuous SSM (Gu et al., S4 and LSSL) maps an input u(t) to an output y(t) through a state
x(t):

    x'(t) = A x(t) + B u(t),        y(t) = C x(t) + D u(t)

With a step `dt` it is discretized (zero-order hold or bilinear) to

    x_k = Abar x_{k-1} + Bbar u_k,  y_k = C x_k + D u_k                  (recurrent view)
    y = Kbar * u,  Kbar_l = C Abar^l Bbar                                 (convolution view)

This module holds the init-time constructions (HiPPO matrices and their normal-plus-low-rank
forms, in float64 numpy), the discretizations, the convolution kernels of S4D (diagonal A, a
Vandermonde product) and of S4 (diagonal-plus-low-rank A, by the generating function, a Cauchy
kernel and the Woodbury identity), the FFT convolution, and two ops:

- `s4d`: one single-input single-output diagonal SSM per channel (S4D), with both views;
- `s5`: one multi-input multi-output diagonal SSM (S5), by the scan layer.

Conventions. `A` is the state matrix of `x' = A x + B u` itself, so a stable SSM has
eigenvalues with negative real part (some papers write `x' = -A x + B u`). The diagonal
`Lambda` is complex; the ops require `Re(Lambda) < 0` and `dt > 0` (checked when concrete).
S4D's N complex modes stand for 2N real states in conjugate pairs: its kernel and outputs are
`2 Re(C ...)`. S5 keeps every mode it is given and outputs `Re(C x)`, without the 2.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from seqjax import checks
from seqjax.ops.common import (
    SCAN_OP_IMPLS,
    ScanOpImpl,
    reset,
    scan_tokens,
    scan_tokens_chunked,
)
from seqjax.scan import linear_recurrence
from seqjax.scan.linear_recurrence import DEFAULT_CHUNK_SIZE, accumulation_dtype

HippoMeasure = Literal["legs", "legt", "fout"]
HIPPO_MEASURES: tuple[str, ...] = ("legs", "legt", "fout")
Discretization = Literal["zoh", "bilinear"]
DISCRETIZATIONS: tuple[str, ...] = ("zoh", "bilinear")
S4DImpl = Literal["auto", "reference", "fft", "recurrent"]
S4D_IMPLS: tuple[str, ...] = ("auto", "reference", "fft", "recurrent")

_HIGHEST = lax.Precision.HIGHEST


# ----------------------------------------------------------------------------- HiPPO


def hippo_matrix(measure: HippoMeasure, N: int) -> tuple[np.ndarray, np.ndarray]:
    """The HiPPO state matrices `(A [N, N], B [N])` (float64) of `x' = A x + B u`.

    A is stable: its eigenvalues have negative real part, except for one at 0 in FouT with an
    even N (the unpaired last cosine, see below).

    - `"legs"` (scaled Legendre, S4's initialization):
      `A_nk = -sqrt(2n+1) sqrt(2k+1)` if n > k, `-(n+1)` if n = k, 0 if n < k;
      `B_n = sqrt(2n+1)`.
    - `"legt"` (translated Legendre, the LMU; window length theta = 1, orthonormal basis):
      `A_nk = -sqrt(2n+1) sqrt(2k+1)` if n >= k, `-(-1)^(n-k) sqrt(2n+1) sqrt(2k+1)` if n < k;
      `B_n = sqrt(2n+1)`. (S4's code halves both, i.e. theta = 2.)
    - `"fout"` (translated Fourier, "How to Train Your HiPPO"): the basis is 1, then
      `sqrt(2) cos(2 pi j s)` (odd n = 2j - 1) and `sqrt(2) sin(2 pi j s)` (even n = 2j) on a
      unit window; with `p` the basis at the window's ends (1, sqrt(2) for cosines, 0 for
      sines), `A = R - 2 p p^T` and `B = 2 p`, where `R` rotates each (cos, sin) pair at
      angular frequency 2 pi j (`R[2j, 2j-1] = 2 pi j = -R[2j-1, 2j]`). A cosine whose sine
      partner falls past N (the last one when N is even) is not rotated.
    """
    checks.check_choice("measure", measure, HIPPO_MEASURES)
    checks.check_positive("N", N)
    n = np.arange(N, dtype=np.float64)
    root = np.sqrt(2 * n + 1)
    if measure == "legs":
        A = -np.tril(np.outer(root, root), -1) - np.diag(n + 1)
        return A, root
    if measure == "legt":
        row, col = n[:, None], n[None, :]
        sign = np.where(row >= col, 1.0, (-1.0) ** (row - col))
        return -sign * np.outer(root, root), root
    ends = _fourier_ends(N)
    rotation = np.zeros((N, N))
    cosines = np.arange(1, N - 1, 2)
    frequency = 2 * np.pi * (cosines + 1) / 2
    rotation[cosines + 1, cosines] = frequency
    rotation[cosines, cosines + 1] = -frequency
    return rotation - 2 * np.outer(ends, ends), 2 * ends


def hippo_rank_correction(measure: HippoMeasure, N: int) -> np.ndarray:
    """`P [r, N]` (float64) such that `A + P^T P` is normal (a multiple of I plus a skew matrix).

    `"legs"`: `P_n = sqrt(n + 1/2)`, r = 1 (`A + P^T P = -I/2 + skew`). `"legt"`: r = 2, the
    entries `sqrt(2n+1)` at even n and at odd n (`A + P^T P` is skew). `"fout"`: r = 1,
    `P = sqrt(2) p` (`A + P^T P = R`, skew).
    """
    checks.check_choice("measure", measure, HIPPO_MEASURES)
    checks.check_positive("N", N)
    n = np.arange(N, dtype=np.float64)
    if measure == "legs":
        return np.sqrt(n + 0.5)[None]
    if measure == "legt":
        root = np.sqrt(2 * n + 1)
        even = n % 2 == 0
        return np.stack([np.where(even, root, 0.0), np.where(even, 0.0, root)])
    return np.sqrt(2.0) * _fourier_ends(N)[None]


def _fourier_ends(N: int) -> np.ndarray:
    """The FouT basis at the ends of its window: 1, then sqrt(2) for cosines and 0 for sines."""
    ends = np.zeros(N)
    ends[0] = 1.0
    ends[1::2] = np.sqrt(2.0)
    return ends


class NPLR(NamedTuple):
    """A HiPPO matrix as normal plus low rank, in the eigenbasis of its normal part.

    With `Vf = [V, conj(V)]` (unitary, `[N, N]`), `Lf = [Lambda, conj(Lambda)]` and
    `Pf = [P, conj(P)]` (`[r, N]`), the HiPPO pair is

        A = Vf (diag(Lf) - Pf^T conj(Pf)) Vf^*,        B = Vf [B, conj(B)]

    i.e. `A = V Lambda V^* - P P^*` in the full basis. Only one eigenvalue of each conjugate
    pair is kept (N/2 of them), the convention of S4 and S4D.

    Attributes:
      Lambda: `[N/2]` complex eigenvalues of the normal part, sorted by imaginary part.
      P: `[r, N/2]` the low-rank term in the eigenbasis.
      B: `[N/2]` the input matrix in the eigenbasis.
      V: `[N, N/2]` the eigenvectors (orthonormal columns).
    """

    Lambda: np.ndarray
    P: np.ndarray
    B: np.ndarray
    V: np.ndarray


def nplr(measure: HippoMeasure, N: int) -> NPLR:
    """The normal-plus-low-rank form of `hippo_matrix(measure, N)` (complex128); N even.

    The normal part `S = A + P^T P` is `shift * I + skew`; its eigenvectors come from the
    Hermitian matrix `-i skew`. Zero eigenvalues of the skew part (FouT's constant and
    unpaired cosine) have real eigenvectors, which are paired as `(v1 + i v2) / sqrt(2)`.
    """
    checks.check_choice("measure", measure, HIPPO_MEASURES)
    checks.check_positive("N", N)
    if N % 2:
        raise ValueError(f"N: expected an even state size (conjugate pairs), got {N}")
    A, B = hippo_matrix(measure, N)
    P = hippo_rank_correction(measure, N)
    normal = A + P.T @ P
    shift = np.trace(normal) / N
    skew = normal - shift * np.eye(N)
    frequencies, vectors = np.linalg.eigh(-1j * skew)
    tolerance = 1e-9 * max(1.0, float(np.max(np.abs(frequencies))))
    positive = frequencies > tolerance
    _, singular, right = np.linalg.svd(skew)
    null = right[singular <= tolerance].T
    V = np.concatenate(
        [vectors[:, positive], (null[:, 0::2] + 1j * null[:, 1::2]) / np.sqrt(2.0)], axis=1
    )
    frequencies = np.concatenate([frequencies[positive], np.zeros(null.shape[1] // 2)])
    if V.shape[1] != N // 2:
        raise RuntimeError(f"nplr({measure!r}, {N}): the skew part did not split into pairs")
    order = np.argsort(frequencies, kind="stable")
    V = V[:, order]
    Lambda = shift + 1j * frequencies[order]
    return NPLR(Lambda, P @ V.conj(), V.conj().T @ B, V)


# ----------------------------------------------------------------------------- discretization


def discretize_zoh(Lambda: jax.Array, B: jax.Array, dt: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Zero-order hold of a diagonal SSM (S4D, S5): `Abar = exp(dt Lambda)`,
    `Bbar = (Abar - 1) / Lambda * B`.

    `Lambda`, `B` and `dt` broadcast elementwise (e.g. `[H, N]`, `[H, N]`, `[H, 1]`; or
    `[N, 1]`, `[N, H]`, `[N, 1]` for a multi-input B). `Lambda` must be nonzero.
    """
    Abar = jnp.exp(dt * Lambda)
    return Abar, (Abar - 1) / Lambda * B


def discretize_bilinear(A: jax.Array, B: jax.Array, dt: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Bilinear (Tustin, S4 and LSSL's GBT with alpha = 1/2) discretization:
    `Abar = (I - dt/2 A)^{-1} (I + dt/2 A)`, `Bbar = (I - dt/2 A)^{-1} dt B`.

    `A` is dense when it has one more axis than `B`: `A [..., N, N]`, `B [..., N]`,
    `dt [...]`. Otherwise `A` is a diagonal that broadcasts elementwise with `B` and `dt`, as
    in `discretize_zoh`.
    """
    if A.ndim == B.ndim + 1:
        half_step = dt[..., None, None] / 2
        identity = jnp.eye(A.shape[-1], dtype=A.dtype)
        inverse_side = identity - half_step * A
        Abar = jnp.linalg.solve(inverse_side, identity + half_step * A)
        Bbar = jnp.linalg.solve(inverse_side, (dt[..., None] * B)[..., None])[..., 0]
        return Abar, Bbar
    half_step = dt / 2 * A
    return (1 + half_step) / (1 - half_step), dt / (1 - half_step) * B


# ----------------------------------------------------------------------------- kernels


def s4d_kernel(
    Lambda: jax.Array,
    B: jax.Array,
    C: jax.Array,
    dt: jax.Array,
    length: int,
    discretization: Discretization = "zoh",
) -> jax.Array:
    """The S4D convolution kernel `K [H, L]`: `K_l = 2 Re(sum_n C_n Bbar_n Abar_n^l)`.

    Each of the N complex modes stands for itself and its conjugate (2N real states), hence
    the 2. The powers are a Vandermonde matrix `exp(l log Abar)` `[H, N, L]`, held in memory.

    Args:
      Lambda: `[H, N]` complex, `Re(Lambda) < 0`.
      B, C: `[H, N]` complex (or real).
      dt: `[H]` positive steps.
      length: L, the number of kernel taps.
      discretization: `"zoh"` or `"bilinear"`.

    Returns:
      `K` in float32 (float64 for float64/complex128 inputs).
    """
    dims = checks.Dims()
    _check_s4d_parameters(dims, Lambda, B, C, dt, None)
    checks.check_positive("length", length)
    checks.check_choice("discretization", discretization, DISCRETIZATIONS)
    complex_dtype, real_dtype = _compute_dtypes(Lambda, B, C, dt)
    Abar, Bbar = _s4d_discretize(Lambda, B, dt, discretization, complex_dtype, real_dtype)
    return _s4d_kernel(Abar, Bbar, C.astype(complex_dtype), _powers(Abar, length))


def s4_dplr_kernel(
    Lambda: jax.Array,
    P: jax.Array,
    B: jax.Array,
    C: jax.Array,
    dt: jax.Array,
    length: int,
) -> jax.Array:
    """The S4 convolution kernel `K [H, L]` of a diagonal-plus-low-rank SSM (S4, Algorithm 1).

    The parameters describe, per channel, the 2N-dimensional conjugate-symmetric (hence real)
    system of `NPLR`: modes `Lf = [Lambda, conj(Lambda)]`, `A = diag(Lf) - Q Q^*` with the
    columns of `Q` the rows of `[P, conj(P)]`, `Bf = [B, conj(B)]`, `Cf = [C, conj(C)]`, and

        K_l = Cf Abar^l Bbar          (bilinear discretization; real).

    With `P = 0` this is `s4d_kernel(..., discretization="bilinear")`, the factor 2 coming
    from the conjugate halves. The algorithm:

    1. truncation: `Ct = Cf (I - Abar^L)`, so that the generating function
       `sum_{l<L} K_l z^l = Ct (I - Abar z)^{-1} Bbar` at the L-th roots of unity z
       (`Abar^L` is formed densely, `[H, 2N, 2N]`, by repeated squaring);
    2. bilinear: `(I - Abar z)^{-1} Bbar = M(z)^{-1} dt B` with
       `M(z) = (1 - z) I - c A`, `c = dt/2 (1 + z)` (finite at z = -1);
    3. Woodbury: `M = D + c Q Q^*` with diagonal `D = (1 - z) - c Lf`, so
       `Ct M^{-1} B = k00 - c k01 (I + c k11)^{-1} k10` where the `k` are Cauchy sums
       `sum_n a_n b_n / D_n` over `a in {Ct, conj(Q)}`, `b in {B, Q}`;
    4. the generating function at the `L // 2 + 1` roots `exp(-2 pi i k / L)` is the real
       FFT of K; an inverse real FFT returns K.

    Memory is `[H, L/2 + 1, 2N]` for the Cauchy sums.

    Args:
      Lambda: `[H, N]` complex, `Re(Lambda) < 0`.
      P: `[H, r, N]` complex, the low-rank term.
      B, C: `[H, N]` complex.
      dt: `[H]` positive steps.
      length: L.

    Returns:
      `K` `[H, L]` in float32 (float64 for 64-bit inputs).
    """
    dims = checks.Dims()
    _check_s4d_parameters(dims, Lambda, B, C, dt, None)
    dims.check("P", P, "H R N")
    checks.check_floating("P", P, allow_complex=True)
    checks.check_positive("length", length)
    complex_dtype, real_dtype = _compute_dtypes(Lambda, P, B, C, dt)

    def with_conjugates(x):
        x = x.astype(complex_dtype)
        return jnp.concatenate([x, jnp.conj(x)], axis=-1)

    modes, Q, B, C = (with_conjugates(x) for x in (Lambda, P, B, C))
    dt = dt.astype(real_dtype)
    C = _truncated_output(modes, Q, C, dt, length)

    roots = jnp.exp(-2j * jnp.pi * jnp.arange(length // 2 + 1) / length).astype(complex_dtype)
    spectrum = _dplr_generating_function(modes, Q, B, C, dt, roots)
    return jnp.fft.irfft(spectrum, n=length, axis=-1).astype(real_dtype)


def _dplr_generating_function(modes, Q, B, C, dt, z):
    """`dt C M(z)^{-1} B` at the points `z [K]`, `M = (1 - z) I - c (diag(modes) - Q Q^*)`.

    Woodbury with `M = D + c Q Q^*`: `C M^{-1} B = k00 - c k01 (I + c k11)^{-1} k10`, the `k`
    being Cauchy sums over the modes. Returns `[H, K]`.
    """
    c = dt[:, None] / 2 * (1 + z)  # [H, K]
    diagonal = (1 - z)[None, :, None] - c[..., None] * modes[:, None, :]  # [H, K, 2N]
    left = jnp.concatenate([C[:, None], jnp.conj(Q)], axis=1)  # [H, 1 + r, 2N]
    right = jnp.concatenate([B[:, None], Q], axis=1)
    cauchy = jnp.einsum("han,hbn,hkn->hkab", left, right, 1 / diagonal, precision=_HIGHEST)
    k00, k01 = cauchy[..., 0, 0], cauchy[..., 0, 1:]
    k10, k11 = cauchy[..., 1:, 0], cauchy[..., 1:, 1:]
    capacitance = jnp.eye(Q.shape[1], dtype=Q.dtype) + c[..., None, None] * k11
    correction = jnp.linalg.solve(capacitance, (c[..., None] * k10)[..., None])[..., 0]
    return dt[:, None] * (k00 - jnp.einsum("hkr,hkr->hk", k01, correction))


def _truncated_output(modes, Q, C, dt, length):
    """`C (I - Abar^L)` for the dense `A = diag(modes) - Q Q^*` of `s4_dplr_kernel`."""
    A = jax.vmap(jnp.diag)(modes) - jnp.einsum("hrn,hrm->hnm", Q, jnp.conj(Q))
    Abar, _ = discretize_bilinear(A, jnp.zeros_like(modes), dt)
    Abar_to_length = jnp.linalg.matrix_power(Abar, length)
    return C - jnp.einsum("hn,hnm->hm", C, Abar_to_length, precision=_HIGHEST)


def ssm_convolution(u: jax.Array, kernel: jax.Array, D: jax.Array | None = None) -> jax.Array:
    """Causal convolution `y_t = sum_{l<=t} K_l u_{t-l} + D u_t` by FFT, per channel.

    Args:
      u: `[B, T, H]`.
      kernel: `[H, L]`, L >= T; taps past T are ignored.
      D: `[H]` skip, or None.

    Returns:
      `y [B, T, H]` in the dtype of u; the FFTs (length 2T, so nothing wraps around) run in
      float32, or float64 for float64 inputs.
    """
    dims = checks.Dims()
    dims.check("u", u, "B T H")
    dims.check("kernel", kernel, "H L")
    checks.check_floating("u", u)
    checks.check_floating("kernel", kernel)
    if D is not None:
        dims.check("D", D, "H")
        checks.check_floating("D", D)
    length = u.shape[1]
    if kernel.shape[1] < length:
        raise ValueError(f"kernel: expected length L >= T = {length}, got {kernel.shape[1]}")
    acc = accumulation_dtype(u.dtype, kernel.dtype, *([] if D is None else [D.dtype]))
    u_acc = u.astype(acc)
    size = 2 * length
    u_spectrum = jnp.fft.rfft(u_acc, n=size, axis=1)
    kernel_spectrum = jnp.fft.rfft(kernel[:, :length].astype(acc), n=size, axis=1)
    y = jnp.fft.irfft(u_spectrum * kernel_spectrum.T[None], n=size, axis=1)[:, :length]
    if D is not None:
        y = y + D.astype(acc) * u_acc
    return y.astype(u.dtype)


# ----------------------------------------------------------------------------- S4D


def s4d(
    u: jax.Array,
    Lambda: jax.Array,
    B: jax.Array,
    C: jax.Array,
    dt: jax.Array,
    D: jax.Array | None = None,
    initial_state: jax.Array | None = None,
    *,
    segment_ids: jax.Array | None = None,
    discretization: Discretization = "zoh",
    impl: S4DImpl = "auto",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[jax.Array, jax.Array]:
    """S4D (Gu et al., 2022): one diagonal SSM per channel h, with N complex modes.

        x_k = Abar x_{k-1} + Bbar u_k,      y_k = 2 Re(C x_k) + D u_k

    `x_k: [B, H, N]` complex; each mode stands for a conjugate pair of real states, hence the 2
    (the convolution kernel is `s4d_kernel`).

    Args:
      u: real inputs `[B, T, H]`.
      Lambda: `[H, N]` complex continuous-time eigenvalues, `Re(Lambda) < 0` (checked when
        concrete).
      B, C: `[H, N]` complex input and output vectors.
      dt: `[H]` positive steps (checked when concrete).
      D: `[H]` skip, or None.
      initial_state: `[B, H, N]` complex; None means zeros.
      segment_ids: `[B, T]` ints; the state restarts at every new segment.
      discretization: `"zoh"` (S4D's default) or `"bilinear"`.
      impl: `"reference"` (token loop); `"recurrent"` (the token loop rematerialized by
        chunks of `chunk_size`, so neither pass holds the `[B, T, H, N]` states); `"fft"` (the
        convolution view: `s4d_kernel` then `ssm_convolution`, and the final state as one
        weighted sum `x_T = sum_k Abar^(T-1-k) Bbar u_k`; it holds the powers `[H, N, T]`
        and FFTs of length 2T). The convolution view is only valid
        from a zero state over one unbroken sequence, so `"fft"` with an `initial_state` or
        `segment_ids` runs `"recurrent"` instead. `"auto"` is `"fft"` where it is valid,
        else `"recurrent"`.
      chunk_size: chunk length of the recurrent view.

    Returns:
      `y [B, T, H]` in the dtype of u and the complex64 (complex128 for 64-bit inputs) state
      after each row's last token.
    """
    dims = checks.Dims()
    dims.check("u", u, "B T H")
    checks.check_floating("u", u)
    _check_s4d_parameters(dims, Lambda, B, C, dt, D)
    if initial_state is not None:
        dims.check("initial_state", initial_state, "B H N")
        checks.check_floating("initial_state", initial_state, allow_complex=True)
    checks.check_segment_ids(segment_ids, *u.shape[:2])
    checks.check_choice("discretization", discretization, DISCRETIZATIONS)
    checks.check_choice("impl", impl, S4D_IMPLS)
    checks.check_positive("chunk_size", chunk_size)

    complex_dtype, real_dtype = _compute_dtypes(u, Lambda, B, C, dt)
    Abar, Bbar = _s4d_discretize(Lambda, B, dt, discretization, complex_dtype, real_dtype)
    C = C.astype(complex_dtype)
    u_acc = u.astype(real_dtype)
    h0 = None if initial_state is None else initial_state.astype(complex_dtype)
    convolution_valid = initial_state is None and segment_ids is None
    if impl == "reference":
        y, final = _s4d_reference(u_acc, Abar, Bbar, C, h0, segment_ids)
    elif impl in ("auto", "fft") and convolution_valid:
        y, final = _s4d_convolution(u_acc, Abar, Bbar, C)
    else:
        y, final = _s4d_recurrent(u_acc, Abar, Bbar, C, h0, segment_ids, chunk_size)
    return _with_skip(y, u_acc, D).astype(u.dtype), final


def s4d_step(
    u_t: jax.Array,
    Lambda: jax.Array,
    B: jax.Array,
    C: jax.Array,
    dt: jax.Array,
    D: jax.Array | None = None,
    state: jax.Array | None = None,
    *,
    discretization: Discretization = "zoh",
) -> tuple[jax.Array, jax.Array]:
    """One token of `s4d`: `u_t: [B, H]`, `state: [B, H, N]` or None -> `(y_t, new_state)`."""
    dims = checks.Dims()
    dims.check("u_t", u_t, "B H")
    checks.check_floating("u_t", u_t)
    _check_s4d_parameters(dims, Lambda, B, C, dt, D)
    if state is not None:
        dims.check("state", state, "B H N")
        checks.check_floating("state", state, allow_complex=True)
    checks.check_choice("discretization", discretization, DISCRETIZATIONS)
    complex_dtype, real_dtype = _compute_dtypes(u_t, Lambda, B, C, dt)
    Abar, Bbar = _s4d_discretize(Lambda, B, dt, discretization, complex_dtype, real_dtype)
    u_acc = u_t.astype(real_dtype)
    if state is None:
        state = jnp.zeros((u_t.shape[0], *Abar.shape), complex_dtype)
    state = Abar * state.astype(complex_dtype) + Bbar * u_acc[..., None]
    y = _s4d_readout(state, C.astype(complex_dtype))
    return _with_skip(y, u_acc, D).astype(u_t.dtype), state


def _s4d_discretize(Lambda, B, dt, discretization, complex_dtype, real_dtype):
    """`Abar, Bbar [H, N]`."""
    return _discretize(
        Lambda.astype(complex_dtype),
        B.astype(complex_dtype),
        dt.astype(real_dtype)[:, None],
        discretization,
    )


def _s4d_readout(states: jax.Array, C: jax.Array) -> jax.Array:
    """`2 Re(C x)` for `x: [..., H, N]`."""
    return 2 * jnp.real(jnp.einsum("...hn,hn->...h", states, C, precision=_HIGHEST))


def _s4d_token_step(Abar, Bbar, C):
    """`x_k = Abar x_{k-1} + Bbar u_k` (restarting at segment starts), `y_k = 2 Re(C x_k)`."""

    def step(x, inputs):
        start, u_t = inputs
        x = reset(start, x)
        x = Abar * x + Bbar * u_t[..., None]
        return x, _s4d_readout(x, C)

    return step


def _s4d_reference(u, Abar, Bbar, C, h0, segment_ids):
    if h0 is None:
        h0 = jnp.zeros((u.shape[0], *Abar.shape), Abar.dtype)
    return scan_tokens(_s4d_token_step(Abar, Bbar, C), h0, u, segment_ids)


def _s4d_recurrent(u, Abar, Bbar, C, h0, segment_ids, chunk_size):
    """The token loop rematerialized by chunks: the `[B, T, H, N]` states never exist."""
    if h0 is None:
        h0 = jnp.zeros((u.shape[0], *Abar.shape), Abar.dtype)
    step = _s4d_token_step(Abar, Bbar, C)
    return scan_tokens_chunked(step, h0, u, segment_ids, chunk_size)


def _s4d_convolution(u, Abar, Bbar, C):
    """The convolution view from a zero state; the final state is the reversed kernel sum."""
    powers = _powers(Abar, u.shape[1])  # [H, N, T]
    y = ssm_convolution(u, _s4d_kernel(Abar, Bbar, C, powers))
    final = jnp.einsum(
        "bth,hnt->bhn",
        u.astype(Abar.dtype),
        Bbar[..., None] * powers[..., ::-1],
        precision=_HIGHEST,
    )
    return y, final


def _s4d_kernel(Abar, Bbar, C, powers):
    return 2 * jnp.real(jnp.einsum("hn,hnl->hl", C * Bbar, powers, precision=_HIGHEST))


def _check_s4d_parameters(dims, Lambda, B, C, dt, D):
    dims.check("Lambda", Lambda, "H N")
    dims.check("B", B, "H N")
    dims.check("C", C, "H N")
    dims.check("dt", dt, "H")
    if D is not None:
        dims.check("D", D, "H")
    _check_diagonal_ssm_values(Lambda, B, C, dt, D)


# ----------------------------------------------------------------------------- S5


def s5(
    u: jax.Array,
    Lambda: jax.Array,
    B: jax.Array,
    C: jax.Array,
    dt: jax.Array,
    D: jax.Array | None = None,
    initial_state: jax.Array | None = None,
    *,
    segment_ids: jax.Array | None = None,
    discretization: Discretization = "zoh",
    impl: ScanOpImpl = "auto",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[jax.Array, jax.Array]:
    """S5 (Smith et al., 2023): one multi-input multi-output diagonal SSM over all channels.

        x_k = Abar x_{k-1} + Bbar u_k,      y_k = Re(C x_k) + D u_k

    `x_k: [B, N]` complex (P in the paper); `Abar = exp(dt Lambda)` per mode and
    `Bbar = (Abar - 1) / Lambda B` (zoh). Unlike `s4d`, the real part is taken without a
    factor 2: every mode is kept as given (S5 with conjugate symmetry passes half the modes
    and folds the 2 into C). Packed sequences restart the state at each new segment, which is
    the resettable scan of S5 for in-context RL (the scan layer's `segment_ids`).

    Args:
      u: real inputs `[B, T, Hin]`.
      Lambda: `[N]` complex, `Re(Lambda) < 0` (checked when concrete).
      B: `[N, Hin]` complex input matrix.
      C: `[Hout, N]` complex output matrix.
      dt: `[N]` positive steps, one per mode.
      D: `[Hout]` skip (needs Hout == Hin), or None.
      initial_state: `[B, N]` complex; None means zeros.
      segment_ids: `[B, T]` ints.
      discretization: `"zoh"` (S5's default) or `"bilinear"`.
      impl: `"reference"` (token loop), or one of the scan layer's algorithms:
        `"associative"` (the parallel scan of S5), `"sequential"`, `"chunked"`, `"auto"`.
      chunk_size: chunk length of `"chunked"`.

    Returns:
      `y [B, T, Hout]` in the dtype of u and the complex64 (complex128 for 64-bit inputs)
      state after each row's last token. Gradients come from the scan layer's `custom_vjp`,
      which does not support forward-mode autodiff.
    """
    dims = checks.Dims()
    dims.check("u", u, "B T Hin")
    checks.check_floating("u", u)
    _check_s5_parameters(dims, Lambda, B, C, dt, D)
    if initial_state is not None:
        dims.check("initial_state", initial_state, "B N")
        checks.check_floating("initial_state", initial_state, allow_complex=True)
    checks.check_segment_ids(segment_ids, *u.shape[:2])
    checks.check_choice("discretization", discretization, DISCRETIZATIONS)
    checks.check_choice("impl", impl, SCAN_OP_IMPLS)
    checks.check_positive("chunk_size", chunk_size)

    complex_dtype, real_dtype = _compute_dtypes(u, Lambda, B, C, dt)
    Abar, Bbar = _s5_discretize(Lambda, B, dt, discretization, complex_dtype, real_dtype)
    C = C.astype(complex_dtype)
    u_acc = u.astype(real_dtype)
    h0 = None if initial_state is None else initial_state.astype(complex_dtype)
    if impl == "reference":
        y, final = _s5_reference(u_acc, Abar, Bbar, C, h0, segment_ids)
    else:
        states, final = linear_recurrence(
            Abar,
            _s5_input(u_acc, Bbar),
            h0,
            segment_ids=segment_ids,
            impl=impl,
            chunk_size=chunk_size,
        )
        y = _s5_readout(states, C)
    return _with_skip(y, u_acc, D).astype(u.dtype), final


def s5_step(
    u_t: jax.Array,
    Lambda: jax.Array,
    B: jax.Array,
    C: jax.Array,
    dt: jax.Array,
    D: jax.Array | None = None,
    state: jax.Array | None = None,
    *,
    discretization: Discretization = "zoh",
) -> tuple[jax.Array, jax.Array]:
    """One token of `s5`: `u_t: [B, Hin]`, `state: [B, N]` or None -> `(y_t, new_state)`."""
    dims = checks.Dims()
    dims.check("u_t", u_t, "B Hin")
    checks.check_floating("u_t", u_t)
    _check_s5_parameters(dims, Lambda, B, C, dt, D)
    if state is not None:
        dims.check("state", state, "B N")
        checks.check_floating("state", state, allow_complex=True)
    checks.check_choice("discretization", discretization, DISCRETIZATIONS)
    complex_dtype, real_dtype = _compute_dtypes(u_t, Lambda, B, C, dt)
    Abar, Bbar = _s5_discretize(Lambda, B, dt, discretization, complex_dtype, real_dtype)
    u_acc = u_t.astype(real_dtype)
    if state is None:
        state = jnp.zeros((u_t.shape[0], Abar.shape[0]), complex_dtype)
    state = Abar * state.astype(complex_dtype) + _s5_input(u_acc, Bbar)
    y = _s5_readout(state, C.astype(complex_dtype))
    return _with_skip(y, u_acc, D).astype(u_t.dtype), state


def _s5_discretize(Lambda, B, dt, discretization, complex_dtype, real_dtype):
    """`Abar [N]`, `Bbar [N, Hin]`."""
    Abar, Bbar = _discretize(
        Lambda.astype(complex_dtype)[:, None],
        B.astype(complex_dtype),
        dt.astype(real_dtype)[:, None],
        discretization,
    )
    return Abar[:, 0], Bbar


def _s5_input(u, Bbar):
    """`Bbar u` for `u: [..., Hin]`."""
    return jnp.einsum("...i,ni->...n", u.astype(Bbar.dtype), Bbar, precision=_HIGHEST)


def _s5_readout(states, C):
    """`Re(C x)` for `x: [..., N]`."""
    return jnp.real(jnp.einsum("...n,on->...o", states, C, precision=_HIGHEST))


def _s5_reference(u, Abar, Bbar, C, h0, segment_ids):
    if h0 is None:
        h0 = jnp.zeros((u.shape[0], Abar.shape[0]), Abar.dtype)

    def step(x, inputs):
        start, u_t = inputs
        x = reset(start, x)
        x = Abar * x + _s5_input(u_t, Bbar)
        return x, _s5_readout(x, C)

    return scan_tokens(step, h0, u, segment_ids)


def _check_s5_parameters(dims, Lambda, B, C, dt, D):
    dims.check("Lambda", Lambda, "N")
    dims.check("B", B, "N Hin")
    dims.check("C", C, "Hout N")
    dims.check("dt", dt, "N")
    if D is not None:
        dims.check("D", D, "Hout")
        if dims.sizes["Hout"] != dims.sizes["Hin"]:
            raise ValueError(
                f"D: the skip D * u needs Hout == Hin, got Hout = {dims.sizes['Hout']}, "
                f"Hin = {dims.sizes['Hin']}"
            )
    _check_diagonal_ssm_values(Lambda, B, C, dt, D)


# ----------------------------------------------------------------------------- shared


def _check_diagonal_ssm_values(Lambda, B, C, dt, D):
    checks.check_floating("Lambda", Lambda, allow_complex=True)
    checks.check_floating("B", B, allow_complex=True)
    checks.check_floating("C", C, allow_complex=True)
    checks.check_floating("dt", dt)
    if D is not None:
        checks.check_floating("D", D)
    checks.check_values("Lambda", jnp.real(Lambda) < 0, "Re(Lambda) < 0")
    checks.check_values("dt", dt > 0, "dt > 0")


def _compute_dtypes(*arrays: jax.Array) -> tuple[jnp.dtype, jnp.dtype]:
    """The complex and real accumulation dtypes: complex64 / float32, or 128 / 64 bits."""
    complex_dtype = jnp.promote_types(accumulation_dtype(*(x.dtype for x in arrays)), jnp.complex64)
    return complex_dtype, jnp.finfo(complex_dtype).dtype


def _discretize(Lambda, B, dt, discretization):
    if discretization == "zoh":
        return discretize_zoh(Lambda, B, dt)
    return discretize_bilinear(Lambda, B, dt)


def _powers(Abar: jax.Array, length: int) -> jax.Array:
    """`Abar^l` for l in [0, length), `[..., length]`, as `exp(l log Abar)` (Vandermonde)."""
    exponents = jnp.arange(length, dtype=jnp.finfo(Abar.dtype).dtype)
    return jnp.exp(jnp.log(Abar)[..., None] * exponents)


def _with_skip(y: jax.Array, u: jax.Array, D: jax.Array | None) -> jax.Array:
    return y if D is None else y + D.astype(y.dtype) * u
