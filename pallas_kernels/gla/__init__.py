"""Chunked gated linear attention: `linear_attention`, `simple_gla` and `gla` in one kernel.

For each batch row and head, with a `[K, V]` state `S` and the scaled query `q_t <- scale q_t`,

    S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T,      o_t = S_t^T q_t,

where the log-decay `g_t <= 0` is absent (linear attention), one number per head and token
(`g: [B, T, H]`, simple GLA) or one per key channel (`g: [B, T, H, K]`, GLA).

Forward (chunks of C tokens; `b_t = sum_{u <= t in chunk} g_u`, the chunk-relative cumulative
log-decay, and `L` the chunk's last token). With `S_n` the state entering chunk n:

    o_t     = (q_t * exp(b_t))^T S_n + sum_{s <= t} A_ts v_s,
              A_ts = sum_k q_tk k_sk exp(b_tk - b_sk)
    S_{n+1} = exp(b_L) * S_n + sum_s (k_s * exp(b_L - b_s)) v_s^T.

Every exponent is <= 0 because `b` is non-increasing within a chunk; the per-channel scores
`A` use secondary chunking (sub-chunks of 16 tokens: matmuls on factors around a reference
potential between sub-chunks, a pairwise log-space product on the diagonal sub-blocks; see
`tpu.py`), and a per-head decay uses the exact `[C, C]` matrix `exp(b_t - b_s)`, s <= t.

Backward. With `dO` the output cotangent and `dS_{n+1}` that of the state leaving chunk n
(the final state's cotangent for the last chunk), differentiating the two lines above gives

    dS_n    = exp(b_L) * dS_{n+1} + sum_t (q_t * exp(b_t)) dO_t^T
    dv_s    = sum_{t >= s} A_ts dO_t + dS_{n+1}^T (k_s * exp(b_L - b_s))
    dq_t    = exp(b_t) * (S_n dO_t) + sum_{s <= t} dA_ts k_s * exp(b_t - b_s)
    dk_s    = exp(b_L - b_s) * (dS_{n+1} v_s) + sum_{t >= s} dA_ts q_t * exp(b_t - b_s)
              with dA_ts = dO_t . v_s,

run over the chunks in reverse, each chunk reading its saved entering state `S_n`; the last
line gives `dh0 = dS_0`. The decay gradient needs no kernel of its own. With the global
cumulative log-decay `B_t = sum_{u <= t} g_u`, the op is a function of `q_t exp(B_t)`,
`k_s exp(-B_s)` and, for the final state `S_T = exp(B_T) (h0 + sum_s k_s exp(-B_s) v_s^T)`,
of `exp(B_T)`. The chain rule through those products gives

    dB_t = q_t * dq_t - k_t * dk_t  (+ sum_V S_T * dS_T at t = T),    dg_u = sum_{t >= u} dB_t,

(a reverse cumulative sum over the whole sequence, done in the wrapper; summed over K for a
per-head decay), with `dq`, `dk` the gradients w.r.t. the scaled query and the key actually
used. The forward saves only the inputs, the chunk-entering states `[B, H, N, V, K]` and the
final state. The kernels keep the state transposed, `S^T: [V, K]`, so that a per-channel decay
scales its lanes (columns) and no in-kernel transpose of a decay column is needed.

Reverse-mode only (a `jax.custom_vjp`): no `jvp` / `jacfwd`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from pallas_kernels import blocks, common
from pallas_kernels.gla import gpu, tpu

SUB_CHUNK = 16  # tokens per sub-chunk in tpu.py and gpu.py; chunks must be whole sub-chunks
_FLOAT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


@dataclasses.dataclass(frozen=True)
class Config:
    """The static part of a call: what the kernels are specialized on.

    Attributes:
      backend: "tpu" or "gpu".
      interpret: run the kernels in Pallas interpret mode.
      scale: multiplies q inside the kernels.
      chunk: tokens per chunk C (a multiple of `SUB_CHUNK`).
      key_pad: the padded key size K' the kernels see.
      value_block: value columns per block (the V tile).
      value_pad: the padded value size V' (a multiple of `value_block`).
      sizes: the block-table row (Triton launch parameters).
    """

    backend: str
    interpret: bool
    scale: float
    chunk: int
    key_pad: int
    value_block: int
    value_pad: int
    sizes: blocks.BlockSizes


def unsupported(q, k, v, g, h0, backend: str) -> str | None:
    """A one-line reason the kernels do not cover these inputs, or None when they do."""
    if reason := common.unknown_backend(backend):
        return reason
    if q.ndim != 4 or k.shape != q.shape or v.ndim != 4 or v.shape[:3] != q.shape[:3]:
        return (
            "gla kernel: expected q, k [B, T, H, K] and v [B, T, H, V], got "
            f"{q.shape}, {k.shape}, {v.shape}"
        )
    for name, x in (("q", q), ("k", k), ("v", v), ("g", g)):
        if x is not None and jnp.dtype(x.dtype) not in _FLOAT_DTYPES:
            return f"gla kernel: {name} must be float32 or bfloat16, got {x.dtype}"
    if g is not None and g.shape not in (q.shape[:3], q.shape):
        return f"gla kernel: g must be [B, T, H] or [B, T, H, K], got {g.shape}"
    if h0 is not None and (h0.shape != (*q.shape[:1], q.shape[2], q.shape[3], v.shape[3])):
        return f"gla kernel: h0 must be [B, H, K, V], got {h0.shape}"
    if h0 is not None and jnp.dtype(h0.dtype) != jnp.float32:
        return f"gla kernel: h0 must be float32, got {h0.dtype}"
    head_dim = max(q.shape[3], v.shape[3])
    if blocks.block_sizes(backend, "gla", head_dim, q.dtype) is None:
        return f"gla kernel: head dim {head_dim} is larger than the {backend} block table covers"
    return None


def gla(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array | None,
    h0: jax.Array | None,
    *,
    scale: float,
    backend: str,
    interpret: bool = False,
    chunk_size: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Chunked gated linear attention (module docstring) on `backend`'s kernels.

    Args:
      q, k: `[B, T, H, K]`; v: `[B, T, H, V]` (float32 or bfloat16).
      g: None (no decay), `[B, T, H]` or `[B, T, H, K]` log-decays <= 0.
      h0: None (zeros) or the initial state `[B, H, K, V]` float32.
      scale: multiplies q.
      backend: "tpu" (Mosaic) or "gpu" (Triton).
      interpret: run in Pallas interpret mode (on CPU).
      chunk_size: tokens per chunk, a multiple of 16; None: the block table's.

    Returns:
      `o: [B, T, H, V]` in v's dtype and the final state `[B, H, K, V]` float32.
    """
    reason = unsupported(q, k, v, g, h0, backend)
    if reason is not None:
        raise ValueError(reason)
    key_dim, value_dim = q.shape[3], v.shape[3]
    sizes = blocks.block_sizes(backend, "gla", max(key_dim, value_dim), q.dtype)
    chunk = sizes.chunk if chunk_size is None else chunk_size
    if chunk <= 0 or chunk % SUB_CHUNK:
        raise ValueError(f"chunk_size: expected a positive multiple of {SUB_CHUNK}, got {chunk}")
    if backend == "tpu":
        # Mosaic tiles are 128 lanes wide: pad channels to whole lane tiles.
        key_pad = common.round_up(key_dim, 128)
        value_block = sizes.value
    else:
        # Triton blocks are powers of 2 and dots need 16 per side.
        key_pad = common.next_power_of_2(max(key_dim, 16))
        value_block = min(sizes.value, common.next_power_of_2(max(value_dim, 16)))
    config = Config(
        backend=backend,
        interpret=interpret,
        scale=float(scale),
        chunk=chunk,
        key_pad=key_pad,
        value_block=value_block,
        value_pad=common.round_up(value_dim, value_block),
        sizes=sizes,
    )
    return _gla(q, k, v, g, h0, config)


