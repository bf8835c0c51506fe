"""TPU (Mosaic) kernels of the selective scan: forward and backward (equations in `__init__`).

Layout. The state of one `[D_tile]` slice of channels is kept as `h [N, F]` (`F` = the D tile,
128): channels on the 128 lanes, the state size `N` (often 16) on sublanes, so a state of
N = 16 fills two vector registers with no idle lane (`[F, N]` would use 16 of 128 lanes).
In that orientation a token's `x_t, delta_t` are rows `[1, F]` and its `B_t, C_t` columns
`[N, 1]`, so the wrapper passes

    x, delta, y:  [B, T, D]             blocks [C, F] (time on sublanes, channels on lanes)
    A^T:          [N, D]                block  [N, F]
    B^T, C^T:     [B, G, T / C, N, C]   blocks [N, C] (the tile's group; chunk-major, so that
                                        a block is the whole trailing [N, C] and C need not
                                        be a multiple of 128)
    h0, final:    [B, N, D]             blocks [N, F];  chunk states [B, T / C, N, D] likewise

The grid is `(B, D / F, T / C)`: batch and D tiles are independent ("parallel"), chunks come
last and in order ("arbitrary"; the backward visits them last to first through its index
maps). The state is carried across chunks in a VMEM scratch buffer, set from `h0` at the
first chunk.

Inside a chunk the tokens are stepped one at a time (each token's state is a whole `[N, F]`
matrix, so there is nothing to vectorize over time without materializing `[C, N, F]`
decays). Rows of the `[C, F]` blocks are read and written in aligned groups of 16 (one native
bfloat16 tile, two float32 ones); within a group, and for the columns of `B^T, C^T`, the
token's row or column is picked with a mask and a sum (Mosaic has no dynamic lane slicing,
and a mask over one 16-row group costs two vector registers). The token loops are rolled
`fori_loop`s. The backward kernel first re-runs the chunk forward from its saved entering
state, writing the state entering every token into a `[C, N, F]` VMEM scratch buffer, then
walks the chunk backwards carrying the adjoint state `g [N, F]` (in scratch across chunks);
`dB^T, dC^T` of a chunk are built as `[N, C]` values column by column and stored once.

Block sizes (`blocks.py`, rows "selective_scan", looked up by N): C = 128, F = 128 for
N <= 16; C = 32, F = 128 for N <= 256 (C must be a multiple of 16). VMEM at N = 16 (float32,
every block double-buffered by the pipeline): the forward's `x, delta, y` blocks are 64 KiB
each (384 KiB), `B^T, C^T` 8 KiB each (32 KiB), the `[N, F]` blocks 8 KiB each (64 KiB),
scratch 8 KiB: under 0.5 MiB. The backward adds `dy, dx, ddelta` (384 KiB), `dB^T, dC^T`
(32 KiB) and the states scratch `C * N * F * 4` = 1 MiB: about 2 MiB. At N = 256 the states
scratch is 32 * 256 * 128 * 4 = 4 MiB and the `[N, F]` blocks 128 KiB each (1.3 MiB): about
6 MiB. All inside the 16 MiB scoped VMEM of v5e / v6e.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import common

# Rows of a `[C, F]` block read or written at once: one bfloat16 tile, two float32 tiles.
ROWS = 16


class _Specs(NamedTuple):
    """The block specs of one pass, on the grid `(batch b, D tile j, chunk step s)`."""

    tokens: pl.BlockSpec  # [B, T, D] -> [C, F]
    decay: pl.BlockSpec  # [N, D] -> [N, F]
    projection: pl.BlockSpec  # [B, G, T / C, N, C] -> [N, C], the tile's group
    projection_per_tile: pl.BlockSpec  # [B, D / F, T / C, N, C] -> [N, C], the tile's own
    state: pl.BlockSpec  # [B, N, D] -> [N, F]
    chunk_state: pl.BlockSpec  # [B, T / C, N, D] -> [N, F]


def _specs(chunk, feature, state_size, tiles_per_group, num_chunks, reverse) -> _Specs:
    def chunk_at(s):
        return num_chunks - 1 - s if reverse else s

    return _Specs(
        tokens=pl.BlockSpec((None, chunk, feature), lambda b, j, s: (b, chunk_at(s), j)),
        decay=pl.BlockSpec((state_size, feature), lambda b, j, s: (0, j)),
        projection=pl.BlockSpec(
            (None, None, None, state_size, chunk),
            # The tile's group; `lax.div` as `j >= 0` (`//` lowers through a sign).
            lambda b, j, s: (b, lax.div(j, tiles_per_group), chunk_at(s), 0, 0),
        ),
        projection_per_tile=pl.BlockSpec(
            (None, None, None, state_size, chunk), lambda b, j, s: (b, j, chunk_at(s), 0, 0)
        ),
        state=pl.BlockSpec((None, state_size, feature), lambda b, j, s: (b, 0, j)),
        chunk_state=pl.BlockSpec(
            (None, None, state_size, feature), lambda b, j, s: (b, chunk_at(s), 0, j)
        ),
    )


def _column(columns: jax.Array, t) -> jax.Array:
    """Column `t` of `[N, C]` as `[N, 1]` (a lane mask and a lane sum)."""
    lane = lax.broadcasted_iota(jnp.int32, columns.shape, 1)
    return jnp.sum(jnp.where(lane == t, columns, 0.0), axis=1, keepdims=True)


def _with_column(columns: jax.Array, t, column: jax.Array) -> jax.Array:
    """`[N, C]` with column `t` replaced by `column [N, 1]`."""
    lane = lax.broadcasted_iota(jnp.int32, columns.shape, 1)
    return jnp.where(lane == t, column, columns)


def _row(rows: jax.Array, j) -> jax.Array:
    """Row `j` of `[R, F]` as `[1, F]` (a sublane mask and a sublane sum)."""
    sublane = lax.broadcasted_iota(jnp.int32, rows.shape, 0)
    return jnp.sum(jnp.where(sublane == j, rows, 0.0), axis=0, keepdims=True)


def _with_row(rows: jax.Array, j, row: jax.Array) -> jax.Array:
    """`[R, F]` with row `j` replaced by `row [1, F]`."""
    sublane = lax.broadcasted_iota(jnp.int32, rows.shape, 0)
    return jnp.where(sublane == j, row, rows)


def _decay(delta_t, A, allow_neg_eigval):
    """`(e_t, a_t)`: `e_t = exp(delta_t A)` and the decay `a_t` (`2 e_t - 1` or `e_t`), `[N, F]`."""
    growth = jnp.exp(delta_t * A)
    return growth, 2.0 * growth - 1.0 if allow_neg_eigval else growth


def _row_group(ref, i) -> jax.Array:
    """Rows `[16 i, 16 i + 16)` of a `[C, F]` block, in float32."""
    return ref[pl.ds(pl.multiple_of(i * ROWS, ROWS), ROWS), :].astype(jnp.float32)


def _store_row_group(ref, i, rows: jax.Array) -> None:
    ref[pl.ds(pl.multiple_of(i * ROWS, ROWS), ROWS), :] = rows.astype(ref.dtype)


def _forward_kernel(
    x_ref,  # [C, F]
    delta_ref,  # [C, F]
    a_ref,  # [N, F]: A^T
    b_ref,  # [N, C]: B^T
    c_ref,  # [N, C]: C^T
    h0_ref,  # [N, F]
    y_ref,  # [C, F]
    chunk_state_ref,  # [N, F]: the state entering this chunk
    final_ref,  # [N, F]
    h_ref,  # scratch [N, F]: the state, carried across chunks
    *,
    allow_neg_eigval: bool,
):
    """`h_t = a_t h_{t-1} + (delta_t x_t) B_t`, `y_t = sum_n C_t h_t` over one chunk."""
    step = pl.program_id(2)

    @pl.when(step == 0)
    def _():
        h_ref[...] = h0_ref[...]

    chunk_state_ref[...] = h_ref[...]
    A = a_ref[...]
    b_columns = b_ref[...].astype(jnp.float32)
    c_columns = c_ref[...].astype(jnp.float32)

    def row_group(i, h):
        x, delta = _row_group(x_ref, i), _row_group(delta_ref, i)

        def token(j, carry):
            h, y = carry
            t = i * ROWS + j
            delta_t = _row(delta, j)
            _, a_t = _decay(delta_t, A, allow_neg_eigval)
            h = a_t * h + _column(b_columns, t) * (delta_t * _row(x, j))
            y = _with_row(y, j, jnp.sum(_column(c_columns, t) * h, axis=0, keepdims=True))
            return h, y

        h, y = lax.fori_loop(0, ROWS, token, (h, jnp.zeros(x.shape, jnp.float32)))
        _store_row_group(y_ref, i, y)
        return h

    h = lax.fori_loop(0, x_ref.shape[0] // ROWS, row_group, h_ref[...])
    h_ref[...] = h

    @pl.when(step == pl.num_programs(2) - 1)
    def _():
        final_ref[...] = h


def _backward_kernel(
    x_ref,  # [C, F]
    delta_ref,  # [C, F]
    a_ref,  # [N, F]: A^T
    b_ref,  # [N, C]: B^T
    c_ref,  # [N, C]: C^T
    dy_ref,  # [C, F]
    chunk_state_ref,  # [N, F]: the state entering this chunk
    dfinal_ref,  # [N, F]
    dx_ref,  # [C, F]
    ddelta_ref,  # [C, F]
    db_ref,  # [N, C]: dB^T summed over this D tile's channels
    dc_ref,  # [N, C]: dC^T likewise
    da_ref,  # [N, F]: dA^T summed over this batch row's tokens
    dh0_ref,  # [N, F]
    states_ref,  # scratch [C, N, F]: the state entering every token of the chunk
    dh_ref,  # scratch [N, F]: the adjoint state g, carried across chunks
    da_acc_ref,  # scratch [N, F]: dA^T so far
    *,
    allow_neg_eigval: bool,
):
    """One chunk of the backward pass (chunks visited last to first)."""
    step = pl.program_id(2)

    @pl.when(step == 0)
    def _():
        dh_ref[...] = dfinal_ref[...]
        da_acc_ref[...] = jnp.zeros(da_acc_ref.shape, jnp.float32)

    A = a_ref[...]
    b_columns = b_ref[...].astype(jnp.float32)
    c_columns = c_ref[...].astype(jnp.float32)
    num_groups = x_ref.shape[0] // ROWS
    doubling = 2.0 if allow_neg_eigval else 1.0

    def record_group(i, h):
        """Re-runs the forward over 16 tokens, saving `h_{t-1}` for each token `t`."""
        x, delta = _row_group(x_ref, i), _row_group(delta_ref, i)

        def token(j, h):
            t = i * ROWS + j
            states_ref[t] = h
            delta_t = _row(delta, j)
            _, a_t = _decay(delta_t, A, allow_neg_eigval)
            return a_t * h + _column(b_columns, t) * (delta_t * _row(x, j))

        return lax.fori_loop(0, ROWS, token, h)

    lax.fori_loop(0, num_groups, record_group, chunk_state_ref[...])

    def reverse_group(k, carry):
        """The tokens of group `num_groups - 1 - k`, last to first."""
        i = num_groups - 1 - k
        x, delta, dy = _row_group(x_ref, i), _row_group(delta_ref, i), _row_group(dy_ref, i)

        def token(r, carry):
            dh, da, db_columns, dc_columns, dx, ddelta = carry
            j = ROWS - 1 - r
            t = i * ROWS + j
            x_t, delta_t, dy_t = _row(x, j), _row(delta, j), _row(dy, j)
            b_t = _column(b_columns, t)
            h_prev = states_ref[t]
            growth, a_t = _decay(delta_t, A, allow_neg_eigval)
            u_t = delta_t * x_t  # [1, F]: what B_t multiplies
            h_t = a_t * h_prev + b_t * u_t
            dh = dh + _column(c_columns, t) * dy_t  # g_t
            dc_columns = _with_column(dc_columns, t, jnp.sum(h_t * dy_t, axis=1, keepdims=True))
            db_columns = _with_column(db_columns, t, jnp.sum(dh * u_t, axis=1, keepdims=True))
            du_t = jnp.sum(dh * b_t, axis=0, keepdims=True)  # [1, F]
            # g_t h_{t-1} da_t/d(delta_t A): the decay's share of ddelta_t and of dA.
            d_exponent = doubling * dh * h_prev * growth
            dx = _with_row(dx, j, delta_t * du_t)
            ddelta = _with_row(
                ddelta, j, x_t * du_t + jnp.sum(A * d_exponent, axis=0, keepdims=True)
            )
            da = da + delta_t * d_exponent
            dh = a_t * dh  # the part of g_{t-1} that comes through h_t
            return dh, da, db_columns, dc_columns, dx, ddelta

        no_rows = jnp.zeros(x.shape, jnp.float32)
        *carry, dx, ddelta = lax.fori_loop(0, ROWS, token, (*carry, no_rows, no_rows))
        _store_row_group(dx_ref, i, dx)
        _store_row_group(ddelta_ref, i, ddelta)
        return tuple(carry)

    no_columns = jnp.zeros(b_columns.shape, jnp.float32)
    dh, da, db_columns, dc_columns = lax.fori_loop(
        0, num_groups, reverse_group, (dh_ref[...], da_acc_ref[...], no_columns, no_columns)
    )
    db_ref[...] = db_columns
    dc_ref[...] = dc_columns
    dh_ref[...] = dh
    da_acc_ref[...] = da

    @pl.when(step == pl.num_programs(2) - 1)
    def _():
        dh0_ref[...] = dh
        da_ref[...] = da


def _chunk_major(projection: jax.Array, chunk: int) -> jax.Array:
    """`[B, T, G, N]` -> `[B, G, T / C, N, C]`: a chunk's `B^T` is a whole `[N, C]` block, so `C`
    need not be a multiple of the 128 lanes."""
    batch, length, groups, state_size = projection.shape
    split = projection.reshape(batch, length // chunk, chunk, groups, state_size)
    return split.transpose(0, 3, 1, 4, 2)


def _time_major(per_chunk: jax.Array) -> jax.Array:
    """`[B, K, T / C, N, C]` -> `[B, K, T, N]` (the inverse layout change of `_chunk_major`)."""
    batch, tiles, num_chunks, state_size, chunk = per_chunk.shape
    rows = per_chunk.transpose(0, 1, 2, 4, 3)
    return rows.reshape(batch, tiles, num_chunks * chunk, state_size)


def _sizes(config, x, A):
    batch, length, width = x.shape
    tiles = width // config.feature
    return batch, length, width, A.shape[1], tiles, tiles // config.groups


def forward(config, x, delta, A, B, C, h0):
    """`x, delta: [B, T, D]`, `A: [D, N]`, `B, C: [B, T, G, N]`, `h0: [B, D, N]` (padded: T a
    multiple of the chunk, D of the tile) -> `y [B, T, D]`, chunk states `[B, T / C, N, D]`
    (this module's layout, for `backward`), final state `[B, D, N]`."""
    batch, length, width, state_size, tiles, tiles_per_group = _sizes(config, x, A)
    num_chunks = length // config.chunk
    specs = _specs(
        config.chunk, config.feature, state_size, tiles_per_group, num_chunks, reverse=False
    )
    f32 = jnp.float32
    y, chunk_states, final = pl.pallas_call(
        functools.partial(_forward_kernel, allow_neg_eigval=config.allow_neg_eigval),
        grid=(batch, tiles, num_chunks),
        in_specs=[
            specs.tokens,
            specs.tokens,
            specs.decay,
            specs.projection,
            specs.projection,
            specs.state,
        ],
        out_specs=[specs.tokens, specs.chunk_state, specs.state],
        out_shape=[
            jax.ShapeDtypeStruct(x.shape, x.dtype),
            jax.ShapeDtypeStruct((batch, num_chunks, state_size, width), f32),
            jax.ShapeDtypeStruct((batch, state_size, width), f32),
        ],
        scratch_shapes=[pltpu.VMEM((state_size, config.feature), f32)],
        compiler_params=common.tpu_params("parallel", "parallel", "arbitrary"),
        interpret=common.interpret_params("tpu", config.interpret),
        name="selective_scan_forward",
    )(
        x,
        delta,
        A.T,
        _chunk_major(B, config.chunk),
        _chunk_major(C, config.chunk),
        h0.transpose(0, 2, 1),
    )
    return y, chunk_states, final.transpose(0, 2, 1)


def backward(config, x, delta, A, B, C, chunk_states, dy, dfinal):
    """The inputs of `forward`, its chunk states and the cotangents `dy [B, T, D]`,
    `dfinal [B, D, N]` -> `dx, ddelta [B, T, D]`, `dA [B, D, N]` (per batch row),
    `dB, dC [B, D / F, T, N]` (per D tile), `dh0 [B, D, N]`, all float32."""
    batch, length, width, state_size, tiles, tiles_per_group = _sizes(config, x, A)
    num_chunks = length // config.chunk
    specs = _specs(
        config.chunk, config.feature, state_size, tiles_per_group, num_chunks, reverse=True
    )
    f32 = jnp.float32
    per_tile = jax.ShapeDtypeStruct((batch, tiles, num_chunks, state_size, config.chunk), f32)
    state = jax.ShapeDtypeStruct((batch, state_size, width), f32)
    dx, ddelta, db, dc, da, dh0 = pl.pallas_call(
        functools.partial(_backward_kernel, allow_neg_eigval=config.allow_neg_eigval),
        grid=(batch, tiles, num_chunks),
        in_specs=[
            specs.tokens,
            specs.tokens,
            specs.decay,
            specs.projection,
            specs.projection,
            specs.tokens,
            specs.chunk_state,
            specs.state,
        ],
        out_specs=[
            specs.tokens,
            specs.tokens,
            specs.projection_per_tile,
            specs.projection_per_tile,
            specs.state,
            specs.state,
        ],
        out_shape=[
            jax.ShapeDtypeStruct(x.shape, f32),
            jax.ShapeDtypeStruct(x.shape, f32),
            per_tile,
            per_tile,
            state,
            state,
        ],
        scratch_shapes=[
            pltpu.VMEM((config.chunk, state_size, config.feature), f32),
            pltpu.VMEM((state_size, config.feature), f32),
            pltpu.VMEM((state_size, config.feature), f32),
        ],
        compiler_params=common.tpu_params("parallel", "parallel", "arbitrary"),
        interpret=common.interpret_params("tpu", config.interpret),
        name="selective_scan_backward",
    )(
        x,
        delta,
        A.T,
        _chunk_major(B, config.chunk),
        _chunk_major(C, config.chunk),
        dy,
        chunk_states,
        dfinal.transpose(0, 2, 1),
    )
    return (
        dx,
        ddelta,
        da.transpose(0, 2, 1),
        _time_major(db),
        _time_major(dc),
        dh0.transpose(0, 2, 1),
    )
