"""GPU (Triton lowering) kernels of the chunked delta rule: one forward and one backward kernel.

Triton programs run independently, so each program owns one `(batch, head, value tile)` and
walks the chunks itself in a `lax.fori_loop`, carrying the `[K, BV]` state (forward) or its
cotangent (backward, chunks in reverse) as the loop carry. The inputs keep the op's layout
`[B, T, H, K]` (a program reads its head's rows with strided `pl.ds` slices, so no transpose);
the wrapper pads `K` to a power of 2 (at least 16, Triton's smallest dot) and `V` to whole
value tiles. Per-token scalars are `[B, T, H]`, read as `[C]` vectors and broadcast to the
columns / rows that `chunk` takes.

- forward: at chunk `n`, store the entering state `S_n` (the backward pass's residual) into
  `states: [B, H, N, K, V]`, compute the UT transform, the writes and the output, and carry
  `S_{n+1}` (`chunk.forward`); after the loop, store the final state.
- backward: from the final state's cotangent, chunk `n` (last to first) recomputes its terms
  from `S_n`, writes its gradients and carries `dS_n` (`chunk.backward`). Gradients summed
  over value tiles (`dq, dk, dbeta, db`) are written per tile and summed by the wrapper.

Sizes (rows of `blocks.py`, float32 working tiles): the backward pass is the larger one,
with about six `[C, K]` tiles (q, k, W, dR_W, dq, dk), three `[K, BV]` (S, dS_leaving, dS),
eight `[C, C]` and eight `[C, BV]` live per chunk:

    K <= 64:  C = 32, BV = 64:  6 x 8 + 3 x 16 + 8 x 4 + 8 x 8 KiB   ~ 190 KiB, 4 warps
    K <= 128: C = 32, BV = 32:  6 x 16 + 3 x 16 + 8 x 4 + 8 x 4 KiB  ~ 210 KiB, 4 warps
    K <= 256: C = 16, BV = 32:  6 x 16 + 3 x 32 + 8 x 1 + 8 x 2 KiB  ~ 215 KiB, 8 warps

i.e. near one SM's register file (256 KiB) and beyond one program's share (255 registers a
thread: 128 KiB at 4 warps), so Triton spills part of it to local memory (L1 / L2): correct,
but slower than fla's split of each pass into separately launched kernels with smaller live
sets. Shared memory holds only staged dot operands (at most two `[C, K]` tiles, 32 KiB, twice
with `num_stages = 2`), inside 227 KiB (H100) and 99 KiB (consumer parts). These sizes follow
from the arithmetic above and are not tuned on a device.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import common
from pallas_kernels.blocks import BlockSizes
from pallas_kernels.delta_rule import chunk

MIN_DOT = 16  # Triton's smallest dot operand side


def _load_chunk(q_ref, k_ref, v_ref, beta_ref, b_ref, tokens, scale):
    """Chunk `tokens` (a `pl.ds`) as float32 in `chunk`'s convention."""
    beta = beta_ref[tokens]
    b = b_ref[tokens]
    return (
        q_ref[tokens, :].astype(jnp.float32) * scale,
        k_ref[tokens, :].astype(jnp.float32),
        v_ref[tokens, :].astype(jnp.float32),
        beta[:, None],
        b[:, None],
        b[None, :],
    )


