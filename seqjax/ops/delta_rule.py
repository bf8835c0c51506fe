"""The delta-rule family: DeltaNet and Gated DeltaNet.

For each head, with a `[K, V]` matrix state and `scale` (default `K ** -0.5`) on the query,

    delta_rule:        S_t =          (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T
    gated_delta_rule:  S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T
                       o_t = S_t^T (scale q_t)

with `beta: [B, T, H]` and `g: [B, T, H] <= 0` (Yang et al., "Parallelizing Linear
Transformers with the Delta Rule over Sequence Length"; "Gated Delta Networks"; `fla.ops.
{delta_rule, gated_delta_rule}`). Any real `beta` is computed exactly; with L2-normalized keys
and `beta` in (0, 2) the transition `I - beta k k^T` has the eigenvalue `1 - beta` in (-1, 1)
along `k` (Grazzi et al., "Unlocking State-Tracking in Linear RNNs Through Negative
Eigenvalues"). The range of `beta` is the layer's business.

**The delta write.** `S_t = exp(g_t) S_{t-1} + k_t u_t^T` with the write
`u_t = beta_t (v_t - exp(g_t) S_{t-1}^T k_t)`: once the writes `u` are known, the delta rule is
`simple_gla` with values `u`. Inside a chunk entered with state `S`, with in-chunk cumulative
log-decay `b_t`, the writes solve a unit lower-triangular system (the UT transform of the WY
representation):

    (I + A) u = diag(beta) V - diag(beta exp(b)) K S,     A_ts = beta_t exp(b_t - b_s) k_t . k_s
                                                                   (s < t, else 0)
    u = U - W S,    U = (I + A)^-1 diag(beta) V,    W = (I + A)^-1 diag(beta exp(b)) K

`U` and `W` do not depend on `S`, so every chunk computes them at once. Only the pass
through the chunks is sequential (`delta_pass`): from the state `S_n` entering chunk n, its
writes and the state it passes on,

    u_n = U_n - W_n S_n,      S_{n+1} = exp(b_C) S_n + K~_n^T u_n,      K~_s = exp(b_C - b_s) k_s

two `C x K x V` matmuls per chunk; each chunk's output is then
`chunked_linear_attention.chunk_outputs` with values `u`. The chunk's transition in closed
form, `S_{n+1} = M S_n + D` with `M = exp(b_C) I - K~^T W` (`[K, K]`) and `D = K~^T U`
(`chunk_transition`), is what sequence parallelism composes across devices; the pass does not
form it: forming `M` and `D`, applying `M` and then computing the writes from the states
costs `K C K + K C V + K K V + C K V` multiply-adds per chunk, twice the pass's `2 C K V` at
K = V = C and 2.5 times at K = V = 2 C.

Impls: `"reference"` (the token loop above), `"chunked"` (the chunk form, a `custom_vjp` that
keeps only the inputs and the chunk-entering states, recomputes `U`, `W` in the backward
pass and runs the pass's cotangents back through the chunks, over blocks of chunks as the
engine's `chunked`; what `"auto"` picks), `"parallel"`
(the chunk form with one chunk as long as the sequence, differentiated by JAX; O(T^2) memory
and an O(T^3) solve, for short sequences and as a second reference), and `"pallas"` (the
kernels of `pallas_kernels.delta_rule`, see `seqjax.kernels`: what `"auto"` picks on TPU;
packed segments fall back to `"chunked"`). The chunked and Pallas impls support
reverse-mode differentiation only.
"""

from __future__ import annotations

import math
from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax

from seqjax import checks, kernels
from seqjax.ops import chunked_linear_attention as engine
from seqjax.ops.common import reset, scan_tokens
from seqjax.scan.linear_recurrence import accumulation_dtype

