"""The flash-attention kernels that ship with JAX, as `softmax_attention(impl="pallas")`.

We use JAX's own Pallas kernels rather than writing our own:

- `"triton"`: `jax.experimental.pallas.ops.gpu.attention.mha` (GPU, Triton lowering), with its
  fused Triton backward;
- `"splash"`: `jax.experimental.pallas.ops.tpu.splash_attention` (TPU, Mosaic), block-sparse
  over its mask, so a sliding window skips the blocks outside it.

What each kernel does (a call outside this matrix falls back, see `softmax_attention`):

| feature              | triton                       | splash                           |
|----------------------|------------------------------|----------------------------------|
| causal / bidirectional | yes / yes                  | yes / yes                        |
| sliding window       | no                           | yes (`LocalMask`)                |
| grouped-query heads  | k, v repeated to H heads     | native                           |
| segment_ids          | yes                          | yes                              |
| bias                 | no                           | no                               |
| KV cache (`initial_state`), S != T | no             | no                               |
| head sizes           | K == V                       | K == V                           |

Both kernels mask top-left aligned (query t, key s <= t), which is our convention for S == T.
Lengths are padded to whole blocks; padded tokens get a segment of their own, so no real query
sees them and no padded query's row is empty. Segment ids are renumbered to 0, 1, 2, ... per
row first (the kernels compare ids; the renumbering keeps -1 free for padding).

On CPU, `impl="pallas"` runs the Triton kernel in Pallas's interpret mode (slow; for tests),
and `attention(..., kernel="splash", interpret=True)` runs the TPU kernel the same way.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.gpu import attention as triton_attention
from jax.experimental.pallas.ops.tpu import splash_attention as splash

from seqjax.scan import segment_index

KERNELS = ("triton", "splash")
TRITON_BLOCK = 64
TRITON_BACKWARD_BLOCK = 32  # the kernel does not check that these divide T (NaN if not)
SPLASH_BLOCK = 128  # splash's kv compute block must be a multiple of 128


def backend_kernel() -> str:
    """The kernel of the default backend: splash on TPU, Triton elsewhere (interpreted on CPU)."""
    return "splash" if jax.default_backend() == "tpu" else "triton"


def supports(kernel, q, k, v, causal, window, segment_ids, bias, cache) -> bool:
    """Whether `kernel` computes this call (see the module's support matrix)."""
    del causal, segment_ids  # both kernels take either
    common = (
        bias is None and cache is None and k.shape[1] == q.shape[1] and k.shape[3] == v.shape[3]
    )
    if kernel == "triton":
        return common and window is None
    return common


def _pad_time(x: jax.Array, length: int) -> jax.Array:
    return jnp.pad(x, ((0, 0), (0, length - x.shape[1])) + ((0, 0),) * (x.ndim - 2))


def _segments(segment_ids: jax.Array | None, batch: int, length: int, padded: int):
    """`[B, Tp]` int32: 0, 1, ... per row for the real tokens, -1 for the padding; None when
    neither segments nor padding need one."""
    if segment_ids is None and padded == length:
        return None
    if segment_ids is None:
        index = jnp.zeros((batch, length), jnp.int32)
    else:
        index = segment_index(segment_ids)
    return jnp.pad(index, ((0, 0), (0, padded - length)), constant_values=-1)


def _triton(q, k, v, causal, segments, scale, interpret):
    groups = q.shape[2] // k.shape[2]
    # The kernel indexes k and v by the query head: without the repeat it reads wrong heads.
    k, v = (jnp.repeat(x, groups, axis=2) for x in (k, v))
    blocks = triton_attention.BlockSizes(
        block_q=TRITON_BLOCK,
        block_k=TRITON_BLOCK,
        block_q_dkv=TRITON_BACKWARD_BLOCK,
        block_kv_dkv=TRITON_BACKWARD_BLOCK,
        block_q_dq=TRITON_BACKWARD_BLOCK,
        block_kv_dq=TRITON_BACKWARD_BLOCK,
    )
    return triton_attention.mha(
        q,
        k,
        v,
        segments,
        sm_scale=scale,
        causal=causal,
        block_sizes=blocks,
        interpret=interpret,
    )


@functools.lru_cache(maxsize=64)
def _splash_kernel(length: int, heads: int, causal: bool, window: int | None, interpret: bool):
    shape = (length, length)
    if window is not None:
        mask = splash.LocalMask(shape, window_size=(window - 1, 0), offset=0)
    elif causal:
        mask = splash.CausalMask(shape)
    else:
        mask = splash.FullMask(shape)
    blocks = splash.BlockSizes(
        block_q=SPLASH_BLOCK,
        block_kv=SPLASH_BLOCK,
        block_kv_compute=SPLASH_BLOCK,
        block_q_dkv=SPLASH_BLOCK,
        block_kv_dkv=SPLASH_BLOCK,
        block_kv_dkv_compute=SPLASH_BLOCK,
        block_q_dq=SPLASH_BLOCK,
        block_kv_dq=SPLASH_BLOCK,
    )
    # The kernel turns its mask into arrays when built: under a jit trace they would be tracers
    # that this cache leaks into the next trace, so build them as constants.
    with jax.ensure_compile_time_eval():
        return splash.make_splash_mha_single_device(
            splash.MultiHeadMask([mask] * heads), block_sizes=blocks, interpret=interpret
        )


def _splash(q, k, v, causal, window, segments, scale, interpret):
    padded, heads = q.shape[1], q.shape[2]
    kernel = _splash_kernel(padded, heads, causal, window, interpret)
    # splash has no scale argument, and takes one example at a time, heads first.
    q = (q * jnp.asarray(scale, q.dtype)).transpose(0, 2, 1, 3)
    k, v = (x.transpose(0, 2, 1, 3) for x in (k, v))
    if segments is None:
        o = jax.vmap(kernel)(q, k, v)
    else:
        o = jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=splash.SegmentIds(s, s)))(
            q, k, v, segments
        )
    return o.transpose(0, 2, 1, 3)


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool,
    window: int | None,
    segment_ids: jax.Array | None,
    scale: float,
    kernel: str,
    interpret: bool = False,
) -> jax.Array:
    """Self-attention `[B, T, H, K]` by a Pallas kernel (a call `supports` accepts)."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel: expected one of {KERNELS}, got {kernel!r}")
    batch, length = q.shape[:2]
    block = TRITON_BLOCK if kernel == "triton" else SPLASH_BLOCK
    padded = -(-length // block) * block
    segments = _segments(segment_ids, batch, length, padded)
    q, k, v = (_pad_time(x, padded) for x in (q, k, v))
    if kernel == "triton":
        o = _triton(q, k, v, causal, segments, scale, interpret)
    else:
        o = _splash(q, k, v, causal, window, segments, scale, interpret)
    return o[:, :length]
