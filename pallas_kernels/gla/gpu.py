"""GPU (Triton lowering) kernels of chunked gated linear attention: forward and backward.

Equations in the package docstring; the intra-chunk scores are split as in `tpu.py` (one
`[C, C]` decay matrix for no / per-head decay, secondary chunking with sub-chunks of c = 16
tokens for a per-channel decay). Triton programs run independently, so one program owns one
(row, head, value tile), `grid = (B, H, V' / V_tile)`, and walks the chunks itself in a
`lax.fori_loop` carrying the transposed state `S^T: [V_tile, K']` (forward) or its cotangent
(backward, last chunk first) in registers; chunks and sub-chunks are read from the
`[T', K']` / `[T', V_tile]` refs with `pl.ds` slices. Triton cannot slice a value, so each
sub-block is loaded from its ref, and the per-channel backward makes two passes over the
sub-chunks: one per query sub-chunk (finishes dq_i), one per key sub-chunk (finishes dk_j and
dv_j), recomputing the off-diagonal scores rather than accumulating into global memory.

Every block is a power of 2 (K' = next power of 2 >= max(K, 16), V_tile <= the table's value
size) and every dot has at least 16 on each side (c = 16). Compiled, dots run as 3xTF32
(`common.gpu_kernel`: float32-level accuracy on tensor cores; one-pass TF32, Triton's default
for float32, has a 10-bit mantissa, too coarse for the decay-factored scores, and IEEE
float32 dots lower to scalar FMAs), interpreted at `Precision.HIGHEST`; inputs may be
bfloat16 and are upcast on load because they are multiplied by float32 decay factors before
every dot.

Memory (table row K <= 128: C = 64, V_tile = 64, K' = 128): the carried state is
64 x 128 x 4 B = 32 KiB per program; a chunk's q and k ([C, K'], 32 KiB each in float32), v
and dO ([C, V_tile], 16 KiB each) and the `[C, C]` scores (16 KiB) are the largest live
tiles: about 130 KiB in the forward, 180 KiB in the backward (which also holds dS^T), under
the 227 KiB of shared memory per block on H100; Triton holds them in registers and spills
what does not fit. The row K <= 256 (C = 32, V_tile = 32, K' = 256) has the same bytes per
tile. `num_warps` and `num_stages` come from the table. None of this has been compiled or
timed on a GPU yet: the sizes are a starting point to tune on the device.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import common

SUB_CHUNK = 16
_F32 = jnp.float32


def _dot(a, b):  # [m, k] x [k, n] -> [m, n]
    return lax.dot_general(
        a,
        b,
        (((1,), (0,)), ((), ())),
        precision=common.dot_precision(),
        preferred_element_type=_F32,
    )


def _dot_nt(a, b):  # [m, k] x [n, k] -> [m, n]
    return lax.dot_general(
        a,
        b,
        (((1,), (1,)), ((), ())),
        precision=common.dot_precision(),
        preferred_element_type=_F32,
    )


def _dot_tn(a, b):  # [k, m] x [k, n] -> [m, n]
    return lax.dot_general(
        a,
        b,
        (((0,), (0,)), ((), ())),
        precision=common.dot_precision(),
        preferred_element_type=_F32,
    )


def _iota(shape, axis):
    return lax.broadcasted_iota(jnp.int32, shape, axis)


def _rows(ref, start, size: int) -> jax.Array:
    """`ref[start : start + size]` as float32."""
    return ref[pl.ds(start, size), :].astype(_F32)


def _pair_decay(b: jax.Array | None, size: int) -> jax.Array:
    """`[C, C]`: `exp(b_t - b_s)` for s <= t, else 0, from a per-head `b: [C, 1]` (None: the
    causal mask); the exponent is clipped at 0 so the masked-out triangle cannot overflow."""
    causal = _iota((size, size), 1) <= _iota((size, size), 0)
    if b is None:
        return causal.astype(_F32)
    diagonal = _iota((size, size), 0) == _iota((size, size), 1)
    b_row = jnp.sum(jnp.where(diagonal, b, 0.0), axis=0, keepdims=True)  # [1, C]
    return jnp.where(causal, jnp.exp(jnp.minimum(b - b_row, 0.0)), 0.0)


def _key_weight(b_i: jax.Array, b_s: jax.Array, s) -> jax.Array:
    """`[c, K']`: `exp(b_t - b_s)` for the rows t >= s of a sub-chunk, 0 for t < s."""
    rows = _iota(b_i.shape, 0)
    return jnp.where(rows >= s, jnp.exp(jnp.minimum(b_i - b_s, 0.0)), 0.0)


class _Chunk:
    """Row loads of one chunk from the refs `q, k, v, b` (and `d_o` in the backward), as
    float32; `q` comes scaled."""

    def __init__(self, refs: dict, start, scale: float):
        self.refs, self.start, self.scale = refs, start, scale

    def load(self, name: str, offset, size: int) -> jax.Array:
        rows = _rows(self.refs[name], self.start + offset, size)
        return rows * self.scale if name == "q" else rows

    def sub_chunk(self, name: str, index: int) -> jax.Array:
        return self.load(name, index * SUB_CHUNK, SUB_CHUNK)


def _sub_chunk_outputs(chunk: _Chunk, state, i: int) -> jax.Array:
    """`[c, V_tile]` output of query sub-chunk i for a per-channel decay: the entering
    state's part, earlier sub-chunks through factors around `r = b` at i's first token, and
    the diagonal block in log space, one key at a time."""
    lo = i * SUB_CHUNK
    q_i, b_i = chunk.sub_chunk("q", i), chunk.sub_chunk("b", i)
    out = _dot_nt(q_i * jnp.exp(b_i), state)
    reference = chunk.load("b", lo, 1)
    query_factor = q_i * jnp.exp(b_i - reference)
    for j in range(i):
        key_factor = chunk.sub_chunk("k", j) * jnp.exp(reference - chunk.sub_chunk("b", j))
        out = out + _dot(_dot_nt(query_factor, key_factor), chunk.sub_chunk("v", j))

    def diagonal_column(s, scores):
        k_s, b_s = chunk.load("k", lo + s, 1), chunk.load("b", lo + s, 1)
        column = jnp.sum(q_i * k_s * _key_weight(b_i, b_s, s), axis=1, keepdims=True)
        return scores + jnp.where(_iota(scores.shape, 1) == s, column, 0.0)

    scores = lax.fori_loop(0, SUB_CHUNK, diagonal_column, jnp.zeros((SUB_CHUNK, SUB_CHUNK), _F32))
    return out + _dot(scores, chunk.sub_chunk("v", i))


def _sub_chunk_dq(chunk: _Chunk, state, i: int) -> jax.Array:
    """`[c, K']` dq of query sub-chunk i for a per-channel decay: `exp(b_t) (S_n dO_t)` plus
    `sum_{s <= t} dA_ts k_s exp(b_t - b_s)`, earlier sub-chunks around `r = b` at i's first
    token, the diagonal block one key at a time."""
    lo = i * SUB_CHUNK
    b_i, d_o_i = chunk.sub_chunk("b", i), chunk.sub_chunk("d_o", i)
    d_q = jnp.exp(b_i) * _dot(d_o_i, state)
    reference = chunk.load("b", lo, 1)
    earlier = jnp.zeros(d_q.shape, _F32)
    for j in range(i):
        key_factor = chunk.sub_chunk("k", j) * jnp.exp(reference - chunk.sub_chunk("b", j))
        earlier = earlier + _dot(_dot_nt(d_o_i, chunk.sub_chunk("v", j)), key_factor)
    d_q = d_q + jnp.exp(b_i - reference) * earlier

    def diagonal_key(s, d_q):
        k_s, b_s, v_s = (chunk.load(name, lo + s, 1) for name in ("k", "b", "v"))
        d_column = jnp.sum(d_o_i * v_s, axis=1, keepdims=True)  # dA_ts, [c, 1]
        return d_q + d_column * k_s * _key_weight(b_i, b_s, s)

    return lax.fori_loop(0, SUB_CHUNK, diagonal_key, d_q)


def _sub_chunk_dk_dv(chunk: _Chunk, d_state, b_last, j: int, num_sub: int):
    """`([c, K'], [c, V_tile])` dk and dv of key sub-chunk j for a per-channel decay: the
    leaving state's part, later query sub-chunks i around `r = b` at i's first token (the
    scores recomputed as in the forward), the diagonal block one key at a time."""
    lo = j * SUB_CHUNK
    k_j, b_j, v_j = chunk.sub_chunk("k", j), chunk.sub_chunk("b", j), chunk.sub_chunk("v", j)
    q_j, d_o_j = chunk.sub_chunk("q", j), chunk.sub_chunk("d_o", j)
    leaving_decay = jnp.exp(b_last - b_j)
    d_k = leaving_decay * _dot(v_j, d_state)
    d_v = _dot_nt(k_j * leaving_decay, d_state)
    for i in range(j + 1, num_sub):
        d_o_i, reference = chunk.sub_chunk("d_o", i), chunk.load("b", i * SUB_CHUNK, 1)
        query_factor = chunk.sub_chunk("q", i) * jnp.exp(chunk.sub_chunk("b", i) - reference)
        key_decay = jnp.exp(reference - b_j)
        scores = _dot_nt(query_factor, k_j * key_decay)  # A_ts, [c_i, c_j]
        d_scores = _dot_nt(d_o_i, v_j)  # dA_ts
        d_k = d_k + key_decay * _dot_tn(d_scores, query_factor)
        d_v = d_v + _dot_tn(scores, d_o_i)

    def diagonal_key(s, carry):
        d_k, d_v = carry
        k_s, b_s, v_s = (chunk.load(name, lo + s, 1) for name in ("k", "b", "v"))
        weight = _key_weight(b_j, b_s, s)  # zero for t < s: masks every term below
        column = jnp.sum(q_j * k_s * weight, axis=1, keepdims=True)  # A_ts, [c, 1]
        d_column = jnp.sum(d_o_j * v_s, axis=1, keepdims=True)  # dA_ts
        d_k_s = jnp.sum(d_column * q_j * weight, axis=0, keepdims=True)
        d_v_s = jnp.sum(column * d_o_j, axis=0, keepdims=True)
        row = _iota((SUB_CHUNK, 1), 0) == s
        return d_k + jnp.where(row, d_k_s, 0.0), d_v + jnp.where(row, d_v_s, 0.0)

    return lax.fori_loop(0, SUB_CHUNK, diagonal_key, (d_k, d_v))


def _forward_kernel(*refs, scale: float, has_decay: bool, per_channel: bool, chunk: int):
    """All chunks of one (row, head, value tile): o, the entering states S_n^T, the final
    state."""
    if has_decay:
        q_ref, k_ref, v_ref, b_ref, h0_ref, o_ref, states_ref, final_ref = refs
    else:
        q_ref, k_ref, v_ref, h0_ref, o_ref, states_ref, final_ref = refs
        b_ref = None
    num_chunks = q_ref.shape[0] // chunk

    def chunk_step(n, state):  # state: S_n^T [V_tile, K']
        start = n * chunk
        states_ref[n] = state
        rows = _Chunk({"q": q_ref, "k": k_ref, "v": v_ref, "b": b_ref}, start, scale)
        k, v = rows.load("k", 0, chunk), rows.load("v", 0, chunk)
        if b_ref is None:
            q = rows.load("q", 0, chunk)
            o = _dot_nt(q, state) + _dot(_dot_nt(q, k) * _pair_decay(None, chunk), v)
            o_ref[pl.ds(start, chunk), :] = o.astype(o_ref.dtype)
            return state + _dot_tn(v, k)
        b = rows.load("b", 0, chunk)
        if per_channel:
            for i in range(chunk // SUB_CHUNK):
                out = _sub_chunk_outputs(rows, state, i)
                o_ref[pl.ds(start + i * SUB_CHUNK, SUB_CHUNK), :] = out.astype(o_ref.dtype)
        else:
            q = rows.load("q", 0, chunk)
            o = _dot_nt(q * jnp.exp(b), state) + _dot(_dot_nt(q, k) * _pair_decay(b, chunk), v)
            o_ref[pl.ds(start, chunk), :] = o.astype(o_ref.dtype)
        b_last = rows.load("b", chunk - 1, 1)
        return state * jnp.exp(b_last) + _dot_tn(v, k * jnp.exp(b_last - b))

    final_ref[...] = lax.fori_loop(0, num_chunks, chunk_step, h0_ref[...])


def _backward_kernel(*refs, scale: float, has_decay: bool, per_channel: bool, chunk: int):
    """All chunks, last to first, of one (row, head, value tile): dq and dk (partial over
    value tiles), dv, and dh0^T, carrying dS^T."""
    if has_decay:
        q_ref, k_ref, v_ref, b_ref, states_ref, d_o_ref, d_final_ref, *outs = refs
    else:
        q_ref, k_ref, v_ref, states_ref, d_o_ref, d_final_ref, *outs = refs
        b_ref = None
    dq_ref, dk_ref, dv_ref, dh0_ref = outs
    num_chunks = q_ref.shape[0] // chunk
    refs = {"q": q_ref, "k": k_ref, "v": v_ref, "b": b_ref, "d_o": d_o_ref}

    def chunk_step(step, d_state):  # d_state: dS_{n+1}^T [V_tile, K']
        n = num_chunks - 1 - step
        start = n * chunk
        state = states_ref[n]  # S_n^T
        rows = _Chunk(refs, start, scale)
        q, d_o = rows.load("q", 0, chunk), rows.load("d_o", 0, chunk)
        if b_ref is None:
            query_decay = chunk_decay = jnp.ones((1, 1), _F32)
        else:
            b, b_last = rows.load("b", 0, chunk), rows.load("b", chunk - 1, 1)
            query_decay, chunk_decay = jnp.exp(b), jnp.exp(b_last)
        if per_channel:
            for i in range(chunk // SUB_CHUNK):
                d_q = _sub_chunk_dq(rows, state, i)
                dq_ref[pl.ds(start + i * SUB_CHUNK, SUB_CHUNK), :] = d_q
            for j in range(chunk // SUB_CHUNK):
                d_k, d_v = _sub_chunk_dk_dv(rows, d_state, b_last, j, chunk // SUB_CHUNK)
                dk_ref[pl.ds(start + j * SUB_CHUNK, SUB_CHUNK), :] = d_k
                dv_ref[pl.ds(start + j * SUB_CHUNK, SUB_CHUNK), :] = d_v
        else:
            k, v = rows.load("k", 0, chunk), rows.load("v", 0, chunk)
            key_decay = jnp.ones((1, 1), _F32) if b_ref is None else jnp.exp(b_last - b)
            decay = _pair_decay(None if b_ref is None else b, chunk)
            scores, d_scores = _dot_nt(q, k) * decay, _dot_nt(d_o, v) * decay
            d_q = query_decay * _dot(d_o, state) + _dot(d_scores, k)
            d_k = key_decay * _dot(v, d_state) + _dot_tn(d_scores, q)
            d_v = _dot_nt(k * key_decay, d_state) + _dot_tn(scores, d_o)
            dq_ref[pl.ds(start, chunk), :] = d_q
            dk_ref[pl.ds(start, chunk), :] = d_k
            dv_ref[pl.ds(start, chunk), :] = d_v
        return d_state * chunk_decay + _dot_tn(d_o, q * query_decay)  # dS_n^T

    dh0_ref[...] = lax.fori_loop(0, num_chunks, chunk_step, d_final_ref[...])


def _specs(q, v, b, config):
    """Grid and block specs shared by both passes: one program per (row, head, value tile)
    holding its whole sequence."""
    batch, heads, padded, key_pad = q.shape
    value_block = config.value_block
    num_chunks = padded // config.chunk
    grid = (batch, heads, v.shape[3] // value_block)
    specs = {
        "keys": pl.BlockSpec((None, None, padded, key_pad), lambda i, h, j: (i, h, 0, 0)),
        "values": pl.BlockSpec((None, None, padded, value_block), lambda i, h, j: (i, h, 0, j)),
        "state": pl.BlockSpec((None, None, value_block, key_pad), lambda i, h, j: (i, h, j, 0)),
        "states": pl.BlockSpec(
            (None, None, num_chunks, value_block, key_pad), lambda i, h, j: (i, h, 0, j, 0)
        ),
        # dq and dk of each value tile, summed over tiles by the caller.
        "partial_keys": pl.BlockSpec(
            (None, None, None, padded, key_pad), lambda i, h, j: (i, h, j, 0, 0)
        ),
    }
    if b is not None:
        specs["decay"] = pl.BlockSpec(
            (None, None, padded, b.shape[3]), lambda i, h, j: (i, h, 0, 0)
        )
    return grid, specs


def _call(kernel, grid, in_specs, out_specs, out_shape, config, name):
    sizes = config.sizes
    return pl.pallas_call(
        common.gpu_kernel(kernel, config.interpret),
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=common.gpu_params(sizes.num_warps, sizes.num_stages),
        interpret=common.interpret_params("gpu", config.interpret),
        name=name,
    )


def _kernel_options(q, b, config) -> dict:
    return {
        "scale": config.scale,
        "has_decay": b is not None,
        "per_channel": b is not None and b.shape[3] > 1,
        "chunk": config.chunk,
    }


def forward(q, k, v, b, h0_t, config):
    """`q, k: [B, H, T', K']`, `v: [B, H, T', V']`, `b: [B, H, T', G]` or None, `h0_t:
    [B, H, V', K']` -> `(o [B, H, T', V'], states [B, H, N, V', K'], final^T [B, H, V', K'])`."""
    batch, heads, padded, key_pad = q.shape
    num_chunks = padded // config.chunk
    grid, specs = _specs(q, v, b, config)
    inputs = [q, k, v] + ([] if b is None else [b])
    in_specs = [specs["keys"], specs["keys"], specs["values"]]
    in_specs += [] if b is None else [specs["decay"]]
    kernel = functools.partial(_forward_kernel, **_kernel_options(q, b, config))
    return _call(
        kernel,
        grid,
        [*in_specs, specs["state"]],
        [specs["values"], specs["states"], specs["state"]],
        [
            jax.ShapeDtypeStruct(v.shape, v.dtype),
            jax.ShapeDtypeStruct((batch, heads, num_chunks, v.shape[3], key_pad), _F32),
            jax.ShapeDtypeStruct(h0_t.shape, _F32),
        ],
        config,
        "gla_forward",
    )(*inputs, h0_t)


def backward(q, k, v, b, states, d_o, d_final_t, config):
    """Cotangents `d_o: [B, H, T', V']`, `d_final_t: [B, H, V', K']` -> `(dq, dk [B, H, T',
    K'], dv [B, H, T', V'], dh0^T [B, H, V', K'])`, float32; dq w.r.t. the scaled query."""
    batch, heads, padded, key_pad = q.shape
    grid, specs = _specs(q, v, b, config)
    inputs = [q, k, v] + ([] if b is None else [b])
    in_specs = [specs["keys"], specs["keys"], specs["values"]]
    in_specs += [] if b is None else [specs["decay"]]
    kernel = functools.partial(_backward_kernel, **_kernel_options(q, b, config))
    partial_shape = jax.ShapeDtypeStruct((batch, heads, grid[2], padded, key_pad), _F32)
    d_q, d_k, d_v, dh0_t = _call(
        kernel,
        grid,
        [*in_specs, specs["states"], specs["values"], specs["state"]],
        [specs["partial_keys"], specs["partial_keys"], specs["values"], specs["state"]],
        [
            partial_shape,
            partial_shape,
            jax.ShapeDtypeStruct(v.shape, _F32),
            jax.ShapeDtypeStruct(d_final_t.shape, _F32),
        ],
        config,
        "gla_backward",
    )(*inputs, states, d_o, d_final_t)
    return jnp.sum(d_q, axis=2), jnp.sum(d_k, axis=2), d_v, dh0_t