DeltaImpl = Literal["auto", "reference", "chunked", "parallel", "pallas"]
DELTA_IMPLS: tuple[str, ...] = ("auto", "reference", "chunked", "parallel", "pallas")
DEFAULT_CHUNK_SIZE = 64
# Rows of the diagonal blocks that `unit_lower_inverse` inverts by forward substitution;
# 16 measured fastest (of 1, 4, 8, 16) at C = 64.
SUBSTITUTION_BLOCK = 16


def _validate(q, k, v, g, beta, initial_state, segment_ids, impl, chunk_size) -> None:
    dims = checks.Dims()
    dims.check("q", q, "B T H K")
    checks.check_floating("q", q)
    _check_recurrence_inputs(dims, k, v, beta, g, initial_state, segment_ids, chunk_size)
    checks.check_choice("impl", impl, DELTA_IMPLS)


def _check_recurrence_inputs(dims, k, v, beta, g, initial_state, segment_ids, chunk_size):
    """The checks shared by the ops and the state functions (`chunk_states`, ...)."""
    dims.check("k", k, "B T H K")
    dims.check("v", v, "B T H V")
    dims.check("beta", beta, "B T H")
    for name, x in (("k", k), ("v", v), ("beta", beta)):
        checks.check_floating(name, x)
    if g is not None:
        dims.check("g", g, "B T H")
        checks.check_floating("g", g)
        checks.check_values("g", g <= 0, "log-decays g <= 0")
    if initial_state is not None:
        dims.check("initial_state", initial_state, "B H K V")
    checks.check_segment_ids(segment_ids, *k.shape[:2])
    checks.check_positive("chunk_size", chunk_size)


def _token_step(state, q_t, k_t, v_t, g_t, beta_t):
    """One token (scale already in `q_t`): `q_t, k_t: [B, H, K]`, `v_t: [B, H, V]`,
    `g_t, beta_t: [B, H]`. Returns the new state and `o_t: [B, H, V]`.

        S' = exp(g_t) S,   u_t = beta_t (v_t - S'^T k_t),   S_t = S' + k_t u_t^T
    """
    state = jnp.exp(g_t)[..., None, None] * state
    write = beta_t[..., None] * (v_t - jnp.einsum("bhk,bhkv->bhv", k_t, state))
    state = state + k_t[..., :, None] * write[..., None, :]
    return state, jnp.einsum("bhk,bhkv->bhv", q_t, state)


def _reference(q, k, v, g, beta, initial_state, segment_ids):
    def step(state, xs):
        start, (q_t, k_t, v_t, g_t, beta_t) = xs
        return _token_step(reset(start, state), q_t, k_t, v_t, g_t, beta_t)

    return scan_tokens(step, initial_state, (q, k, v, g, beta), segment_ids)


# ----------------------------------------------------------------------------- chunk form
# Arrays in the engine's layout: `[B, H, N, C, ...]`, `beta: [B, H, N, C]`, float32.


def ut_transform(
    k: jax.Array, v: jax.Array, beta: jax.Array, pot: engine.Potentials, counts: jax.Array | None
) -> tuple[jax.Array, jax.Array]:
    """`U: [B, H, N, C, V]` and `W: [B, H, N, C, K]` of every chunk (module docstring):
    `U = (I + A)^-1 diag(beta) V`, `W = (I + A)^-1 diag(beta exp(b)) K`.

    Segments: `A` pairs only tokens of one segment, and `W` is zero past the chunk's first
    segment start (those tokens do not see the entering state).
    """
    pairs = engine.pair_mask(counts, k.shape[3], strict=True)
    a = jnp.einsum("bhntk,bhnsk->bhnts", k, k) * engine.pair_weights(pot, pairs)
    beta = beta[..., None]
    return solve_unit_lower(beta * a, beta * v, beta * engine.entering_weight(pot, counts) * k)


