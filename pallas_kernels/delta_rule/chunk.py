"""The equations of one chunk, shared by the TPU and the GPU kernels.

Functions of values (not refs), all float32 and 2-D, for one chunk of `C` tokens and one tile
of `BV` value columns: `q, k: [C, K]` (`q` already scaled), `v: [C, BV]`, the entering state
`S: [K, BV]`. A per-token scalar comes as a column `[C, 1]` (indexed by the row token `t`)
and, where a `[C, C]` matrix needs it along its columns, as a row `[1, C]` (token `s`): both
backends broadcast those natively, and neither needs a transpose of a vector.

Notation (package docstring): `b_t` the in-chunk cumulative log-decay (`b_t = g_1 + ... + g_t`),
`E_ts = exp(b_t - b_s)` for `s <= t` (0 above the diagonal), `gamma = exp(b_C)`, the keys seen
from the chunk's end `K~_s = exp(b_C - b_s) k_s`, and the UT transform

    A_ts = beta_t E_ts k_t . k_s   (s < t),   T = (I + A)^-1,
    U = T diag(beta) V,   W = T diag(beta exp(b)) K,   u = U - W S,
    o = diag(exp(b)) Q S + (E * Q K^T) u,     S_leaving = gamma S + K~^T u.

Every matmul runs at float32-level precision (`common.dot_precision()`: `HIGHEST`, or 3xTF32
in the compiled GPU kernels): the triangular inverse and the state pass compound rounding
errors over chunks, and TF32 / one-pass bfloat16 products would cost about three decimal
digits.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import common


def dot(a: jax.Array, b: jax.Array) -> jax.Array:
    """`a @ b`, float32 accumulation."""
    return lax.dot_general(
        a,
        b,
        (((1,), (0,)), ((), ())),
        precision=common.dot_precision(),
        preferred_element_type=jnp.float32,
    )


def dot_tn(a: jax.Array, b: jax.Array) -> jax.Array:
    """`a^T @ b` without materializing the transpose."""
    return lax.dot_general(
        a,
        b,
        (((0,), (0,)), ((), ())),
        precision=common.dot_precision(),
        preferred_element_type=jnp.float32,
    )


def dot_nt(a: jax.Array, b: jax.Array) -> jax.Array:
    """`a @ b^T` without materializing the transpose."""
    return lax.dot_general(
        a,
        b,
        (((1,), (1,)), ((), ())),
        precision=common.dot_precision(),
        preferred_element_type=jnp.float32,
    )


def total(x: jax.Array) -> jax.Array:
    """The sum of a 2-D array as a `[1, 1]` array (one axis at a time: Triton reduces one)."""
    return jnp.sum(jnp.sum(x, axis=1, keepdims=True), axis=0, keepdims=True)


def _token_grid(size: int) -> tuple[jax.Array, jax.Array]:
    """Row token `t` and column token `s` of a `[C, C]` matrix."""
    rows = lax.broadcasted_iota(jnp.int32, (size, size), 0)
    cols = lax.broadcasted_iota(jnp.int32, (size, size), 1)
    return rows, cols


def unit_lower_inverse(a: jax.Array) -> jax.Array:
    """`(I + a)^-1` for strictly lower-triangular `a: [C, C]`, `C` a power of 2, by matmuls.

    Blocked doubling: `X` starts as the inverse of the diagonal of `I + a` (the identity) and
    after the step of width `w` is the inverse of its block-diagonal part with blocks of `2w`
    tokens. Each `2w` block is `[[I + a11, 0], [a21, I + a22]]`, whose inverse is
    `[[X11, 0], [-X22 a21 X11, X22]]`; with `a_w` holding only the `a21` blocks (rows in the
    lower half of a `2w` block, columns in its upper half), all blocks at once are

        X <- X - X a_w X.

    `log2 C` steps of two `[C, C]` matmuls. Unlike the power series `prod (I + (-a)^(2^i))`,
    whose intermediate powers of `a` grow far beyond the inverse when `beta` is near 2 and
    keys are aligned (cancelling catastrophically in float32), every `X` here holds blocks
    of the true inverse: block forward substitution, as stable as the row-by-row one.
    """
    size = a.shape[0]
    rows, cols = _token_grid(size)
    inverse = (rows == cols).astype(jnp.float32)
    width, shift = 1, 0
    while width < size:
        row_block, col_block = rows >> shift, cols >> shift
        coupling = (row_block == col_block + 1) & ((row_block & 1) == 1)
        inverse = inverse - dot(dot(inverse, jnp.where(coupling, a, 0.0)), inverse)
        width, shift = width * 2, shift + 1
    return inverse


class ChunkTerms(NamedTuple):
    """What the forward pass computes inside a chunk and the backward pass recomputes."""

    decay: jax.Array  # E [C, C]
    keys: jax.Array  # K K^T [C, C]
    scores: jax.Array  # Q K^T [C, C] (unmasked)
    a: jax.Array  # A [C, C]
    inverse: jax.Array  # T = (I + A)^-1 [C, C]
    u_part: jax.Array  # U [C, BV]
    w_part: jax.Array  # W [C, K]
    u: jax.Array  # u = U - W S [C, BV]
    exp_b: jax.Array  # exp(b_t) [C, 1]
    leaving_decay: jax.Array  # exp(b_C - b_t) [C, 1]
    gamma: jax.Array  # exp(b_C) [1, 1]


def chunk_terms(q, k, v, beta, b_col, b_row, state) -> ChunkTerms:
    """The UT transform and the writes `u` of one chunk entered with `state`.

    `beta, b_col: [C, 1]`, `b_row: [1, C]` (the same `b` as a row).
    """
    size = q.shape[0]
    rows, cols = _token_grid(size)
    # Masked before the exponent matters: above the diagonal b_t - b_s >= 0 may overflow.
    decay = jnp.where(rows >= cols, jnp.exp(b_col - b_row), 0.0)
    last = lax.broadcasted_iota(jnp.int32, (size, 1), 0) == size - 1
    b_last = jnp.sum(jnp.where(last, b_col, 0.0), axis=0, keepdims=True)
    keys = dot_nt(k, k)
    a = jnp.where(rows > cols, beta * decay * keys, 0.0)
    inverse = unit_lower_inverse(a)
    exp_b = jnp.exp(b_col)
    u_part = dot(inverse, beta * v)
    w_part = dot(inverse, (beta * exp_b) * k)
    u = u_part - dot(w_part, state)
    return ChunkTerms(
        decay=decay,
        keys=keys,
        scores=dot_nt(q, k),
        a=a,
        inverse=inverse,
        u_part=u_part,
        w_part=w_part,
        u=u,
        exp_b=exp_b,
        leaving_decay=jnp.exp(b_last - b_col),
        gamma=jnp.exp(b_last),
    )


def forward(q, k, v, beta, b_col, b_row, state) -> tuple[jax.Array, jax.Array]:
    """`(o [C, BV], S_leaving [K, BV])` of one chunk:

    o = diag(exp(b)) Q S + (E * Q K^T) u,   S_leaving = gamma S + K~^T u.
    """
    x = chunk_terms(q, k, v, beta, b_col, b_row, state)
    o = dot(x.exp_b * q, state) + dot(x.decay * x.scores, x.u)
    leaving = x.gamma * state + dot_tn(x.leaving_decay * k, x.u)
    return o, leaving


class ChunkGradients(NamedTuple):
    """Gradients of one chunk (one value tile's share of those summed over value tiles)."""

    dq: jax.Array  # [C, K], w.r.t. the scaled q
    dk: jax.Array  # [C, K]
    dv: jax.Array  # [C, BV]
    d_beta: jax.Array  # [C, 1]
    d_b_col: jax.Array  # [C, 1]: d b = d_b_col + d_b_row (transposed)
    d_b_row: jax.Array  # [1, C]
    d_state: jax.Array  # [K, BV], w.r.t. the entering state


def backward(q, k, v, beta, b_col, b_row, state, d_o, d_leaving) -> ChunkGradients:
    """The gradients of one chunk, given those of its output `d_o: [C, BV]` and of the state
    it leaves, `d_leaving: [K, BV]` (equations in the package docstring)."""
    x = chunk_terms(q, k, v, beta, b_col, b_row, state)
    size = q.shape[0]
    rows, cols = _token_grid(size)
    last = lax.broadcasted_iota(jnp.int32, (size, 1), 0) == size - 1
    leaving_keys = x.leaving_decay * k
    decayed_q = x.exp_b * q

    # Through o and S_leaving, to u and the entering state.
    d_u = dot_tn(x.decay * x.scores, d_o) + dot(leaving_keys, d_leaving)
    d_state = dot_tn(decayed_q, d_o) + x.gamma * d_leaving - dot_tn(x.w_part, d_u)
    d_scores = x.decay * dot_nt(d_o, x.u)  # (dO_t . u_s) E_ts
    u_leaving = dot_nt(x.u, d_leaving)  # rows: u_s^T dS_leaving^T
    dq = x.exp_b * dot_nt(d_o, state) + dot(d_scores, k)
    dk = dot_tn(d_scores, q) + x.leaving_decay * u_leaving

    # Through u = U - W S and the UT transform.
    d_w = -dot_nt(d_u, state)
    d_rhs_u = dot_tn(x.inverse, d_u)  # (I + A)^-T dU
    d_rhs_w = dot_tn(x.inverse, d_w)
    d_a = jnp.where(rows > cols, -(dot_nt(d_rhs_u, x.u_part) + dot_nt(d_rhs_w, x.w_part)), 0.0)
    d_keys = d_a * beta * x.decay  # dA_ts beta_t E_ts, the gradient of k_t . k_s
    rhs_w_dot_k = jnp.sum(d_rhs_w * k, axis=1, keepdims=True)
    dv = beta * d_rhs_u
    d_beta = (
        jnp.sum(d_rhs_u * v, axis=1, keepdims=True)
        + x.exp_b * rhs_w_dot_k
        + jnp.sum(d_a * x.decay * x.keys, axis=1, keepdims=True)
    )
    dk = dk + (beta * x.exp_b) * d_rhs_w + dot(d_keys, k) + dot_tn(d_keys, k)

    # The decays: every exp(b_t - b_s) gives +b_t and -b_s, exp(b_t) +b_t, gamma +b_C.
    pair_scores = d_scores * x.scores  # through E in o
    pair_a = d_a * x.a  # through E in A
    leaving_share = jnp.sum(leaving_keys * u_leaving, axis=1, keepdims=True)  # through K~
    to_last = x.gamma * total(d_leaving * state) + total(leaving_share)
    d_b_col = (
        jnp.sum(d_o * dot(decayed_q, state), axis=1, keepdims=True)
        + jnp.sum(pair_scores, axis=1, keepdims=True)
        + jnp.sum(pair_a, axis=1, keepdims=True)
        + (beta * x.exp_b) * rhs_w_dot_k
        - leaving_share
        + jnp.where(last, to_last, 0.0)
    )
    d_b_row = -jnp.sum(pair_scores, axis=0, keepdims=True) - jnp.sum(pair_a, axis=0, keepdims=True)
    return ChunkGradients(dq, dk, dv, d_beta, d_b_col, d_b_row, d_state)