def _head_major(x: jax.Array, length: int, width: int) -> jax.Array:
    """`[B, T, H, D]` -> `[B, H, T', D']`, zero-padded to `length` tokens and `width` channels."""
    x = jnp.swapaxes(x, 1, 2)
    x = common.pad_axis(x, 2, length)
    return common.pad_axis(x, 3, width)


def _chunk_cumulative_decay(g: jax.Array | None, config: Config, length: int) -> jax.Array | None:
    """`b: [B, H, T', G]` float32, the log-decay summed from the start of each chunk (G = 1
    for a per-head decay, K' per channel); padding tokens decay by nothing (g = 0)."""
    if g is None:
        return None
    if g.ndim == 3:
        g = g[..., None]
    g = _head_major(g.astype(jnp.float32), length, config.key_pad if g.shape[-1] > 1 else 1)
    batch, heads, padded, width = g.shape
    chunks = g.reshape(batch, heads, padded // config.chunk, config.chunk, width)
    return jnp.cumsum(chunks, axis=3).reshape(g.shape)


def _prepare(q, k, v, g, h0, config: Config):
    """Head-major, padded kernel inputs: `q, k: [B, H, T', K']`, `v: [B, H, T', V']`,
    `b: [B, H, T', G]` or None, `h0^T: [B, H, V', K']` float32."""
    batch, length, heads, key_dim = q.shape
    value_dim = v.shape[3]
    padded = common.round_up(length, config.chunk)
    q_, k_ = (_head_major(x, padded, config.key_pad) for x in (q, k))
    v_ = _head_major(v, padded, config.value_pad)
    b = _chunk_cumulative_decay(g, config, padded)
    if h0 is None:
        h0 = jnp.zeros((batch, heads, key_dim, value_dim), jnp.float32)
    h0_t = common.pad_axis(jnp.swapaxes(h0.astype(jnp.float32), 2, 3), 2, config.value_pad)
    h0_t = common.pad_axis(h0_t, 3, config.key_pad)
    return q_, k_, v_, b, h0_t


def _kernels(config: Config):
    return tpu if config.backend == "tpu" else gpu


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _gla(q, k, v, g, h0, config: Config):
    return _gla_fwd(q, k, v, g, h0, config)[0]


def _gla_fwd(q, k, v, g, h0, config: Config):
    length, key_dim, value_dim = q.shape[1], q.shape[3], v.shape[3]
    q_, k_, v_, b, h0_t = _prepare(q, k, v, g, h0, config)
    o, states, final_t = _kernels(config).forward(q_, k_, v_, b, h0_t, config)
    o = jnp.swapaxes(o[:, :, :length, :value_dim], 1, 2)
    final = jnp.swapaxes(final_t[:, :, :value_dim, :key_dim], 2, 3)
    return (o, final), (q, k, v, g, h0, states, final)


def _gla_bwd(config: Config, residuals, cotangents):
    q, k, v, g, h0, states, final = residuals
    d_o, d_final = cotangents
    length, key_dim, value_dim = q.shape[1], q.shape[3], v.shape[3]
    q_, k_, v_, b, _ = _prepare(q, k, v, g, h0, config)
    padded = q_.shape[2]
    d_o_ = _head_major(d_o, padded, config.value_pad)
    d_final_t = jnp.swapaxes(d_final.astype(jnp.float32), 2, 3)
    d_final_t = common.pad_axis(common.pad_axis(d_final_t, 2, config.value_pad), 3, config.key_pad)
    dq_, dk_, dv_, dh0_t = _kernels(config).backward(q_, k_, v_, b, states, d_o_, d_final_t, config)

    def token_major(x, width):  # [B, H, T', D'] -> [B, T, H, D]
        return jnp.swapaxes(x[:, :, :length, :width], 1, 2)

    # The kernels return the gradient w.r.t. the scaled query.
    dq = token_major(dq_, key_dim) * config.scale
    dk = token_major(dk_, key_dim)
    dv = token_major(dv_, value_dim)
    dg = None
    if g is not None:
        d_cumulative = q.astype(jnp.float32) * dq - k.astype(jnp.float32) * dk
        final_term = jnp.sum(final * d_final, axis=-1)  # [B, H, K]
        d_cumulative = d_cumulative.at[:, -1].add(final_term)
        if g.ndim == 3:
            d_cumulative = jnp.sum(d_cumulative, axis=-1)
        dg = jnp.flip(jnp.cumsum(jnp.flip(d_cumulative, 1), axis=1), 1).astype(g.dtype)
    dh0 = None
    if h0 is not None:
        dh0 = jnp.swapaxes(dh0_t[:, :, :value_dim, :key_dim], 2, 3).astype(h0.dtype)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dg, dh0


_gla.defvjp(_gla_fwd, _gla_bwd)