@jax.custom_vjp
def solve_unit_lower(a: jax.Array, *rhs: jax.Array) -> tuple[jax.Array, ...]:
    """`x = (I + a)^-1 r` for strictly lower-triangular `a: [..., n, n]` and each `r` of `rhs`
    (`[..., n, m]`), one inverse for all.

    Its VJP is closed-form, `d_r = (I + a)^-T dx` and `d_a = -strict_tril(sum d_r x^T)` (the
    solve reads only the strictly lower part of `a`), rather than the derivative of every
    step of `unit_lower_inverse`. Separate right-hand sides rather than one concatenated:
    two `[n, n] x [n, m]` matmuls ran faster on XLA:CPU than one `[n, n] x [n, 2 m]`.
    """
    inverse = unit_lower_inverse(a)
    return tuple(inverse @ r for r in rhs)


def _solve_unit_lower_fwd(a, *rhs):
    inverse = unit_lower_inverse(a)
    xs = tuple(inverse @ r for r in rhs)
    return xs, (inverse, xs)


def _solve_unit_lower_bwd(residuals, dxs):
    inverse, xs = residuals
    d_rhs = tuple(jnp.swapaxes(inverse, -1, -2) @ dx for dx in dxs)
    d_a = sum(d_r @ jnp.swapaxes(x, -1, -2) for d_r, x in zip(d_rhs, xs, strict=True))
    return (-jnp.tril(d_a, -1), *d_rhs)


solve_unit_lower.defvjp(_solve_unit_lower_fwd, _solve_unit_lower_bwd)


def unit_lower_inverse(a: jax.Array) -> jax.Array:
    """`(I + a)^-1` for strictly lower-triangular `a: [..., n, n]`, by matmuls only.

    Blockwise, `[[I + a11, 0], [a21, I + a22]]^-1 = [[T11, 0], [-T22 a21 T11, T22]]`, with
    both diagonal blocks inverted at once (stacked) and recursively, down to blocks of
    `SUBSTITUTION_BLOCK` rows, which forward substitution inverts row by row. `n` is padded
    to such a block times a power of two (the padding is an identity block). XLA:CPU's
    triangular solve (a LAPACK call per matrix) measured 2x slower, and deadlocked on
    concurrent calls in jaxlib 0.10.2.
    """
    size = a.shape[-1]
    padded = SUBSTITUTION_BLOCK * 2 ** max(0, math.ceil(math.log2(size / SUBSTITUTION_BLOCK)))
    if size <= SUBSTITUTION_BLOCK:
        return _forward_substitution(a)
    if padded != size:
        widths = ((0, 0),) * (a.ndim - 2) + ((0, padded - size),) * 2
        return unit_lower_inverse(jnp.pad(a, widths))[..., :size, :size]
    half = size // 2
    t11, t22 = unit_lower_inverse(jnp.stack([a[..., :half, :half], a[..., half:, half:]]))
    t21 = -(t22 @ a[..., half:, :half] @ t11)
    top = jnp.concatenate([t11, jnp.zeros_like(t11)], -1)
    return jnp.concatenate([top, jnp.concatenate([t21, t22], -1)], -2)


def _forward_substitution(a: jax.Array) -> jax.Array:
    """`(I + a)^-1` row by row: `T_i = e_i - sum_{j < i} a_ij T_j` (rows j >= i of `T` are
    still those of I, and `a_ij = 0` there)."""
    size = a.shape[-1]
    inverse = jnp.broadcast_to(jnp.eye(size, dtype=a.dtype), a.shape)
    for i in range(1, size):
        inverse = inverse.at[..., i, :].add(-jnp.einsum("...j,...jk->...k", a[..., i, :], inverse))
    return inverse


def transitions(
    k: jax.Array, u_part: jax.Array, w_part: jax.Array, pot: engine.Potentials, counts
) -> tuple[jax.Array, jax.Array]:
    """Each chunk's `S_leaving = M S_entering + D`: `M: [B, H, N, K, K]`, `D: [B, H, N, K, V]`
    from `U = u_part`, `W = w_part` (`M = exp(b_C) I - K~^T W`, `D = K~^T U`)."""
    leaving = engine.leaving_keys(k, pot, counts)
    forgotten = jnp.einsum("bhnck,bhncj->bhnkj", leaving, w_part)
    identity = jnp.eye(k.shape[-1], dtype=k.dtype)
    increment = jnp.einsum("bhnck,bhncv->bhnkv", leaving, u_part)
    return engine.chunk_decay(pot, counts) * identity - forgotten, increment


