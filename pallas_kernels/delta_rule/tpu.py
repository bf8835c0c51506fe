"""TPU (Mosaic) kernels of the chunked delta rule: one forward and one backward kernel.

Layout: head-major, `q, k: [B, H, T, K]`, `v: [B, H, T, V]`, so every block's last two dims
are `(C, K)` / `(C, BV)` (`C` a multiple of 8 sublanes, 16 for bfloat16; `K` the whole head,
`BV` 128 lanes or the whole `V`). Per-token scalars (`beta`, the in-chunk cumulative decay
`b`) are lane-dense rows `[B, H, N, 1, C]`, one row per chunk; the kernel turns a row into the
column it also needs with a masked lane reduction (exact, no transpose).

Grid `(B, H, V / BV, N)`: the chunk axis last and the only sequential one; the state of the
current value tile is carried across chunks in a VMEM scratch buffer.

- forward: at chunk `n`, store the entering state `S_n` (the backward pass's residual),
  compute the UT transform, the writes `u = U - W S_n`, the output and `S_{n+1}`
  (`chunk.forward`); the last chunk stores the final state.
- backward: the chunk axis runs in reverse; the scratch carries `dS_{n+1}` (the final
  state's cotangent at the start); chunk `n` recomputes its terms from the saved `S_n` and
  writes its gradients (`chunk.backward`), then leaves `dS_n`. Gradients summed over value
  tiles (`dq, dk, dbeta, db`) are written per tile and summed by the wrapper.

VMEM per grid step at the largest table row (K = 256, BV = 128, C = 64, float32 inputs),
double-buffered blocks: forward q, k 2 x 64 KiB each, v, o 2 x 32 KiB each, S_n, h0, final
2 x 128 KiB each, scratch 128 KiB, rows < 1 KiB: ~1.2 MiB; backward adds dO, dv, dq, dk
(~0.5 MiB) and the cotangent scratch. The in-chunk temporaries are a dozen `[C, C]` (16 KiB),
`[C, K]` (64 KiB) and `[C, BV]` (32 KiB) float32 arrays: ~1 MiB. All well inside the 16 MiB
scoped VMEM of v5e / v6e; `C = 64` keeps the `log2 C` doubling steps of the triangular
inverse short (fla's choice too), `BV = 128` one full lane tile.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import common
from pallas_kernels.blocks import BlockSizes
from pallas_kernels.delta_rule import chunk


def _row_to_column(row: jax.Array) -> jax.Array:
    """`[1, C] -> [C, 1]`: keep the diagonal of the broadcast row, reduce over lanes."""
    size = row.shape[1]
    eye = lax.broadcasted_iota(jnp.int32, (size, size), 0) == lax.broadcasted_iota(
        jnp.int32, (size, size), 1
    )
    return jnp.sum(jnp.where(eye, row, 0.0), axis=1, keepdims=True)


def _column_to_row(column: jax.Array) -> jax.Array:
    """`[C, 1] -> [1, C]`, the same way over sublanes."""
    size = column.shape[0]
    eye = lax.broadcasted_iota(jnp.int32, (size, size), 0) == lax.broadcasted_iota(
        jnp.int32, (size, size), 1
    )
    return jnp.sum(jnp.where(eye, column, 0.0), axis=0, keepdims=True)


def _load_chunk(q_ref, k_ref, v_ref, beta_ref, b_ref, scale):
    """The chunk's float32 inputs in `chunk`'s convention (scaled q, scalar columns)."""
    b_row = b_ref[...]
    return (
        q_ref[...].astype(jnp.float32) * scale,
        k_ref[...].astype(jnp.float32),
        v_ref[...].astype(jnp.float32),
        _row_to_column(beta_ref[...]),
        _row_to_column(b_row),
        b_row,
    )


def _forward_kernel(
    q_ref, k_ref, v_ref, beta_ref, b_ref, h0_ref, o_ref, states_ref, final_ref, state, *, scale
):
    """One chunk, one value tile: `q, k: [C, K]`, `v, o: [C, BV]`, rows `[1, C]`,
    `h0, states, final, state (scratch): [K, BV]`."""
    n = pl.program_id(3)

    @pl.when(n == 0)
    def _():
        state[...] = h0_ref[...].astype(jnp.float32)

    entering = state[...]
    states_ref[...] = entering
    o, leaving = chunk.forward(*_load_chunk(q_ref, k_ref, v_ref, beta_ref, b_ref, scale), entering)
    o_ref[...] = o.astype(o_ref.dtype)
    state[...] = leaving

    @pl.when(n == pl.num_programs(3) - 1)
    def _():
        final_ref[...] = leaving


def _backward_kernel(
    q_ref,
    k_ref,
    v_ref,
    beta_ref,
    b_ref,
    states_ref,
    d_o_ref,
    d_final_ref,
    dq_ref,
    dk_ref,
    dv_ref,
    d_beta_ref,
    d_b_ref,
    d_h0_ref,
    d_state,
    *,
    scale,
):
    """One chunk (the chunk axis reversed), one value tile; `d_state` (scratch) holds the
    cotangent of the state leaving this chunk."""
    n = pl.program_id(3)

    @pl.when(n == 0)
    def _():
        d_state[...] = d_final_ref[...]

    inputs = _load_chunk(q_ref, k_ref, v_ref, beta_ref, b_ref, scale)
    grads = chunk.backward(*inputs, states_ref[...], d_o_ref[...].astype(jnp.float32), d_state[...])
    dq_ref[...] = grads.dq * scale
    dk_ref[...] = grads.dk
    dv_ref[...] = grads.dv
    d_beta_ref[...] = _column_to_row(grads.d_beta)
    d_b_ref[...] = _column_to_row(grads.d_b_col) + grads.d_b_row
    d_state[...] = grads.d_state

    @pl.when(n == pl.num_programs(3) - 1)
    def _():
        d_h0_ref[...] = grads.d_state


def _head_major(x: jax.Array) -> jax.Array:
    """`[B, T, H, ...] -> [B, H, T, ...]`."""
    return jnp.swapaxes(x, 1, 2)


def _rows(x: jax.Array, size: int) -> jax.Array:
    """Per-token scalars `[B, T, H]` as float32 rows `[B, H, N, 1, C]`."""
    batch, length, heads = x.shape
    x = jnp.swapaxes(x, 1, 2).astype(jnp.float32)
    return x.reshape(batch, heads, length // size, 1, size)


def _from_rows(x: jax.Array) -> jax.Array:
    """`[B, H, N, 1, C] -> [B, T, H]`."""
    batch, heads = x.shape[:2]
    return jnp.swapaxes(x.reshape(batch, heads, -1), 1, 2)


def _value_tile(value_dim: int, sizes: BlockSizes) -> tuple[int, int]:
    """`(BV, padded V)`: the whole `V` when it fits one tile, else tiles of `sizes.value`."""
    if value_dim <= sizes.value:
        return value_dim, value_dim
    return sizes.value, common.round_up(value_dim, sizes.value)


def forward(q, k, v, beta, b, h0, *, scale, sizes: BlockSizes, chunk_size, interpret):
    """`(o [B, T, H, V], final [B, H, K, V], states [B, H, N, K, V'])` for `T` a multiple of
    `chunk_size`; `b` the in-chunk cumulative log-decays `[B, T, H]`, `h0: [B, H, K, V]`;
    `states` (the entering state of every chunk, `V` padded to whole tiles) is the residual
    that `backward` takes."""
    batch, length, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    tile, padded_v = _value_tile(value_dim, sizes)
    num_chunks, num_tiles = length // chunk_size, padded_v // tile
    v_hm = common.pad_axis(_head_major(v), 3, tile)
    h0 = common.pad_axis(h0.astype(jnp.float32), 3, tile)

    keys = pl.BlockSpec((None, None, chunk_size, key_dim), lambda b, h, j, n: (b, h, n, 0))
    values = pl.BlockSpec((None, None, chunk_size, tile), lambda b, h, j, n: (b, h, n, j))
    rows = pl.BlockSpec((None, None, None, 1, chunk_size), lambda b, h, j, n: (b, h, n, 0, 0))
    state = pl.BlockSpec((None, None, key_dim, tile), lambda b, h, j, n: (b, h, 0, j))
    states = pl.BlockSpec((None, None, None, key_dim, tile), lambda b, h, j, n: (b, h, n, 0, j))
    o, states_out, final = pl.pallas_call(
        functools.partial(_forward_kernel, scale=scale),
        grid=(batch, heads, num_tiles, num_chunks),
        in_specs=[keys, keys, values, rows, rows, state],
        out_specs=[values, states, state],
        out_shape=[
            jax.ShapeDtypeStruct((batch, heads, length, padded_v), v.dtype),
            jax.ShapeDtypeStruct((batch, heads, num_chunks, key_dim, padded_v), jnp.float32),
            jax.ShapeDtypeStruct((batch, heads, key_dim, padded_v), jnp.float32),
        ],
        scratch_shapes=[pltpu.VMEM((key_dim, tile), jnp.float32)],
        compiler_params=common.tpu_params("parallel", "parallel", "parallel", "arbitrary"),
        interpret=common.interpret_params("tpu", interpret),
    )(
        _head_major(q),
        _head_major(k),
        v_hm,
        _rows(beta, chunk_size),
        _rows(b, chunk_size),
        h0,
    )
    return _head_major(o[..., :value_dim]), final[..., :value_dim], states_out


def backward(
    q, k, v, beta, b, states, d_o, d_final, *, scale, sizes: BlockSizes, chunk_size, interpret
):
    """Float32 `(dq, dk, dv, dbeta, db, dh0)` in the layouts of the inputs of `forward`
    (`db` w.r.t. the cumulative `b`), given `states` from `forward` and the cotangents
    `d_o: [B, T, H, V]`, `d_final: [B, H, K, V]`."""
    batch, length, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    tile, padded_v = _value_tile(value_dim, sizes)
    num_chunks, num_tiles = length // chunk_size, padded_v // tile
    last = num_chunks - 1

    keys = pl.BlockSpec((None, None, chunk_size, key_dim), lambda b, h, j, n: (b, h, last - n, 0))
    values = pl.BlockSpec((None, None, chunk_size, tile), lambda b, h, j, n: (b, h, last - n, j))
    rows = pl.BlockSpec(
        (None, None, None, 1, chunk_size), lambda b, h, j, n: (b, h, last - n, 0, 0)
    )
    state = pl.BlockSpec((None, None, key_dim, tile), lambda b, h, j, n: (b, h, 0, j))
    states_spec = pl.BlockSpec(
        (None, None, None, key_dim, tile), lambda b, h, j, n: (b, h, last - n, 0, j)
    )
    # Per value tile: partial sums over the tile's value columns.
    key_parts = pl.BlockSpec(
        (None, None, None, chunk_size, key_dim), lambda b, h, j, n: (j, b, h, last - n, 0)
    )
    row_parts = pl.BlockSpec(
        (None, None, None, None, 1, chunk_size), lambda b, h, j, n: (j, b, h, last - n, 0, 0)
    )
    key_parts_shape = jax.ShapeDtypeStruct((num_tiles, batch, heads, length, key_dim), jnp.float32)
    row_parts_shape = jax.ShapeDtypeStruct(
        (num_tiles, batch, heads, num_chunks, 1, chunk_size), jnp.float32
    )
    dq, dk, dv, d_beta, d_b, d_h0 = pl.pallas_call(
        functools.partial(_backward_kernel, scale=scale),
        grid=(batch, heads, num_tiles, num_chunks),
        in_specs=[keys, keys, values, rows, rows, states_spec, values, state],
        out_specs=[key_parts, key_parts, values, row_parts, row_parts, state],
        out_shape=[
            key_parts_shape,
            key_parts_shape,
            jax.ShapeDtypeStruct((batch, heads, length, padded_v), jnp.float32),
            row_parts_shape,
            row_parts_shape,
            jax.ShapeDtypeStruct((batch, heads, key_dim, padded_v), jnp.float32),
        ],
        scratch_shapes=[pltpu.VMEM((key_dim, tile), jnp.float32)],
        compiler_params=common.tpu_params("parallel", "parallel", "parallel", "arbitrary"),
        interpret=common.interpret_params("tpu", interpret),
    )(
        _head_major(q),
        _head_major(k),
        common.pad_axis(_head_major(v), 3, tile),
        _rows(beta, chunk_size),
        _rows(b, chunk_size),
        states,
        common.pad_axis(_head_major(d_o), 3, tile),
        common.pad_axis(d_final.astype(jnp.float32), 3, tile),
    )
    return (
        _head_major(dq.sum(0)),
        _head_major(dk.sum(0)),
        _head_major(dv[..., :value_dim]),
        _from_rows(d_beta.sum(0)),
        _from_rows(d_b.sum(0)),
        d_h0[..., :value_dim],
    )
