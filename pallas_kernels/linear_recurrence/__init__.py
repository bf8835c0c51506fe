"""The diagonal linear recurrence `h_t = a_t * h_{t-1} + b_t` as Pallas kernels (hgrn, LRU,
RG-LRU), for `impl="pallas"` of the scan layer `seqjax.scan.linear_recurrence`.

Shapes: `a, b, h: [B, T, D]` (the op flattens trailing feature axes into D and zeroes `a` at
segment starts itself), `h0, h_last: [B, D]` float32. With `reverse`, the recurrence runs from
the end, `h_t = a_t * h_{t+1} + b_t` with `h0` the state after the last token, and `h_last` is
the state at the first token.

Forward. One kernel call: features tiled over a parallel grid axis, time sequential
(`tpu.py`: time blocks of C tokens with the state in VMEM scratch, a log-step scan within each
8-row tile and the state passed from tile to tile; `gpu.py`: one program per batch row and
feature tile, a loop over tokens that loads C tokens per step). Reverse runs by index maps
(TPU) or reversed token indices (GPU), never by flipped copies in HBM.

Backward (derivation, forward direction, tokens t = 1..T, `h_0 = h0`). The loss L sees every
`h_t` directly (cotangent `dh_t`) and `h_T` once more as `h_last` (cotangent `dh_last`); `h_t`
also reaches L through `h_{t+1} = a_{t+1} h_t + b_{t+1}`. So the total derivative
`lam_t = dL/dh_t` obeys the same recurrence run backwards:

    lam_t = a_{t+1} lam_{t+1} + dh_t,      lam_{T+1} = dh_last,  a_{T+1} = 1,

and, since `h_t` depends on `b_t`, `a_t` and (for t = 1) `h0` only through
`h_t = a_t h_{t-1} + b_t`:

    dL/db_t = lam_t,      dL/da_t = lam_t h_{t-1},      dL/dh0 = a_1 lam_1.

The backward pass is therefore one more call of the forward kernel, in the other direction, on
`a` shifted by one token (`a_next_t = a_{t+1}`, 1 at the last token) with `dh` as inputs and
`dh_last` as initial state; its final state is `lam_1`. The products for `da` and `dh0` are
elementwise work in this wrapper. For `reverse` everything mirrors: `a_next_t = a_{t-1}` (1 at
t = 1), `h_{t+1}` in place of `h_{t-1}`, and `dL/dh0 = a_T lam_T`.

Residuals: `a`, `h0` and `h` itself. `h` is an output of the size of `b`, which the caller holds
anyway, so no chunk-boundary states are needed (the other kernel families save those in place
of per-token matrix states, which this diagonal recurrence does not have). `h` is saved in its
output dtype, so with bfloat16 `b` the `h_{t-1}` of `da` is the rounded output. `lam` is
computed and kept in float32.

Like every `custom_vjp`, this supports reverse-mode differentiation only (no `jvp`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels import blocks, common
from pallas_kernels.linear_recurrence import gpu, tpu

SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
_KERNELS = {"tpu": tpu.linear_recurrence, "gpu": gpu.linear_recurrence}


def unsupported(a: jax.Array, b: jax.Array, h0: jax.Array, backend: str) -> str | None:
    """A one-line reason why the kernels do not cover these inputs, or None when they do."""
    if reason := common.unknown_backend(backend):
        return reason
    for name, x in (("a", a), ("b", b)):
        if x.dtype not in SUPPORTED_DTYPES:
            return f"{name}: dtype {x.dtype} is not float32 or bfloat16 (complex, float64)"
    if b.ndim != 3 or b.shape[1] < 1:
        return f"b: expected shape [B, T, D] with T >= 1, got {b.shape}"
    if a.shape != b.shape:
        return f"a: expected the shape of b {b.shape}, got {a.shape}"
    batch, _, dim = b.shape
    if h0.shape != (batch, dim) or h0.dtype != jnp.float32:
        return f"h0: expected float32 [B, D] = {(batch, dim)}, got {h0.dtype} {h0.shape}"
    if blocks.block_sizes(backend, "linear_recurrence", dim, b.dtype) is None:
        return f"no {backend} block sizes for D = {dim}, dtype {b.dtype}"
    if backend == "gpu" and not gpu.offsets_fit_int32(b.shape, b.dtype):
        return f"b: {b.shape} has 2^31 elements or more (D padded): past Triton's int32 offsets"
    return None


def linear_recurrence(
    a: jax.Array,
    b: jax.Array,
    h0: jax.Array,
    *,
    reverse: bool = False,
    backend: str,
    interpret: bool = False,
    chunk_size: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """`(h, h_last)` of `h_t = a_t * h_{t-1} + b_t` over axis 1 (see the module docstring).

    Args:
      a: decays `[B, T, D]`, float32 or bfloat16.
      b: inputs `[B, T, D]`, float32 or bfloat16 (its dtype may differ from `a`'s).
      h0: state before the first token (after the last when `reverse`), `[B, D]` float32.
      reverse: run from the end; `h_last` is then the state at the first token.
      backend: "tpu" (Mosaic) or "gpu" (Triton lowering).
      interpret: run the kernel in Pallas interpret mode (any platform; for tests).
      chunk_size: tokens per time block (TPU) or per loop step (GPU); None takes the block
        table's. Tests pass small values to cross several blocks with short sequences.

    Returns:
      `h [B, T, D]` in `b`'s dtype and `h_last [B, D]` float32. Gradients (reverse mode only)
      flow to `a`, `b` and `h0` in their dtypes.
    """
    reason = unsupported(a, b, h0, backend)
    if reason is not None:
        raise ValueError(reason)
    return _recurrence(a, b, h0, reverse, backend, interpret, chunk_size)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _recurrence(a, b, h0, reverse, backend, interpret, chunk_size):
    return _KERNELS[backend](
        a, b, h0, reverse=reverse, out_dtype=b.dtype, chunk_size=chunk_size, interpret=interpret
    )


def _recurrence_fwd(a, b, h0, reverse, backend, interpret, chunk_size):
    h, h_last = _recurrence(a, b, h0, reverse, backend, interpret, chunk_size)
    return (h, h_last), (a, h, h0)


def _recurrence_bwd(reverse, backend, interpret, chunk_size, residuals, cotangents):
    a, h, h0 = residuals
    dh, dh_last = cotangents
    one = jnp.ones_like(a[:, :1])
    h_outside = h0[:, None, :]
    h = h.astype(jnp.float32)
    if reverse:
        # lam_t = a_{t-1} lam_{t-1} + dh_t, entered at t = 1 from dh_last; h_{t+1} feeds a_t.
        a_next = jnp.concatenate([one, a[:, :-1]], axis=1)
        h_prev = jnp.concatenate([h[:, 1:], h_outside], axis=1)
        a_first = a[:, -1]
    else:
        # lam_t = a_{t+1} lam_{t+1} + dh_t, entered at t = T from dh_last; h_{t-1} feeds a_t.
        a_next = jnp.concatenate([a[:, 1:], one], axis=1)
        h_prev = jnp.concatenate([h_outside, h[:, :-1]], axis=1)
        a_first = a[:, 0]
    lam, lam_first = _KERNELS[backend](
        a_next,
        dh,
        dh_last,
        reverse=not reverse,
        out_dtype=jnp.float32,
        chunk_size=chunk_size,
        interpret=interpret,
    )
    da = (lam * h_prev).astype(a.dtype)
    dh0 = a_first.astype(jnp.float32) * lam_first
    return da, lam.astype(dh.dtype), dh0


_recurrence.defvjp(_recurrence_fwd, _recurrence_bwd)