def writes(u_part: jax.Array, w_part: jax.Array, states: jax.Array) -> jax.Array:
    """`u = U - W S: [B, H, N, C, V]`, every chunk's writes given its entering state."""
    return u_part - jnp.einsum("bhnck,bhnkv->bhncv", w_part, states)


def delta_pass(
    u_part: jax.Array, w_part: jax.Array, leaving: jax.Array, decay: jax.Array, state: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The sequential pass through the chunks, from `state: [B, H, K, V]`: for n in order,

        u_n = U_n - W_n S_n,        S_{n+1} = decay_n S_n + leaving_n^T u_n

    with `U = u_part`, `W = w_part`, `leaving = K~ = engine.leaving_keys: [B, H, N, C, K]`,
    `decay = engine.chunk_decay: [B, H, N, 1, 1]`.

    Returns the writes `u: [B, H, N, C, V]`, the states entering every chunk `[B, H, N, K, V]`
    and the final state.
    """
    num_chunks = u_part.shape[2]
    per_chunk = (u_part, w_part, leaving, decay)

    def step(n, carry):
        state, u, states = carry
        u_part_n, w_part_n, leaving_n, decay_n = (
            lax.dynamic_index_in_dim(x, n, 2, False) for x in per_chunk
        )
        u_n = u_part_n - jnp.einsum("bhck,bhkv->bhcv", w_part_n, state)
        states = lax.dynamic_update_index_in_dim(states, state, n, 2)
        u = lax.dynamic_update_index_in_dim(u, u_n, n, 2)
        state = decay_n * state + jnp.einsum("bhck,bhcv->bhkv", leaving_n, u_n)
        return state, u, states

    # Buffers made from the inputs they hold, so that they vary over the same manual mesh
    # axes under `shard_map` (sequence parallelism).
    states_shape = (*state.shape[:2], num_chunks, *state.shape[2:])
    buffers = (
        jnp.zeros_like(u_part),
        jnp.broadcast_to(jnp.zeros_like(state)[:, :, None], states_shape),
    )
    final, u, states = lax.fori_loop(0, num_chunks, step, (state, *buffers))
    return u, states, final


def _delta_pass_bwd(
    du_local: jax.Array,
    d_states: jax.Array,
    w_part: jax.Array,
    leaving: jax.Array,
    decay: jax.Array,
    d_final: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The cotangents of `delta_pass`, from the last chunk back: with `G` the cotangent of
    the state leaving chunk n (`d_final` for the last),

        du_n = du_local_n + leaving_n G,      dS_n = d_states_n + decay_n G - W_n^T du_n

    where `du_local`, `d_states` are the cotangents of the writes and the entering states
    through everything but the pass (the outputs, and `d_states` given by the caller).

    Returns `du: [B, H, N, C, V]`, the cotangents of the leaving states `[B, H, N, K, V]`
    and that of the initial state.
    """
    num_chunks = du_local.shape[2]
    per_chunk = (du_local, d_states, w_part, leaving, decay)

    def step(i, carry):
        d_leaving_state, du, d_leaving_states = carry
        n = num_chunks - 1 - i
        du_local_n, d_states_n, w_part_n, leaving_n, decay_n = (
            lax.dynamic_index_in_dim(x, n, 2, False) for x in per_chunk
        )
        du_n = du_local_n + jnp.einsum("bhck,bhkv->bhcv", leaving_n, d_leaving_state)
        du = lax.dynamic_update_index_in_dim(du, du_n, n, 2)
        d_leaving_states = lax.dynamic_update_index_in_dim(d_leaving_states, d_leaving_state, n, 2)
        d_state = (
            d_states_n + decay_n * d_leaving_state - jnp.einsum("bhck,bhcv->bhkv", w_part_n, du_n)
        )
        return d_state, du, d_leaving_states

    buffers = (jnp.zeros_like(du_local), jnp.zeros_like(d_states))
    d_initial, du, d_leaving_states = lax.fori_loop(0, num_chunks, step, (d_final, *buffers))
    return du, d_leaving_states, d_initial


def chunk_form(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    beta: jax.Array,
    pot: engine.Potentials,
    initial_state: jax.Array,
    counts: jax.Array | None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The delta rule in chunks, on `q, k: [B, H, N, C, K]`, `v: [B, H, N, C, V]`,
    `beta: [B, H, N, C]` (scale already in `q`), scalar-decay potentials, `initial_state:
    [B, H, K, V]`, `counts` from `engine.segment_counts` (or None).

    Returns `(o [B, H, N, C, V], final_state [B, H, K, V], states [B, H, N, K, V])`, the
    last being the states entering every chunk. `chunked` is this with a `custom_vjp`;
    `"parallel"` differentiates it plainly, with one chunk.
    """
    u, states, final = _writes_and_states(k, v, beta, pot, counts, initial_state)
    return engine.chunk_outputs(q, k, u, pot, counts, states, tile=None), final, states


def _writes_and_states(k, v, beta, pot, counts, initial_state):
    """The writes `u` of every chunk, the chunk-entering states and the final state."""
    u_part, w_part = ut_transform(k, v, beta, pot, counts)
    leaving = engine.leaving_keys(k, pot, counts)
    return delta_pass(u_part, w_part, leaving, engine.chunk_decay(pot, counts), initial_state)


# `engine.scan_blocks` axes of `(q, k, v, beta, pot, counts)`: `q, k, v` in
# `engine.time_chunks`, the rest in the engine's layout.
_AXES = (1, 1, 1, 2, 2, 2)


@jax.custom_vjp
def chunked(q, k, v, beta, pot, initial_state, counts):
    """`chunk_form` a block of chunks at a time (`engine.scan_blocks`), with `q, k, v` (and
    `o`) in `engine.time_chunks`, `[B, N, C, H, ...]`. Reverse-mode only: keeps the inputs and
    the chunk-entering states, recomputes the rest."""

    def block(state, xs):
        q, k, v = (engine.heads_first(x) for x in xs[:3])
        o, final, states = chunk_form(q, k, v, *xs[3:5], state, xs[5])
        return final, (engine.heads_last(o), states)

    xs = (q, k, v, beta, pot, counts)
    final, (o, states) = engine.scan_blocks(block, initial_state, xs, _AXES, (1, 2))
    return o, final, states


def _chunked_fwd(q, k, v, beta, pot, initial_state, counts):
    out = chunked(q, k, v, beta, pot, initial_state, counts)
    return out, (q, k, v, beta, pot, counts, out[2])


def _chunked_bwd(residuals, cotangents):
    d_out, d_final, d_states = cotangents
    xs = (*residuals, d_out, d_states)
    axes = (*_AXES, 2, 1, 2)
    d_initial, grads = engine.scan_blocks(_block_bwd, d_final, xs, axes, (1, 1, 1, 2, 2), True)
    dq, dk, dv, d_beta, d_pot = grads
    return dq, dk, dv, d_beta, d_pot, d_initial, None


def _block_bwd(d_final, xs):
    """The cotangents of one block's inputs and of the state entering it.

    The writes are recomputed from the kept entering states at once (`u = U - W S`); the
    outputs' cotangents then enter `_delta_pass_bwd`, whose cotangents of the writes and of
    the leaving states give those of `U`, `W`, `K~` and the chunk decay.
    """
    q, k, v, beta, pot, counts, states, d_out, d_states = xs
    q, k, v, d_out = (engine.heads_first(x) for x in (q, k, v, d_out))
    (u_part, w_part), ut_vjp = jax.vjp(
        lambda k, v, beta, pot: ut_transform(k, v, beta, pot, counts), k, v, beta, pot
    )
    (leaving, decay), gates_vjp = jax.vjp(
        lambda k, pot: (engine.leaving_keys(k, pot, counts), engine.chunk_decay(pot, counts)),
        k,
        pot,
    )
    u = writes(u_part, w_part, states)
    _, outputs_vjp = jax.vjp(
        lambda q, k, u, pot, states: engine.chunk_outputs(q, k, u, pot, counts, states, None),
        q,
        k,
        u,
        pot,
        states,
    )
    dq, dk, du_local, d_pot, d_states_read = outputs_vjp(d_out)
    du, d_leaving_states, d_initial = _delta_pass_bwd(
        du_local, d_states_read + d_states, w_part, leaving, decay, d_final
    )
    d_leaving = jnp.einsum("bhncv,bhnkv->bhnck", u, d_leaving_states)
    d_decay = jnp.sum(d_leaving_states * states, axis=(-2, -1), keepdims=True)
    dw_part = -jnp.einsum("bhncv,bhnkv->bhnck", du, states)
    dk2, d_pot2 = gates_vjp((d_leaving, d_decay))
    dk3, dv, d_beta, d_pot3 = ut_vjp((du, dw_part))
    d_pot = jax.tree.map(lambda *xs: sum(xs), d_pot, d_pot2, d_pot3)
    d_inputs = (engine.heads_last(x) for x in (dq, dk + dk2 + dk3, dv))
    return d_initial, (*d_inputs, d_beta, d_pot)


chunked.defvjp(_chunked_fwd, _chunked_bwd)


class _Chunks:
    """Inputs `[B, T, H, ...]` in chunks of `size` tokens, with their potentials and segment
    counts: `k, v` in `engine.time_chunks` (as `chunked` takes them), the rest in the
    engine's layout."""

    def __init__(self, k, v, g, beta, segment_ids, size):
        length = k.shape[1]
        self.pot = engine.decay_potentials(g[..., None], size)
        self.k, self.v = (engine.time_chunks(x, size) for x in (k, v))
        self.beta = engine.to_chunks(beta, size)
        self.counts = engine.segment_counts(segment_ids, length, size)

    def parts(self):
        """`k, v, beta, pot, counts`, all in the engine's layout."""
        k, v = engine.heads_first(self.k), engine.heads_first(self.v)
        return k, v, self.beta, self.pot, self.counts


def _prepare(k, v, g, beta, initial_state, extra=()):
    """Float32 (or wider) copies: `g` zeros when None, the initial state zeros when None."""
    batch, length, heads, key_dim = k.shape
    present = [x for x in (k, v, g, beta, initial_state, *extra) if x is not None]
    acc = accumulation_dtype(*(x.dtype for x in present))
    # Zeros typed like k: under `shard_map` they vary over k's manual axes, as the
    # cotangents that `chunked` returns for them do.
    if g is None:
        g = jnp.zeros_like(k, acc, shape=(batch, length, heads))
    if initial_state is None:
        initial_state = jnp.zeros_like(k, acc, shape=(batch, heads, key_dim, v.shape[-1]))
    return acc, (x.astype(acc) for x in (k, v, g, beta, initial_state))


def _run(q, k, v, g, beta, scale, initial_state, segment_ids, impl, chunk_size):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    args = (q, k, v, beta, g, initial_state)
    kernel = kernels.choose("delta_rule", impl, args, segment_ids)
    if kernel is not None:
        return kernel.delta_rule(*args, scale=scale, chunk_size=None, **kernels.options())
    acc, (k, v, g, beta, initial_state) = _prepare(k, v, g, beta, initial_state, (q,))
    q = q.astype(acc) * scale
    if impl == "reference":
        return _reference(q, k, v, g, beta, initial_state, segment_ids)
    length = q.shape[1]
    size = length if impl == "parallel" else min(chunk_size, length)
    chunks = _Chunks(k, v, g, beta, segment_ids, size)
    q = engine.time_chunks(q, size)
    if impl == "parallel":
        q, parts = engine.heads_first(q), chunks.parts()
        o, final, _ = chunk_form(q, *parts[:4], initial_state, chunks.counts)
        o = engine.heads_last(o)
    else:
        parts = (chunks.k, chunks.v, chunks.beta, chunks.pot)
        o, final, _ = chunked(q, *parts, initial_state, chunks.counts)
    return engine.from_time_chunks(o, length), final


def delta_rule(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    beta: jax.Array,
    *,
    scale: float | None = None,
    initial_state: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    impl: DeltaImpl = "auto",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[jax.Array, jax.Array]:
    """DeltaNet: `S_t = (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T`, `o_t = S_t^T q_t`.

    Args:
      q, k: `[B, T, H, K]` (DeltaNet L2-normalizes both; the op does not); v: `[B, T, H, V]`.
      beta: write strengths `[B, T, H]`, any real value (0..2 gives negative eigenvalues).
      scale: multiplies `q` (in `o_t`); None means `K ** -0.5`.
      initial_state: `[B, H, K, V]`; None: zeros.
      segment_ids: `[B, T]` ints; the state restarts at every new segment.
      impl: `"reference"`, `"chunked"`, `"parallel"`, `"pallas"` or `"auto"` (`"pallas"` on
        TPU, else `"chunked"`; see `seqjax.kernels.SLOWER_ON_GPU`).
      chunk_size: tokens per chunk of `"chunked"` (the kernels take theirs from
        `pallas_kernels.blocks`).

    Returns:
      `o: [B, T, H, V]` in the dtype of `v`, and the float32 state `[B, H, K, V]` after each
      row's last token.
    """
    _validate(q, k, v, None, beta, initial_state, segment_ids, impl, chunk_size)
    o, final = _run(q, k, v, None, beta, scale, initial_state, segment_ids, impl, chunk_size)
    return o.astype(v.dtype), final


def gated_delta_rule(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array,
    beta: jax.Array,
    *,
    scale: float | None = None,
    initial_state: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    impl: DeltaImpl = "auto",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[jax.Array, jax.Array]:
    """Gated DeltaNet: `S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T`.

    Args:
      q, k, v, beta: as in `delta_rule`.
      g: log-decays `[B, T, H]`, `g <= 0` (checked when concrete).
      scale, initial_state, segment_ids, impl, chunk_size: as in `delta_rule`.

    Returns:
      `o: [B, T, H, V]` in the dtype of `v`, and the float32 state `[B, H, K, V]`.
    """
    _validate(q, k, v, g, beta, initial_state, segment_ids, impl, chunk_size)
    o, final = _run(q, k, v, g, beta, scale, initial_state, segment_ids, impl, chunk_size)
    return o.astype(v.dtype), final


def _validated_chunks(k, v, beta, g, initial_state, segment_ids, chunk_size):
    """`(chunks, initial_state)` for the state functions below, inputs checked."""
    dims = checks.Dims()
    _check_recurrence_inputs(dims, k, v, beta, g, initial_state, segment_ids, chunk_size)
    _, (k, v, g, beta, initial_state) = _prepare(k, v, g, beta, initial_state)
    return _Chunks(k, v, g, beta, segment_ids, min(chunk_size, k.shape[1])), initial_state


def chunk_transition(
    k: jax.Array,
    v: jax.Array,
    beta: jax.Array,
    g: jax.Array | None = None,
    *,
    segment_ids: jax.Array | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[jax.Array, jax.Array]:
    """Every chunk's whole transition in closed form, `S_leaving = M S_entering + D`.

    Returns `M: [B, N, H, K, K]` and `D: [B, N, H, K, V]` (N = ceil(T / chunk_size)) of
    `delta_rule` (`g=None`) or `gated_delta_rule`. Composing them, `(M2, D2) . (M1, D1) =
    (M2 M1, M2 D1 + D2)`, combines chunks (and devices, for sequence parallelism).
    """
    chunks, _ = _validated_chunks(k, v, beta, g, None, segment_ids, chunk_size)
    k, v, beta, pot, counts = chunks.parts()
    u_part, w_part = ut_transform(k, v, beta, pot, counts)
    pieces = transitions(k, u_part, w_part, pot, counts)
    return tuple(jnp.moveaxis(x, 2, 1) for x in pieces)


def chunk_states(
    k: jax.Array,
    v: jax.Array,
    beta: jax.Array,
    g: jax.Array | None = None,
    *,
    initial_state: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> jax.Array:
    """The states entering every chunk, `[B, N, H, K, V]` with `N = ceil(T / chunk_size)`:
    state `n` is the state after token `n * chunk_size - 1` (state 0 is `initial_state`)."""
    chunks, state = _validated_chunks(k, v, beta, g, initial_state, segment_ids, chunk_size)
    states = _writes_and_states(*chunks.parts(), state)[1]
    return jnp.moveaxis(states, 2, 1)


def states_after(
    k: jax.Array,
    v: jax.Array,
    beta: jax.Array,
    g: jax.Array | None,
    positions: jax.Array,
    *,
    initial_state: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> jax.Array:
    """The state after each token of `positions: [B, P]` (ints in [0, T)), `[B, P, H, K, V]`.

    As `seqjax.ops.gla.states_after` (every segment's final state for a prepacked prefill,
    or a rollback point): the chunk states give every chunk's writes `u`, and the state after
    a token is then that of `simple_gla` with values `u`.
    """
    positions = checks.check_positions(positions, *k.shape[:2])
    chunks, state = _validated_chunks(k, v, beta, g, initial_state, segment_ids, chunk_size)
    k, v, beta, pot, counts = chunks.parts()
    u, states, _ = _writes_and_states(k, v, beta, pot, counts, state)
    after = engine.states_after(k, u, pot, counts, states, positions)
    return jnp.moveaxis(after, 2, 1)


def _step(q_t, k_t, v_t, g_t, beta_t, state, scale):
    scale = q_t.shape[-1] ** -0.5 if scale is None else scale
    acc = accumulation_dtype(*(x.dtype for x in (q_t, k_t, v_t, g_t, beta_t, state)))
    q_t, k_t, v_t, g_t, beta_t = (x.astype(acc) for x in (q_t, k_t, v_t, g_t, beta_t))
    state, o_t = _token_step(state.astype(acc), q_t * scale, k_t, v_t, g_t, beta_t)
    return o_t.astype(v_t.dtype), state


def delta_rule_step(
    q_t: jax.Array,
    k_t: jax.Array,
    v_t: jax.Array,
    beta_t: jax.Array,
    state: jax.Array,
    *,
    scale: float | None = None,
) -> tuple[jax.Array, jax.Array]:
    """One decoding step of `delta_rule`: `q_t, k_t: [B, H, K]`, `v_t: [B, H, V]`,
    `beta_t: [B, H]`, `state: [B, H, K, V]`. Returns `(o_t, new_state)`."""
    return _step(q_t, k_t, v_t, jnp.zeros_like(beta_t), beta_t, state, scale)


def gated_delta_rule_step(
    q_t: jax.Array,
    k_t: jax.Array,
    v_t: jax.Array,
    g_t: jax.Array,
    beta_t: jax.Array,
    state: jax.Array,
    *,
    scale: float | None = None,
) -> tuple[jax.Array, jax.Array]:
    """One decoding step of `gated_delta_rule`: `g_t, beta_t: [B, H]`, the rest as
    `delta_rule_step`."""
    return _step(q_t, k_t, v_t, g_t, beta_t, state, scale)