def _forward_kernel(
    q_ref,
    k_ref,
    v_ref,
    beta_ref,
    b_ref,
    h0_ref,
    o_ref,
    states_ref,
    final_ref,
    *,
    scale,
    chunk_size,
    num_chunks,
):
    """One program: `q, k: [T, K]`, `v, o: [T, BV]`, `beta, b: [T]`, `h0, final: [K, BV]`,
    `states: [N, K, BV]`."""

    def step(n, state):
        tokens = pl.ds(pl.multiple_of(n * chunk_size, chunk_size), chunk_size)
        states_ref[n] = state
        inputs = _load_chunk(q_ref, k_ref, v_ref, beta_ref, b_ref, tokens, scale)
        o, leaving = chunk.forward(*inputs, state)
        o_ref[tokens, :] = o.astype(o_ref.dtype)
        return leaving

    final_ref[...] = lax.fori_loop(0, num_chunks, step, h0_ref[...].astype(jnp.float32))


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
    *,
    scale,
    chunk_size,
    num_chunks,
):
    """One program, chunks last to first; the carry is the cotangent of the state leaving
    the chunk."""

    def step(i, d_leaving):
        n = num_chunks - 1 - i
        tokens = pl.ds(pl.multiple_of(n * chunk_size, chunk_size), chunk_size)
        inputs = _load_chunk(q_ref, k_ref, v_ref, beta_ref, b_ref, tokens, scale)
        d_o = d_o_ref[tokens, :].astype(jnp.float32)
        grads = chunk.backward(*inputs, states_ref[n], d_o, d_leaving)
        dq_ref[tokens, :] = grads.dq * scale
        dk_ref[tokens, :] = grads.dk
        dv_ref[tokens, :] = grads.dv
        d_beta_ref[tokens] = grads.d_beta.reshape(chunk_size)
        d_b_ref[tokens] = grads.d_b_col.reshape(chunk_size) + grads.d_b_row.reshape(chunk_size)
        return grads.d_state

    d_h0_ref[...] = lax.fori_loop(0, num_chunks, step, d_final_ref[...].astype(jnp.float32))


def _padded_dims(key_dim: int, value_dim: int, sizes: BlockSizes) -> tuple[int, int, int]:
    """`(K', BV, V')`: `K` to a power of 2 >= 16, `V` to whole power-of-2 tiles."""
    padded_k = max(MIN_DOT, common.next_power_of_2(key_dim))
    tile = min(sizes.value, max(MIN_DOT, common.next_power_of_2(value_dim)))
    return padded_k, tile, common.round_up(value_dim, tile)


def _pad_to(x: jax.Array, axis: int, size: int) -> jax.Array:
    return common.pad_axis(x, axis, size) if x.shape[axis] < size else x


