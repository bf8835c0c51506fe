"""TPU (Mosaic) kernels of chunked gated linear attention: forward and backward.

Equations in the package docstring. Layout: head-major `[B, H, T', D']` with the chunk's tokens
on sublanes and channels on lanes (K' a multiple of 128), the state transposed, `S^T: [V, K']`,
so a per-channel decay `exp(b) : [1, K']` scales its lanes. Grid `(B, H, V / V_tile, N)`: the
chunk axis is last and the only "arbitrary" one; the state (forward) or its cotangent
(backward, chunks visited last to first through the index maps) is carried in a VMEM
scratch buffer initialized at the first grid step of each row.

Intra-chunk scores `A_ts = sum_k q_tk k_sk exp(b_tk - b_sk)`, s <= t:

- no decay / one decay per head (`b: [C, 1]`): `A = (q k^T) * exp(min(b_t - b_s, 0)) * mask`,
  exact, one matmul; the row form of `b` comes from a masked sublane sum (no transpose).
- one decay per channel (`b: [C, K']`), secondary chunking with sub-chunks of c = 16 tokens:
  query sub-chunk i reads the keys of all earlier sub-chunks through one matmul of factors
  around `r = b` at its first token, `(q_t exp(b_t - r)) . (k_s exp(r - b_s))`; both
  exponents are <= 0 because `b` does not increase. The diagonal `[c, c]` block is built one
  key (column) at a time in log space, `sum_k q_tk k_sk exp(min(b_tk - b_sk, 0))`, masked.

All dots accumulate in float32 (`preferred_element_type`); inputs may be bfloat16 and are
upcast on load because they are multiplied by float32 decay factors before every dot.

Memory (table row K <= 128: C = 128, V_tile = 128, K' = 128; float32 worst case): every
`[C, K']`, `[C, V_tile]` and `[V_tile, K']` block is 64 KiB. Forward: q, k, v, b, h0^T in,
o, the chunk state and the final state out, each double-buffered: 8 x 2 x 64 KiB = 1 MiB,
plus the 64 KiB state scratch and a few `[C, C]` / `[C, K']` temporaries (64 KiB each).
Backward: q, k, v, b, S_n^T, dO, dS_T^T in, dq, dk, dv, dh0 out: 11 x 2 x 64 KiB = 1.4 MiB
plus scratch and temporaries. The row K <= 256 (C = 64, K' = 256) has the same block bytes.
All well inside the 16 MiB scoped VMEM default of v5e / v6e. Checked so far in the TPU
interpreter and by lowering (`jax.export`); Mosaic compilation happens only on a TPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import common

SUB_CHUNK = 16
_F32 = jnp.float32


def _dot(a, b):  # [m, k] x [k, n] -> [m, n]
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=_F32)


def _dot_nt(a, b):  # [m, k] x [n, k] -> [m, n]
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=_F32)


def _dot_tn(a, b):  # [k, m] x [k, n] -> [m, n]
    return lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=_F32)


def _iota(shape, axis):
    return lax.broadcasted_iota(jnp.int32, shape, axis)


def _causal(size: int) -> jax.Array:
    """`[size, size]` bool, s <= t (row t, column s)."""
    return _iota((size, size), 1) <= _iota((size, size), 0)


def _pair_decay(b: jax.Array | None, size: int) -> jax.Array:
    """`[C, C]` float32: `exp(b_t - b_s)` for s <= t, else 0, from a per-head `b: [C, 1]`
    (None: no decay, the causal mask). The exponent is clipped at 0 before the exp so the
    masked-out upper triangle cannot overflow."""
    causal = _causal(size)
    if b is None:
        return causal.astype(_F32)
    # b as a row [1, C]: the diagonal of its lane broadcast, summed over sublanes.
    b_row = jnp.sum(jnp.where(_iota((size, size), 0) == _iota((size, size), 1), b, 0.0), axis=0)
    return jnp.where(causal, jnp.exp(jnp.minimum(b - b_row[None, :], 0.0)), 0.0)


def _key_weight(b_i: jax.Array, s: int) -> jax.Array:
    """`[c, K']`: `exp(b_t - b_s)` for the rows t >= s of a sub-chunk, 0 for t < s."""
    rows = _iota((b_i.shape[0], 1), 0)
    return jnp.where(rows >= s, jnp.exp(jnp.minimum(b_i - b_i[s : s + 1], 0.0)), 0.0)


def _diagonal_scores(q_i: jax.Array, k_i: jax.Array, b_i: jax.Array) -> jax.Array:
    """`[c, c]` scores of a sub-chunk with itself, in log space one key (column s) at a time:
    `sum_k q_tk k_sk exp(b_tk - b_sk)` for t >= s, 0 above the diagonal."""
    size = q_i.shape[0]
    scores = jnp.zeros((size, size), _F32)
    for s in range(size):
        column = jnp.sum(q_i * k_i[s : s + 1] * _key_weight(b_i, s), axis=1, keepdims=True)
        scores = scores + jnp.where(_iota((size, size), 1) == s, column, 0.0)
    return scores


def _diagonal_gradients(q_i, k_i, v_i, b_i, d_o_i):
    """The diagonal sub-block's part of the backward: `(dq_i, dk_i, scores_ii)`, with
    `dq_t = sum_{s <= t} dA_ts k_s exp(b_t - b_s)`, `dk_s = sum_{t >= s} dA_ts q_t
    exp(b_t - b_s)` and `dA_ts = dO_t . v_s`, one key s at a time."""
    size = q_i.shape[0]
    scores = jnp.zeros((size, size), _F32)
    d_q = jnp.zeros(q_i.shape, _F32)
    d_k = jnp.zeros(k_i.shape, _F32)
    for s in range(size):
        weight = _key_weight(b_i, s)  # zero for t < s: masks every term below
        k_s = k_i[s : s + 1]
        column = jnp.sum(q_i * k_s * weight, axis=1, keepdims=True)
        scores = scores + jnp.where(_iota((size, size), 1) == s, column, 0.0)
        d_column = jnp.sum(d_o_i * v_i[s : s + 1], axis=1, keepdims=True)  # dA_ts, [c, 1]
        d_q = d_q + d_column * k_s * weight
        d_k_s = jnp.sum(d_column * q_i * weight, axis=0, keepdims=True)
        d_k = d_k + jnp.where(_iota((size, 1), 0) == s, d_k_s, 0.0)
    return d_q, d_k, scores


def _per_channel_outputs(q, k, v, b, o_inter, o_ref) -> None:
    """Writes `o = o_inter + sum_{s <= t} A_ts v_s` for per-channel `b: [C, K']`, one query
    sub-chunk i at a time: earlier sub-chunks through factors around `r = b` at i's first
    token, the diagonal block in log space."""
    for lo in range(0, q.shape[0], SUB_CHUNK):
        hi = lo + SUB_CHUNK
        q_i, b_i = q[lo:hi], b[lo:hi]
        out = o_inter[lo:hi] + _dot(_diagonal_scores(q_i, k[lo:hi], b_i), v[lo:hi])
        if lo:
            reference = b[lo : lo + 1]
            query_factor = q_i * jnp.exp(b_i - reference)
            key_factor = k[:lo] * jnp.exp(reference - b[:lo])
            out = out + _dot(_dot_nt(query_factor, key_factor), v[:lo])
        o_ref[lo:hi, :] = out.astype(o_ref.dtype)


def _per_channel_gradients(q, k, v, b, d_o, dq_ref, dk_ref, dv_ref) -> None:
    """Adds the intra-chunk gradients for per-channel `b: [C, K']` to the output blocks (which
    hold the inter-chunk part), one query sub-chunk i at a time, as `_per_channel_outputs`."""
    for lo in range(0, q.shape[0], SUB_CHUNK):
        hi = lo + SUB_CHUNK
        q_i, b_i, d_o_i = q[lo:hi], b[lo:hi], d_o[lo:hi]
        if lo:
            reference = b[lo : lo + 1]
            query_decay = jnp.exp(b_i - reference)
            key_decay = jnp.exp(reference - b[:lo])
            query_factor, key_factor = q_i * query_decay, k[:lo] * key_decay
            scores = _dot_nt(query_factor, key_factor)  # A_ts, [c, lo]
            d_scores = _dot_nt(d_o_i, v[:lo])  # dA_ts, [c, lo]
            dq_ref[lo:hi, :] += query_decay * _dot(d_scores, key_factor)
            dk_ref[:lo, :] += key_decay * _dot_tn(d_scores, query_factor)
            dv_ref[:lo, :] += _dot_tn(scores, d_o_i)
        d_q, d_k, scores = _diagonal_gradients(q_i, k[lo:hi], v[lo:hi], b_i, d_o_i)
        dq_ref[lo:hi, :] += d_q
        dk_ref[lo:hi, :] += d_k
        dv_ref[lo:hi, :] += _dot_tn(scores, d_o_i)


def _forward_kernel(*refs, scale: float, has_decay: bool, num_chunks: int):
    """One chunk of one (row, head, value tile): o, the entering state S_n^T, and S_{n+1}^T
    into the scratch (the final state at the last chunk)."""
    if has_decay:
        q_ref, k_ref, v_ref, b_ref, h0_ref, o_ref, states_ref, final_ref, state_ref = refs
    else:
        q_ref, k_ref, v_ref, h0_ref, o_ref, states_ref, final_ref, state_ref = refs
        b_ref = None
    n = pl.program_id(3)

    @pl.when(n == 0)
    def _():
        state_ref[...] = h0_ref[...]

    state = state_ref[...]  # S_n^T [V_tile, K']
    states_ref[...] = state
    q = q_ref[...].astype(_F32) * scale
    k, v = k_ref[...].astype(_F32), v_ref[...].astype(_F32)
    size = q.shape[0]
    if b_ref is None:
        o = _dot_nt(q, state) + _dot(_dot_nt(q, k) * _pair_decay(None, size), v)
        o_ref[...] = o.astype(o_ref.dtype)
        new_state = state + _dot_tn(v, k)
    else:
        b = b_ref[...]  # [C, G]
        b_last = b[size - 1 :]
        o_inter = _dot_nt(q * jnp.exp(b), state)
        if b.shape[1] == 1:
            o = o_inter + _dot(_dot_nt(q, k) * _pair_decay(b, size), v)
            o_ref[...] = o.astype(o_ref.dtype)
        else:
            _per_channel_outputs(q, k, v, b, o_inter, o_ref)
        new_state = state * jnp.exp(b_last) + _dot_tn(v, k * jnp.exp(b_last - b))
    state_ref[...] = new_state

    @pl.when(n == num_chunks - 1)
    def _():
        final_ref[...] = new_state


def _backward_kernel(*refs, scale: float, has_decay: bool, num_chunks: int):
    """One chunk (visited last to first) of one (row, head, value tile): dq and dk (partial
    over value tiles), dv, and dS_n^T into the scratch (dh0^T after the first chunk)."""
    if has_decay:
        q_ref, k_ref, v_ref, b_ref, states_ref, d_o_ref, d_final_ref, *outs = refs
    else:
        q_ref, k_ref, v_ref, states_ref, d_o_ref, d_final_ref, *outs = refs
        b_ref = None
    dq_ref, dk_ref, dv_ref, dh0_ref, d_state_ref = outs
    step = pl.program_id(3)

    @pl.when(step == 0)
    def _():
        d_state_ref[...] = d_final_ref[...]

    d_state = d_state_ref[...]  # dS_{n+1}^T [V_tile, K']
    state = states_ref[...]  # S_n^T
    q = q_ref[...].astype(_F32) * scale
    k, v = k_ref[...].astype(_F32), v_ref[...].astype(_F32)
    d_o = d_o_ref[...].astype(_F32)
    size = q.shape[0]
    b = None if b_ref is None else b_ref[...]
    if b is None:
        query_decay = key_decay = chunk_decay = jnp.ones((1, 1), _F32)
    else:
        b_last = b[size - 1 :]
        query_decay, key_decay, chunk_decay = jnp.exp(b), jnp.exp(b_last - b), jnp.exp(b_last)
    query_factor = q * query_decay
    d_q = query_decay * _dot(d_o, state)
    d_k = key_decay * _dot(v, d_state)
    d_v = _dot_nt(k * key_decay, d_state)
    if b is None or b.shape[1] == 1:
        decay = _pair_decay(b, size)
        scores, d_scores = _dot_nt(q, k) * decay, _dot_nt(d_o, v) * decay
        dq_ref[...] = d_q + _dot(d_scores, k)
        dk_ref[...] = d_k + _dot_tn(d_scores, q)
        dv_ref[...] = d_v + _dot_tn(scores, d_o)
    else:
        dq_ref[...], dk_ref[...], dv_ref[...] = d_q, d_k, d_v
        _per_channel_gradients(q, k, v, b, d_o, dq_ref, dk_ref, dv_ref)
    new_d_state = d_state * chunk_decay + _dot_tn(d_o, query_factor)  # dS_n^T
    d_state_ref[...] = new_d_state

    @pl.when(step == num_chunks - 1)
    def _():
        dh0_ref[...] = new_d_state


def forward(q, k, v, b, h0_t, config):
    """`q, k: [B, H, T', K']`, `v: [B, H, T', V']`, `b: [B, H, T', G]` or None, `h0_t:
    [B, H, V', K']` -> `(o [B, H, T', V'], states [B, H, N, V', K'], final^T [B, H, V', K'])`."""
    batch, heads, padded, key_pad = q.shape
    value_pad = v.shape[3]
    chunk, value_block = config.chunk, config.value_block
    num_chunks = padded // chunk
    grid = (batch, heads, value_pad // value_block, num_chunks)
    keys = pl.BlockSpec((None, None, chunk, key_pad), lambda i, h, j, n: (i, h, n, 0))
    values = pl.BlockSpec((None, None, chunk, value_block), lambda i, h, j, n: (i, h, n, j))
    state = pl.BlockSpec((None, None, value_block, key_pad), lambda i, h, j, n: (i, h, j, 0))
    chunk_state = pl.BlockSpec(
        (None, None, None, value_block, key_pad), lambda i, h, j, n: (i, h, n, j, 0)
    )
    inputs, in_specs = [q, k, v], [keys, keys, values]
    if b is not None:
        inputs.append(b)
        in_specs.append(
            pl.BlockSpec((None, None, chunk, b.shape[3]), lambda i, h, j, n: (i, h, n, 0))
        )
    kernel = functools.partial(
        _forward_kernel, scale=config.scale, has_decay=b is not None, num_chunks=num_chunks
    )
    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=[*in_specs, state],
        out_specs=[values, chunk_state, state],
        out_shape=[
            jax.ShapeDtypeStruct(v.shape, v.dtype),
            jax.ShapeDtypeStruct((batch, heads, num_chunks, value_pad, key_pad), _F32),
            jax.ShapeDtypeStruct(h0_t.shape, _F32),
        ],
        scratch_shapes=[pltpu.VMEM((value_block, key_pad), _F32)],
        compiler_params=common.tpu_params("parallel", "parallel", "parallel", "arbitrary"),
        interpret=common.interpret_params("tpu", config.interpret),
        name="gla_forward",
    )(*inputs, h0_t)


def backward(q, k, v, b, states, d_o, d_final_t, config):
    """Cotangents `d_o: [B, H, T', V']`, `d_final_t: [B, H, V', K']` -> `(dq, dk [B, H, T',
    K'], dv [B, H, T', V'], dh0^T [B, H, V', K'])`, float32; dq w.r.t. the scaled query."""
    batch, heads, padded, key_pad = q.shape
    value_pad = v.shape[3]
    chunk, value_block = config.chunk, config.value_block
    num_chunks = padded // chunk
    value_tiles = value_pad // value_block
    grid = (batch, heads, value_tiles, num_chunks)
    last = num_chunks - 1
    keys = pl.BlockSpec((None, None, chunk, key_pad), lambda i, h, j, n: (i, h, last - n, 0))
    values = pl.BlockSpec((None, None, chunk, value_block), lambda i, h, j, n: (i, h, last - n, j))
    state = pl.BlockSpec((None, None, value_block, key_pad), lambda i, h, j, n: (i, h, j, 0))
    chunk_state = pl.BlockSpec(
        (None, None, None, value_block, key_pad), lambda i, h, j, n: (i, h, last - n, j, 0)
    )
    # dq and dk of each value tile, summed over tiles by the caller.
    partial_keys = pl.BlockSpec(
        (None, None, None, chunk, key_pad), lambda i, h, j, n: (i, h, j, last - n, 0)
    )
    inputs, in_specs = [q, k, v], [keys, keys, values]
    if b is not None:
        inputs.append(b)
        in_specs.append(
            pl.BlockSpec((None, None, chunk, b.shape[3]), lambda i, h, j, n: (i, h, last - n, 0))
        )
    kernel = functools.partial(
        _backward_kernel, scale=config.scale, has_decay=b is not None, num_chunks=num_chunks
    )
    partial_shape = jax.ShapeDtypeStruct((batch, heads, value_tiles, padded, key_pad), _F32)
    d_q, d_k, d_v, dh0_t = pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=[*in_specs, chunk_state, values, state],
        out_specs=[partial_keys, partial_keys, values, state],
        out_shape=[
            partial_shape,
            partial_shape,
            jax.ShapeDtypeStruct(v.shape, _F32),
            jax.ShapeDtypeStruct(d_final_t.shape, _F32),
        ],
        scratch_shapes=[pltpu.VMEM((value_block, key_pad), _F32)],
        compiler_params=common.tpu_params("parallel", "parallel", "parallel", "arbitrary"),
        interpret=common.interpret_params("tpu", config.interpret),
        name="gla_backward",
    )(*inputs, states, d_o, d_final_t)
    return jnp.sum(d_q, axis=2), jnp.sum(d_k, axis=2), d_v, dh0_t
