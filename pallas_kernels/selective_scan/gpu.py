"""GPU (Triton lowering) kernels of the selective scan: forward and backward (equations in
`__init__`).

Layout. One program per `(batch row, D tile of F channels)`; its state `h [F, N]` lives in
registers. Triton programs run independently, so the walk over time is a `lax.fori_loop`
inside the kernel: over chunks, and within a chunk over tokens, each token reading its rows
`x_t, delta_t [F]` (contiguous in `[B, T, D]`) and `B_t, C_t [N]` (from `[B, G, T, N]`, the
tile's group) and writing `y_t [F]`. The forward stores the state entering every chunk
(`[B, T / C, D, N]`), the only thing the backward keeps besides the inputs.

Backward. The chunks are walked from last to first, carrying the adjoint state `g [F, N]`.
For each chunk the forward is re-run from the saved entering state, and the state entering
each token is kept in a `[C, F, N]` register tensor (written and read with a one-hot mask on
the token axis, since Triton has no dynamic indexing into registers); then the chunk's tokens
are walked backwards, each writing `dx_t, ddelta_t [F]` and this tile's share of
`dB_t, dC_t [N]` (partial sums over the tile's channels, added up per group by the wrapper);
`dA` and `dh0 [F, N]` are written once at the end. Per token that is `O(C F N)` mask work on
top of the `O(F N)` recurrence, which is why the GPU chunk is short.

Block sizes (`blocks.py`, rows "selective_scan", looked up by N; `F` is capped at the group
width rounded up to a power of 2, `N` is padded to a power of 2): C = 16, F = 32 for N <= 16;
C = 8, F = 4 for N <= 256. Nothing is staged in shared memory; registers per program at
N = 16: the state, its adjoint and `dA` are `F * N` = 512 float32 each, the chunk's states
`C * F * N` = 8192 float32 (32 KiB), i.e. about 80 registers per thread at 4 warps (128
threads); at N = 256 the chunk's states are 8 * 4 * 256 = 8192 float32 as well. One stage:
there is no software-pipelined block load to overlap.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import common


def _decay(delta_t, A, allow_neg_eigval):
    """`(e_t, a_t)`: `e_t = exp(delta_t A)` and the decay `a_t` (`2 e_t - 1` or `e_t`), `[F, N]`."""
    growth = jnp.exp(delta_t[:, None] * A)
    return growth, 2.0 * growth - 1.0 if allow_neg_eigval else growth


def _token(ref, t) -> jax.Array:
    """Row `t` of a `[T, K]` block, in float32."""
    return ref[t, :].astype(jnp.float32)


def _advance(h, A, x_ref, delta_ref, b_ref, t, allow_neg_eigval):
    """`h_t = a_t h_{t-1} + (delta_t x_t) B_t`, `[F, N]`."""
    delta_t = _token(delta_ref, t)
    _, a_t = _decay(delta_t, A, allow_neg_eigval)
    return a_t * h + (delta_t * _token(x_ref, t))[:, None] * _token(b_ref, t)[None, :]


def _forward_kernel(
    x_ref,  # [T, F]
    delta_ref,  # [T, F]
    a_ref,  # [F, N]
    b_ref,  # [T, N]: the tile's group
    c_ref,  # [T, N]
    h0_ref,  # [F, N]
    y_ref,  # [T, F]
    chunk_states_ref,  # [T / C, F, N]: the state entering every chunk
    final_ref,  # [F, N]
    *,
    chunk: int,
    allow_neg_eigval: bool,
):
    """`h_t = a_t h_{t-1} + (delta_t x_t) B_t`, `y_t = sum_n C_t h_t` over all tokens."""
    A = a_ref[...]

    def token(t, h):
        h = _advance(h, A, x_ref, delta_ref, b_ref, t, allow_neg_eigval)
        y_ref[t, :] = jnp.sum(h * _token(c_ref, t)[None, :], axis=1).astype(y_ref.dtype)
        return h

    def chunk_step(c, h):
        chunk_states_ref[c] = h
        return lax.fori_loop(c * chunk, (c + 1) * chunk, token, h)

    final_ref[...] = lax.fori_loop(0, chunk_states_ref.shape[0], chunk_step, h0_ref[...])


def _backward_kernel(
    x_ref,  # [T, F]
    delta_ref,  # [T, F]
    a_ref,  # [F, N]
    b_ref,  # [T, N]: the tile's group
    c_ref,  # [T, N]
    dy_ref,  # [T, F]
    chunk_states_ref,  # [T / C, F, N]
    dfinal_ref,  # [F, N]
    dx_ref,  # [T, F]
    ddelta_ref,  # [T, F]
    db_ref,  # [T, N]: dB summed over this tile's channels
    dc_ref,  # [T, N]: dC likewise
    da_ref,  # [F, N]: dA summed over this batch row's tokens
    dh0_ref,  # [F, N]
    *,
    chunk: int,
    allow_neg_eigval: bool,
):
    """The backward pass of one `(batch row, D tile)`: chunks last to first."""
    A = a_ref[...]
    num_chunks = chunk_states_ref.shape[0]
    doubling = 2.0 if allow_neg_eigval else 1.0
    position = lax.broadcasted_iota(jnp.int32, (chunk, *A.shape), 0)

    def chunk_step(k, carry):
        c = num_chunks - 1 - k
        start = c * chunk

        def record(s, carry):
            """Re-runs the forward one token, keeping `h_{t-1}` at position `s`."""
            h, states = carry
            states = jnp.where(position == s, h[None], states)
            return _advance(h, A, x_ref, delta_ref, b_ref, start + s, allow_neg_eigval), states

        no_states = jnp.zeros(position.shape, jnp.float32)
        _, states = lax.fori_loop(0, chunk, record, (chunk_states_ref[c], no_states))

        def token(r, carry):
            """Token `start + s`, `s = C - 1 - r`: writes its gradients, steps `g` back."""
            dh, da = carry
            s = chunk - 1 - r
            t = start + s
            x_t, delta_t, dy_t = _token(x_ref, t), _token(delta_ref, t), _token(dy_ref, t)
            b_t, c_t = _token(b_ref, t), _token(c_ref, t)
            h_prev = jnp.sum(jnp.where(position == s, states, 0.0), axis=0)
            growth, a_t = _decay(delta_t, A, allow_neg_eigval)
            u_t = delta_t * x_t  # [F]: what B_t multiplies
            h_t = a_t * h_prev + u_t[:, None] * b_t[None, :]
            dh = dh + dy_t[:, None] * c_t[None, :]  # g_t
            dc_ref[t, :] = jnp.sum(h_t * dy_t[:, None], axis=0)
            db_ref[t, :] = jnp.sum(dh * u_t[:, None], axis=0)
            du_t = jnp.sum(dh * b_t[None, :], axis=1)
            # g_t h_{t-1} da_t/d(delta_t A): the decay's share of ddelta_t and of dA.
            d_exponent = doubling * dh * h_prev * growth
            dx_ref[t, :] = delta_t * du_t
            ddelta_ref[t, :] = x_t * du_t + jnp.sum(A * d_exponent, axis=1)
            return a_t * dh, da + delta_t[:, None] * d_exponent

        return lax.fori_loop(0, chunk, token, carry)

    no_da = jnp.zeros(A.shape, jnp.float32)
    dh, da = lax.fori_loop(0, num_chunks, chunk_step, (dfinal_ref[...], no_da))
    dh0_ref[...] = dh
    da_ref[...] = da


def _call(kernel, config, x, A, in_specs, out_specs, out_shape, name):
    batch, _, width = x.shape
    return pl.pallas_call(
        functools.partial(kernel, chunk=config.chunk, allow_neg_eigval=config.allow_neg_eigval),
        grid=(batch, width // config.feature),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=common.gpu_params(config.num_warps, config.num_stages),
        interpret=common.interpret_params("gpu", config.interpret),
        name=name,
    )


def _specs(config, x, A):
    """Block specs on the grid `(batch b, D tile j)`: every program sees the whole time axis."""
    _, length, width = x.shape
    feature, state_size = config.feature, A.shape[1]
    tiles_per_group = width // feature // config.groups
    num_chunks = length // config.chunk
    tokens = pl.BlockSpec((None, length, feature), lambda b, j: (b, 0, j))
    decay = pl.BlockSpec((feature, state_size), lambda b, j: (j, 0))
    projection = pl.BlockSpec(
        (None, None, length, state_size), lambda b, j: (b, j // tiles_per_group, 0, 0)
    )
    projection_per_tile = pl.BlockSpec((None, None, length, state_size), lambda b, j: (b, j, 0, 0))
    state = pl.BlockSpec((None, feature, state_size), lambda b, j: (b, j, 0))
    chunk_states = pl.BlockSpec((None, num_chunks, feature, state_size), lambda b, j: (b, 0, j, 0))
    return tokens, decay, projection, projection_per_tile, state, chunk_states


def forward(config, x, delta, A, B, C, h0):
    """`x, delta: [B, T, D]`, `A: [D, N]`, `B, C: [B, T, G, N]`, `h0: [B, D, N]` (padded: T a
    multiple of the chunk, D of the tile, N a power of 2) -> `y [B, T, D]`, chunk states
    `[B, T / C, D, N]`, final state `[B, D, N]`."""
    batch, length, width = x.shape
    tokens, decay, projection, _, state, chunk_states = _specs(config, x, A)
    f32 = jnp.float32
    return _call(
        _forward_kernel,
        config,
        x,
        A,
        in_specs=[tokens, tokens, decay, projection, projection, state],
        out_specs=[tokens, chunk_states, state],
        out_shape=[
            jax.ShapeDtypeStruct(x.shape, x.dtype),
            jax.ShapeDtypeStruct((batch, length // config.chunk, width, A.shape[1]), f32),
            jax.ShapeDtypeStruct(h0.shape, f32),
        ],
        name="selective_scan_forward",
    )(x, delta, A, B.transpose(0, 2, 1, 3), C.transpose(0, 2, 1, 3), h0)


def backward(config, x, delta, A, B, C, chunk_states, dy, dfinal):
    """The inputs of `forward`, its chunk states and the cotangents `dy [B, T, D]`,
    `dfinal [B, D, N]` -> `dx, ddelta [B, T, D]`, `dA [B, D, N]` (per batch row),
    `dB, dC [B, D / F, T, N]` (per D tile), `dh0 [B, D, N]`, all float32."""
    batch, length, width = x.shape
    tokens, decay, projection, projection_per_tile, state, chunk_state_spec = _specs(config, x, A)
    f32 = jnp.float32
    per_tile = jax.ShapeDtypeStruct((batch, width // config.feature, length, A.shape[1]), f32)
    dx, ddelta, db, dc, da, dh0 = _call(
        _backward_kernel,
        config,
        x,
        A,
        in_specs=[tokens, tokens, decay, projection, projection, tokens, chunk_state_spec, state],
        out_specs=[tokens, tokens, projection_per_tile, projection_per_tile, state, state],
        out_shape=[
            jax.ShapeDtypeStruct(x.shape, f32),
            jax.ShapeDtypeStruct(x.shape, f32),
            per_tile,
            per_tile,
            jax.ShapeDtypeStruct(dfinal.shape, f32),
            jax.ShapeDtypeStruct(dfinal.shape, f32),
        ],
        name="selective_scan_backward",
    )(x, delta, A, B.transpose(0, 2, 1, 3), C.transpose(0, 2, 1, 3), dy, chunk_states, dfinal)
    return dx, ddelta, da, db, dc, dh0
