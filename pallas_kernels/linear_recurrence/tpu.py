"""TPU (Mosaic) kernel of the diagonal recurrence `h_t = a_t * h_{t-1} + b_t` over `[B, T, D]`.

Layout. `a, b, h: [B, T, D]` stay as they are: a block `[C, F]` (C tokens by F features) puts
time on sublanes and features on lanes, so it is a stack of (8, 128) tiles with no transpose
in the wrapper. The grid is `(B, D / F, T / C)`: batch and feature tiles are independent
("parallel"), time blocks come last and in order ("arbitrary"). The state `h [1, F]` (float32)
lives in a VMEM scratch buffer across time blocks, set from `h0` at the first block.

Inside a block. Stepping one token (one sublane row) at a time would use 1/8 of every vector
register and make C dependent steps. Instead the block is loaded and stored in groups of R rows,
one native tile of the narrowest dtype (8 rows of 32-bit values, 16 when a bfloat16 array is
involved), computed in float32, and each 8-row piece (one float32 vector register tall) is
solved in three moves:

1. a log-step (Hillis-Steele) scan down the 8 rows, with sublane rotations: 3 steps of
   `(a_r, b_r) <- (a_r a_{r-s}, a_r b_{r-s} + b_r)` for s = 1, 2, 4, leaving
   `decay_r = a_r ... a_1` and `state_r` (the recurrence at row r from a zero state);
2. `h_r = decay_r * h_in + state_r`, with the entering state `h_in` broadcast over the rows;
3. the piece's last row is the `h_in` of the next piece.

So a block of C tokens costs C / 8 dependent steps, each a few full-width vector operations,
and no rotation crosses a vector register.

Reverse (`h_t = a_t h_{t+1} + b_t`) is done by index maps, not by flipping in the wrapper: the
time blocks are visited from last to first, the groups of a block likewise, and the scan within
a group runs toward row 0. Flipping `a`, `b` and `h` in HBM would cost three extra passes over
memory for a kernel that is memory-bound.

Padding. T is padded to whole blocks with `a = 1, b = 0`, which carries the state unchanged, so
the final state is that of the real tokens in either direction; D above 128 is padded to a
multiple of 128 (a block of D <= 128 features is the whole axis, which Mosaic accepts). Both
are no-ops for the usual shapes (T a multiple of C, D a multiple of 128).

Block sizes (`blocks.py`, row "linear_recurrence"): C = 256 tokens, F = 512 features. VMEM:
the `a`, `b` and `h` blocks are C * F * 4 = 512 KiB each in float32 (256 KiB in bfloat16),
double-buffered by the pipeline: 3 MiB; the `h0` and `h_last` blocks and the scratch state are
`[1, F]` (16 KiB each once padded to 8 sublanes). About 3.1 MiB in all, well inside the 16 MiB
scoped VMEM of v5e / v6e. One grid step moves 1.5 MiB of HBM traffic, enough to hide the
per-step overhead (~0.35 us) behind the copies. These sizes follow from that reasoning; they
have not been measured on a TPU yet.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import blocks, common

LANES = 128
SUBLANES = 8


def group_rows(*dtypes) -> int:
    """Rows of one native tile for the narrowest dtype: 8 (32-bit), 16 (16-bit)."""
    return max(SUBLANES * 4 // jnp.dtype(dtype).itemsize for dtype in dtypes)


def _scan_rows(a: jax.Array, b: jax.Array, reverse: bool) -> tuple[jax.Array, jax.Array]:
    """Inclusive scan of the maps `h -> a_r h + b_r` down the rows of `[R, F]` tiles (up them
    when `reverse`). Returns `(decay, state)`: `decay_r` is the product of `a` from the first
    row to row r, `state_r` the recurrence at row r from a zero state, so that
    `h_r = decay_r * h_in + state_r`.

    After the step with shift s, row r holds the composition of the maps of rows (r - 2s, r]:
    composing `(a_p, b_p)` (earlier rows) then `(a_r, b_r)` gives `(a_r a_p, a_r b_p + b_r)`.
    Rows with no earlier row at distance s compose with the identity map `(1, 0)`.
    """
    rows = a.shape[0]
    row = lax.broadcasted_iota(jnp.int32, a.shape, 0)
    shift = 1
    while shift < rows:
        # `roll(x, k)[r] = x[r - k]`: k = s brings row r - s to row r, k = R - s row r + s.
        if reverse:
            amount, has_earlier = rows - shift, row < rows - shift
        else:
            amount, has_earlier = shift, row >= shift
        a_earlier = jnp.where(has_earlier, pltpu.roll(a, amount, 0), 1.0)
        b_earlier = jnp.where(has_earlier, pltpu.roll(b, amount, 0), 0.0)
        a, b = a * a_earlier, a * b_earlier + b
        shift *= 2
    return a, b


def _kernel(a_ref, b_ref, h0_ref, h_ref, h_last_ref, state_ref, *, rows: int, reverse: bool):
    """One `[C, F]` time block of one batch row and feature tile.

    Refs: `a_ref, b_ref, h_ref: [C, F]`; `h0_ref, h_last_ref, state_ref: [1, F]`.
    """

    @pl.when(pl.program_id(2) == 0)
    def _():
        state_ref[...] = h0_ref[...]

    num_groups = a_ref.shape[0] // rows

    def group_step(i, h_in):
        group = num_groups - 1 - i if reverse else i
        span = pl.ds(pl.multiple_of(group * rows, rows), rows)
        a = a_ref[span, :].astype(jnp.float32)
        b = b_ref[span, :].astype(jnp.float32)
        # A 16-row group is scanned as two 8-row halves, so that every rotation stays within
        # one float32 vector register.
        starts = range(0, rows, SUBLANES)
        h_pieces = {}
        for start in reversed(starts) if reverse else starts:
            piece = slice(start, start + SUBLANES)
            decay, state = _scan_rows(a[piece], b[piece], reverse)
            h = decay * h_in + state
            h_pieces[start] = h
            # The state leaving the piece: its last row in the direction of the recurrence.
            h_in = h[:1] if reverse else h[SUBLANES - 1 :]
        h_ref[span, :] = jnp.concatenate([h_pieces[s] for s in starts]).astype(h_ref.dtype)
        return h_in

    state = lax.fori_loop(0, num_groups, group_step, state_ref[...])
    state_ref[...] = state
    # Written at every block (it is [1, F]); the last block's value is the final state.
    h_last_ref[...] = state


def _feature_tile(dim: int, max_feature: int) -> tuple[int, int]:
    """`(feature, padded_dim)`: the whole axis when D <= 128, else the widest multiple of 128
    up to `max_feature` that divides D rounded up to 128."""
    if dim <= LANES:
        return dim, dim
    padded = common.round_up(dim, LANES)
    feature = max(f for f in range(LANES, max(max_feature, LANES) + 1, LANES) if padded % f == 0)
    return feature, padded


def linear_recurrence(
    a: jax.Array,
    b: jax.Array,
    h0: jax.Array,
    *,
    reverse: bool,
    out_dtype,
    chunk_size: int | None,
    interpret: bool,
) -> tuple[jax.Array, jax.Array]:
    """`(h [B, T, D] in out_dtype, h_last [B, D] float32)` of `h_t = a_t h_{t-1} + b_t`
    (`h_t = a_t h_{t+1} + b_t` when `reverse`) from `h0 [B, D]` float32.

    `chunk_size` (None: the block table's) is the time block C, rounded up to whole R-row
    groups and capped at T rounded up likewise.
    """
    batch, length, dim = b.shape
    sizes = blocks.block_sizes("tpu", "linear_recurrence", dim, b.dtype)
    rows = group_rows(a.dtype, b.dtype, out_dtype)
    chunk = common.round_up(min(chunk_size or sizes.chunk, length), rows)
    feature, padded_dim = _feature_tile(dim, sizes.feature)

    # a = 1, b = 0 past the end carries the state through the padding unchanged.
    a = common.pad_axis(common.pad_axis(a, 1, chunk, value=1.0), 2, feature)
    b = common.pad_axis(common.pad_axis(b, 1, chunk), 2, feature)
    h0 = common.pad_axis(h0, 1, feature)[:, None, :]
    num_blocks = a.shape[1] // chunk

    def time_block(j):
        return num_blocks - 1 - j if reverse else j

    sequence_spec = pl.BlockSpec((None, chunk, feature), lambda i, f, j: (i, time_block(j), f))
    state_spec = pl.BlockSpec((None, 1, feature), lambda i, f, j: (i, 0, f))
    h, h_last = pl.pallas_call(
        functools.partial(_kernel, rows=rows, reverse=reverse),
        grid=(batch, padded_dim // feature, num_blocks),
        in_specs=[sequence_spec, sequence_spec, state_spec],
        out_specs=[sequence_spec, state_spec],
        out_shape=[
            jax.ShapeDtypeStruct(a.shape, out_dtype),
            jax.ShapeDtypeStruct(h0.shape, jnp.float32),
        ],
        scratch_shapes=[pltpu.VMEM((1, feature), jnp.float32)],
        compiler_params=common.tpu_params("parallel", "parallel", "arbitrary"),
        interpret=common.interpret_params("tpu", interpret),
        name="linear_recurrence_tpu",
    )(a, b, h0)
    return h[:, :length, :dim], h_last[:, 0, :dim]
