"""GPU (Triton lowering) kernel of the diagonal recurrence `h_t = a_t * h_{t-1} + b_t`.

One program per (batch row, tile of F features): the grid is `(B, D / F)`, and each program
walks the whole sequence of its tile with a loop over tokens, keeping the state `h [F]`
(float32) in registers. Triton programs run independently, so the sequential axis is this loop,
not a grid axis.

Reading one token per loop step would leave one load of F values in flight per program and
make every step wait out the memory latency. The loop therefore advances C tokens per step
(the block table's `chunk`): it issues the 2 C row loads of `a` and `b` first, all independent
of the state, then runs the C dependent multiply-adds and stores. The T mod C remaining tokens
take a second loop, one token per step, so T needs no padding (Triton's power-of-2 rule only
concerns the loaded shapes, `[F]`).

Reverse (`h_t = a_t h_{t+1} + b_t`) maps loop step i to token T - 1 - i: no flipped copies.
D is padded to a multiple of F (a power of 2); the padded features are sliced off. The Triton
lowering computes element offsets in int32, so the padded arrays must hold fewer than 2^31
elements (`offsets_fit_int32`; larger inputs are reported unsupported).

Block sizes (`blocks.py`, row "linear_recurrence"): F = 128 features, C = 16 tokens per step,
4 warps (one feature per thread), 1 stage (nothing is staged through shared memory: the loads
go straight to registers, 2 C + 1 values per thread, well below the register budget). No
shared memory is used. Many small programs (B * D / 128) keep many loads in flight across the
SMs, which is what a memory-bound scan needs. These sizes follow from that reasoning; they have
not been measured on a GPU yet.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import blocks, common


def _kernel(a_ref, b_ref, h0_ref, h_ref, h_last_ref, *, tokens_per_step: int, reverse: bool):
    """One batch row and feature tile over the whole sequence.

    Refs: `a_ref, b_ref, h_ref: [T, F]`; `h0_ref, h_last_ref: [F]`.
    """
    length = a_ref.shape[0]

    def token(i):
        return length - 1 - i if reverse else i

    def advance(first, count: int, h):
        """`count` (static) tokens from loop position `first`: loads first, then the chain."""
        times = [token(first + r) for r in range(count)]
        a_rows = [a_ref[t, :].astype(jnp.float32) for t in times]
        b_rows = [b_ref[t, :].astype(jnp.float32) for t in times]
        for t, a_t, b_t in zip(times, a_rows, b_rows, strict=True):
            h = a_t * h + b_t
            h_ref[t, :] = h.astype(h_ref.dtype)
        return h

    whole = length // tokens_per_step * tokens_per_step
    h = lax.fori_loop(
        0,
        whole // tokens_per_step,
        lambda step, h: advance(step * tokens_per_step, tokens_per_step, h),
        h0_ref[...],
    )
    if whole < length:
        h = lax.fori_loop(whole, length, lambda i, h: advance(i, 1, h), h)
    h_last_ref[...] = h


def _feature_tile(dim: int, max_feature: int) -> tuple[int, int]:
    """`(feature, padded_dim)`: a power-of-2 tile of at most `max_feature` features and D
    padded to a multiple of it."""
    feature = min(max_feature, common.next_power_of_2(dim))
    return feature, common.round_up(dim, feature)


def offsets_fit_int32(shape: tuple[int, int, int], dtype) -> bool:
    """Whether the padded `[B, T, D]` arrays index with int32 offsets, as the Triton lowering
    computes them."""
    batch, length, dim = shape
    sizes = blocks.block_sizes("gpu", "linear_recurrence", dim, dtype)
    return batch * length * _feature_tile(dim, sizes.feature)[1] < 2**31


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

    `chunk_size` (None: the block table's) is the number of tokens loaded per loop step.
    """
    batch, length, dim = b.shape
    sizes = blocks.block_sizes("gpu", "linear_recurrence", dim, b.dtype)
    tokens_per_step = min(chunk_size or sizes.chunk, length)
    feature, padded_dim = _feature_tile(dim, sizes.feature)
    a = common.pad_axis(a, 2, feature)
    b = common.pad_axis(b, 2, feature)
    h0 = common.pad_axis(h0, 1, feature)

    sequence_spec = pl.BlockSpec((None, length, feature), lambda i, f: (i, 0, f))
    state_spec = pl.BlockSpec((None, feature), lambda i, f: (i, f))
    h, h_last = pl.pallas_call(
        functools.partial(_kernel, tokens_per_step=tokens_per_step, reverse=reverse),
        grid=(batch, padded_dim // feature),
        in_specs=[sequence_spec, sequence_spec, state_spec],
        out_specs=[sequence_spec, state_spec],
        out_shape=[
            jax.ShapeDtypeStruct(b.shape, out_dtype),
            jax.ShapeDtypeStruct(h0.shape, jnp.float32),
        ],
        compiler_params=common.gpu_params(sizes.num_warps, sizes.num_stages),
        interpret=common.interpret_params("gpu", interpret),
        name="linear_recurrence_gpu",
    )(a, b, h0)
    return h[:, :, :dim], h_last[:, :dim]