def forward(q, k, v, beta, b, h0, *, scale, sizes: BlockSizes, chunk_size, interpret):
    """`(o [B, T, H, V], final [B, H, K, V], states [B, H, N, K', V'])` for `T` a multiple
    of `chunk_size`; `b` the in-chunk cumulative log-decays `[B, T, H]`; `states` (padded
    entering states of every chunk) is the residual that `backward` takes."""
    batch, length, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    padded_k, tile, padded_v = _padded_dims(key_dim, value_dim, sizes)
    num_chunks = length // chunk_size
    q, k = (_pad_to(x, 3, padded_k) for x in (q, k))
    v = _pad_to(v, 3, padded_v)
    h0 = _pad_to(_pad_to(h0.astype(jnp.float32), 2, padded_k), 3, padded_v)

    keys = pl.BlockSpec((None, length, None, padded_k), lambda b, h, j: (b, 0, h, 0))
    values = pl.BlockSpec((None, length, None, tile), lambda b, h, j: (b, 0, h, j))
    scalars = pl.BlockSpec((None, length, None), lambda b, h, j: (b, 0, h))
    state = pl.BlockSpec((None, None, padded_k, tile), lambda b, h, j: (b, h, 0, j))
    states = pl.BlockSpec((None, None, num_chunks, padded_k, tile), lambda b, h, j: (b, h, 0, 0, j))
    kernel = functools.partial(
        _forward_kernel, scale=scale, chunk_size=chunk_size, num_chunks=num_chunks
    )
    o, states_out, final = pl.pallas_call(
        common.gpu_kernel(kernel, interpret),
        grid=(batch, heads, padded_v // tile),
        in_specs=[keys, keys, values, scalars, scalars, state],
        out_specs=[values, states, state],
        out_shape=[
            jax.ShapeDtypeStruct((batch, length, heads, padded_v), v.dtype),
            jax.ShapeDtypeStruct((batch, heads, num_chunks, padded_k, padded_v), jnp.float32),
            jax.ShapeDtypeStruct((batch, heads, padded_k, padded_v), jnp.float32),
        ],
        compiler_params=common.gpu_params(sizes.num_warps, sizes.num_stages),
        interpret=common.interpret_params("gpu", interpret),
    )(q, k, v, beta.astype(jnp.float32), b.astype(jnp.float32), h0)
    return o[..., :value_dim], final[:, :, :key_dim, :value_dim], states_out


def backward(
    q, k, v, beta, b, states, d_o, d_final, *, scale, sizes: BlockSizes, chunk_size, interpret
):
    """Float32 `(dq, dk, dv, dbeta, db, dh0)` in the layouts of the inputs of `forward`
    (`db` w.r.t. the cumulative `b`), given `states` from `forward` and the cotangents
    `d_o: [B, T, H, V]`, `d_final: [B, H, K, V]`."""
    batch, length, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    padded_k, tile, padded_v = _padded_dims(key_dim, value_dim, sizes)
    num_chunks, num_tiles = length // chunk_size, padded_v // tile
    q, k = (_pad_to(x, 3, padded_k) for x in (q, k))
    v, d_o = (_pad_to(x, 3, padded_v) for x in (v, d_o))
    d_final = _pad_to(_pad_to(d_final.astype(jnp.float32), 2, padded_k), 3, padded_v)

    keys = pl.BlockSpec((None, length, None, padded_k), lambda b, h, j: (b, 0, h, 0))
    values = pl.BlockSpec((None, length, None, tile), lambda b, h, j: (b, 0, h, j))
    scalars = pl.BlockSpec((None, length, None), lambda b, h, j: (b, 0, h))
    state = pl.BlockSpec((None, None, padded_k, tile), lambda b, h, j: (b, h, 0, j))
    states_spec = pl.BlockSpec(
        (None, None, num_chunks, padded_k, tile), lambda b, h, j: (b, h, 0, 0, j)
    )
    # Per value tile: partial sums over the tile's value columns.
    key_parts = pl.BlockSpec((None, None, length, None, padded_k), lambda b, h, j: (j, b, 0, h, 0))
    scalar_parts = pl.BlockSpec((None, None, length, None), lambda b, h, j: (j, b, 0, h))
    key_parts_shape = jax.ShapeDtypeStruct((num_tiles, batch, length, heads, padded_k), jnp.float32)
    scalar_parts_shape = jax.ShapeDtypeStruct((num_tiles, batch, length, heads), jnp.float32)
    kernel = functools.partial(
        _backward_kernel, scale=scale, chunk_size=chunk_size, num_chunks=num_chunks
    )
    dq, dk, dv, d_beta, d_b, d_h0 = pl.pallas_call(
        common.gpu_kernel(kernel, interpret),
        grid=(batch, heads, num_tiles),
        in_specs=[keys, keys, values, scalars, scalars, states_spec, values, state],
        out_specs=[key_parts, key_parts, values, scalar_parts, scalar_parts, state],
        out_shape=[
            key_parts_shape,
            key_parts_shape,
            jax.ShapeDtypeStruct((batch, length, heads, padded_v), jnp.float32),
            scalar_parts_shape,
            scalar_parts_shape,
            jax.ShapeDtypeStruct((batch, heads, padded_k, padded_v), jnp.float32),
        ],
        compiler_params=common.gpu_params(sizes.num_warps, sizes.num_stages),
        interpret=common.interpret_params("gpu", interpret),
    )(q, k, v, beta.astype(jnp.float32), b.astype(jnp.float32), states, d_o, d_final)
    return (
        dq.sum(0)[..., :key_dim],
        dk.sum(0)[..., :key_dim],
        dv[..., :value_dim],
        d_beta.sum(0),
        d_b.sum(0),
        d_h0[:, :, :key_dim, :value_dim],
    )
