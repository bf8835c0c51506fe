"""mLSTM: the matrix memory of xLSTM (Beck et al., "xLSTM: Extended Long Short-Term Memory").

For each head, with input-gate and forget-gate pre-activations `i_t, f_t` and `scale` (default
`K ** -0.5`) on the query, the stabilized recurrence of xLSTM's `backends.py`:

    m_t  = max(log sigmoid(f_t) + m_{t-1}, i_t)                          (the stabilizer)
    f'_t = exp(log sigmoid(f_t) + m_{t-1} - m_t),    i'_t = exp(i_t - m_t)
    C_t  = f'_t C_{t-1} + i'_t k_t v_t^T                                 C: [K, V]
    n_t  = f'_t n_{t-1} + i'_t k_t                                       n: [K]
    h_t  = C_t^T (scale q_t) / (max(|n_t . scale q_t|, exp(-m_t)) + 1e-6)

`(C_t, n_t)` is the unstabilized memory `sum_{j <= t} sigmoid(f)...sigmoid(f) exp(i_j) k_j v_j^T`
(and its key sum) times `exp(-m_t)`, so no `exp` of a large input gate is ever formed. xLSTM
scales `k` by `K ** -0.5`; scaling `q` gives the same `h` (the stored `C` and `n` are then
those of the unscaled keys). A zero state has `m = 0`; every segment restarts from it.

Impls: `"reference"` (the token loop above), `"chunked"` (the chunkwise-parallel engine of
`seqjax.ops.chunked_linear_attention`, with a `custom_vjp` that stores only the chunk-entering
states; what `"auto"` picks) and `"parallel"` (one chunk as long as the sequence, the quadratic
form of xLSTM's `parallel_stabilized_simple`, differentiated by JAX). The chunked impl supports
reverse-mode differentiation only (no `jvp` / `jacfwd`).

**The chunked form.** The stabilizer is first computed for every token: each token is the
max-plus map `m -> max(lf_t + m, i_t)` (`lf = log sigmoid(f)`; a segment start forgets `m` and
restarts from 0, `m -> max(lf_t, i_t)`), and maps compose associatively,

    (a1, c1) then (a2, c2) = (a1 + a2, max(a2 + c1, c2)),

so `jax.lax.associative_scan` gives the same `m_t` as the token loop (and, through the max,
the same gradient paths). With `b_t` the in-chunk cumulative sum of `lf` and `m_enter`,
`m_exit` the stabilizers of the states entering and leaving the chunk, the engine's potentials

    query_t = b_t - m_t,   key_j = b_j - i_j,   enter = -m_enter,   exit = b_C - m_exit

make its state exactly the stabilized `C` (and `n`, as an extra value column of ones), and
every exponent it forms is `<= 0` because `m_t` is the max over all the terms it stabilizes.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from seqjax import checks
from seqjax.ops import chunked_linear_attention as engine
from seqjax.ops.common import reset, scan_tokens
from seqjax.scan.linear_recurrence import accumulation_dtype

MLSTMImpl = Literal["auto", "reference", "chunked", "parallel"]
MLSTM_IMPLS: tuple[str, ...] = ("auto", "reference", "chunked", "parallel")
DEFAULT_CHUNK_SIZE = 64
# Added to the normalizer, as xLSTM's `backends.py` does.
NORMALIZER_EPS = 1e-6
# The input gate of the padding tokens that fill the last chunk (whose log forget gate is 0):
# a write weight of exp(-1e30) = 0, finite so that no `inf - inf` is ever formed, and the
# stabilizer keeps its last value through them, max(0 + m, -1e30) = m.
PADDING_INPUT_GATE = -1e30


class MLSTMState(NamedTuple):
    """State of mLSTM, float32: the stabilized memory and normalizer and their stabilizer.

    Attributes:
      C: `[B, H, K, V]`, the memory times `exp(-m)`.
      n: `[B, H, K]`, the normalizer (key sum) times `exp(-m)`.
      m: `[B, H]`, the stabilizer.
    """

    C: jax.Array
    n: jax.Array
    m: jax.Array


def _check_state(dims: checks.Dims, name: str, state: MLSTMState | None) -> None:
    if state is None:
        return
    if not isinstance(state, MLSTMState):
        raise TypeError(f"{name}: expected an MLSTMState(C, n, m), got {type(state).__name__}")
    dims.check(f"{name}.C", state.C, "B H K V")
    dims.check(f"{name}.n", state.n, "B H K")
    dims.check(f"{name}.m", state.m, "B H")


def _validate(q, k, v, i, f, initial_state, segment_ids, chunk_size) -> None:
    """Shapes and dtypes of `mlstm`'s arguments (`q` is None for `mlstm_chunk_states`)."""
    dims = checks.Dims()
    named = (("q", q, "B T H K"), ("k", k, "B T H K"), ("v", v, "B T H V"))
    for name, x, layout in (*named, ("i", i, "B T H"), ("f", f, "B T H")):
        if x is not None:
            dims.check(name, x, layout)
            checks.check_floating(name, x)
    _check_state(dims, "initial_state", initial_state)
    checks.check_segment_ids(segment_ids, *k.shape[:2])
    checks.check_positive("chunk_size", chunk_size)


def _zero_state(batch: int, heads: int, key_dim: int, value_dim: int, dtype) -> MLSTMState:
    return MLSTMState(
        jnp.zeros((batch, heads, key_dim, value_dim), dtype),
        jnp.zeros((batch, heads, key_dim), dtype),
        jnp.zeros((batch, heads), dtype),
    )


def _normalized(numerator: jax.Array, denominator: jax.Array, m: jax.Array) -> jax.Array:
    """`h = numerator / (max(|denominator|, exp(-m)) + eps)`; `numerator: [..., V]`."""
    return numerator / (jnp.maximum(jnp.abs(denominator), jnp.exp(-m))[..., None] + NORMALIZER_EPS)


def _token_step(
    state: MLSTMState,
    q_t: jax.Array,
    k_t: jax.Array,
    v_t: jax.Array,
    i_t: jax.Array,
    f_t: jax.Array,
) -> tuple[MLSTMState, jax.Array]:
    """One token (scale already in `q_t`): `q_t, k_t: [B, H, K]`, `v_t: [B, H, V]`, gates
    `i_t, f_t: [B, H]`. Returns the new state and `h_t: [B, H, V]`."""
    C, n, m = state
    log_forget = jax.nn.log_sigmoid(f_t)
    m_t = jnp.maximum(log_forget + m, i_t)
    forget = jnp.exp(log_forget + m - m_t)
    write = jnp.exp(i_t - m_t)
    C = forget[..., None, None] * C + write[..., None, None] * k_t[..., :, None] * v_t[..., None, :]
    n = forget[..., None] * n + write[..., None] * k_t
    numerator = jnp.einsum("bhk,bhkv->bhv", q_t, C)
    denominator = jnp.einsum("bhk,bhk->bh", q_t, n)
    return MLSTMState(C, n, m_t), _normalized(numerator, denominator, m_t)


def _reference(q, k, v, i, f, initial_state, segment_ids):
    def step(state, xs):
        start, (q_t, k_t, v_t, i_t, f_t) = xs
        state = jax.tree.map(lambda x: reset(start, x), state)
        return _token_step(state, q_t, k_t, v_t, i_t, f_t)

    return scan_tokens(step, initial_state, (q, k, v, i, f), segment_ids)


def _stabilizer(
    log_forget: jax.Array, i: jax.Array, starts: jax.Array, m_initial: jax.Array
) -> jax.Array:
    """`m_t` of every token, `[B, T, H]`, by an associative scan of max-plus maps.

    Token t is `m -> max(a_t + m, c_t)`: `(lf_t, i_t)`, or `(-inf, max(lf_t, i_t))` where it
    opens a segment (the state restarts from `m = 0`). `starts: [B, T]` bool.
    """
    opens = starts[..., None]
    shift = jnp.where(opens, -jnp.inf, log_forget)
    floor = jnp.where(opens, jnp.maximum(log_forget, i), i)

    def then(first, second):
        (a1, c1), (a2, c2) = first, second
        return a1 + a2, jnp.maximum(a2 + c1, c2)

    shift, floor = lax.associative_scan(then, (shift, floor), axis=1)
    return jnp.maximum(shift + m_initial[:, None], floor)


def _potentials(
    log_forget: jax.Array, i: jax.Array, counts: jax.Array | None, m_initial: jax.Array
) -> tuple[engine.Potentials, jax.Array, jax.Array]:
    """The engine's potentials of chunked gates `log_forget, i: [B, H, N, C]`.

    Returns `(potentials, m, m_enter)`: the stabilizer of every token `[B, H, N, C]` and of
    the state entering every chunk `[B, H, N]`.
    """
    batch, _, num_chunks, size = i.shape
    if counts is None:
        starts = jnp.zeros((batch, 1, num_chunks, size), bool)
    else:
        starts = jnp.diff(counts, axis=3, prepend=0) > 0

    def time_major(x):  # [B, H, N, C] -> [B, T, H]
        return jnp.moveaxis(x.reshape(*x.shape[:2], num_chunks * size), 1, 2)

    m = _stabilizer(time_major(log_forget), time_major(i), time_major(starts)[..., 0], m_initial)
    m = jnp.moveaxis(m, 2, 1).reshape(i.shape)
    m_exit = m[..., -1]
    m_enter = jnp.concatenate([m_initial[:, :, None], m_exit[..., :-1]], axis=2)
    cumulative = engine.prefix_sum(log_forget, axis=3)
    potentials = engine.Potentials(
        query=cumulative - m,
        key=cumulative - i,
        enter=-m_enter,
        exit=cumulative[..., -1] - m_exit,
    )
    # One potential per head: the engine's trailing axis G = 1.
    return jax.tree.map(lambda x: x[..., None], potentials), m, m_enter


def _chunk_gates(log_forget: jax.Array, i: jax.Array, size: int) -> tuple[jax.Array, jax.Array]:
    """Gates `[B, T, H]` in chunks; padding tokens neither decay nor write."""
    return engine.to_chunks(log_forget, size), engine.to_chunks(i, size, PADDING_INPUT_GATE)


def _augmented_state(state: MLSTMState) -> jax.Array:
    """`(C, n)` as one `[B, H, K, V + 1]` state: n is the state of a value column of ones."""
    return engine.with_key_sum(state.C, state.n)


def _chunked_form(q, k, v, i, f, scale, initial_state, segment_ids, chunk_size, parallel):
    length = q.shape[1]
    size = length if parallel else min(chunk_size, length)
    log_forget, i = _chunk_gates(jax.nn.log_sigmoid(f), i, size)
    counts = engine.segment_counts(segment_ids, length, size)
    pot, m, _ = _potentials(log_forget, i, counts, initial_state.m)
    q, k, v = (engine.time_chunks(x, size) for x in (q, k, engine.with_ones_column(v)))
    state = _augmented_state(initial_state)
    if parallel:
        q, k, v = (engine.heads_first(x) for x in (q * scale, k, v))
        states, final = engine.pass_states(*engine.chunk_summaries(k, v, pot, counts), state)
        o = engine.heads_last(engine.chunk_outputs(q, k, v, pot, counts, states, tile=None))
    else:
        scale = jnp.full_like(q, scale, shape=())  # typed like q: see `seqjax.ops.gla`
        o, final, _ = engine.chunked(q, k, v, pot, state, counts, None, scale)
    o, m = engine.from_time_chunks(o, length), engine.from_chunks(m, length)
    h = _normalized(o[..., :-1], o[..., -1], m)
    return h, MLSTMState(final[..., :-1], final[..., -1], m[:, -1])


def _accumulation_state(initial_state, batch, heads, key_dim, value_dim, acc) -> MLSTMState:
    if initial_state is None:
        return _zero_state(batch, heads, key_dim, value_dim, acc)
    return MLSTMState(*(x.astype(acc) for x in initial_state))


def mlstm(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    i: jax.Array,
    f: jax.Array,
    *,
    scale: float | None = None,
    initial_state: MLSTMState | None = None,
    segment_ids: jax.Array | None = None,
    impl: MLSTMImpl = "auto",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[jax.Array, MLSTMState]:
    """xLSTM's matrix memory (module docstring), stabilized.

    Args:
      q, k: `[B, T, H, K]`; v: `[B, T, H, V]`.
      i: input-gate pre-activations `[B, T, H]` (the gate is `exp(i)`).
      f: forget-gate pre-activations `[B, T, H]` (the gate is `sigmoid(f)`).
      scale: multiplies `q`; None means `K ** -0.5`.
      initial_state: an `MLSTMState`; None means zeros (with `m = 0`).
      segment_ids: `[B, T]` ints; the state restarts from zeros at every new segment.
      impl: `"reference"`, `"chunked"`, `"parallel"` or `"auto"` (`"chunked"`). `"chunked"`
        supports reverse-mode differentiation only.
      chunk_size: tokens per chunk of `"chunked"`.

    Returns:
      `h: [B, T, H, V]` in the dtype of `v`, and the float32 `MLSTMState` after each row's
      last token.
    """
    _validate(q, k, v, i, f, initial_state, segment_ids, chunk_size)
    checks.check_choice("impl", impl, MLSTM_IMPLS)
    batch, _, heads, key_dim = q.shape
    inputs = [q, k, v, i, f, *jax.tree.leaves(initial_state)]
    acc = accumulation_dtype(*(x.dtype for x in inputs))
    scale = key_dim**-0.5 if scale is None else scale
    out_dtype = v.dtype
    q, k, v, i, f = (x.astype(acc) for x in (q, k, v, i, f))
    state = _accumulation_state(initial_state, batch, heads, key_dim, v.shape[-1], acc)
    if impl == "reference":
        h, final = _reference(q * scale, k, v, i, f, state, segment_ids)
    else:
        parallel = impl == "parallel"
        h, final = _chunked_form(q, k, v, i, f, scale, state, segment_ids, chunk_size, parallel)
    return h.astype(out_dtype), final


def mlstm_chunk_states(
    k: jax.Array,
    v: jax.Array,
    i: jax.Array,
    f: jax.Array,
    *,
    initial_state: MLSTMState | None = None,
    segment_ids: jax.Array | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> MLSTMState:
    """The states entering every chunk, an `MLSTMState` with a chunk axis N after B.

    Leaves `C: [B, N, H, K, V]`, `n: [B, N, H, K]`, `m: [B, N, H]`, `N = ceil(T / chunk_size)`.
    State `n` is the state after token `n * chunk_size - 1` (state 0 is `initial_state`), as
    `mlstm` would return it for that prefix. Sequence parallelism, rollback and state probes
    start from these.
    """
    _validate(None, k, v, i, f, initial_state, segment_ids, chunk_size)
    batch, length, heads, key_dim = k.shape
    acc = accumulation_dtype(*(x.dtype for x in (k, v, i, f, *jax.tree.leaves(initial_state))))
    state = _accumulation_state(initial_state, batch, heads, key_dim, v.shape[-1], acc)
    size = min(chunk_size, length)
    log_forget, i = _chunk_gates(jax.nn.log_sigmoid(f.astype(acc)), i.astype(acc), size)
    counts = engine.segment_counts(segment_ids, length, size)
    pot, _, m_enter = _potentials(log_forget, i, counts, state.m)
    k, v = (engine.to_chunks(x.astype(acc), size) for x in (k, engine.with_ones_column(v)))
    states, _ = engine.pass_states(
        *engine.chunk_summaries(k, v, pot, counts), _augmented_state(state)
    )
    states, m_enter = jnp.moveaxis(states, 2, 1), jnp.moveaxis(m_enter, 2, 1)  # N after B
    return MLSTMState(states[..., :-1], states[..., -1], m_enter)


def mlstm_step(
    q_t: jax.Array,
    k_t: jax.Array,
    v_t: jax.Array,
    i_t: jax.Array,
    f_t: jax.Array,
    state: MLSTMState,
    *,
    scale: float | None = None,
) -> tuple[jax.Array, MLSTMState]:
    """One decoding step of `mlstm`: `q_t, k_t: [B, H, K]`, `v_t: [B, H, V]`, gate
    pre-activations `i_t, f_t: [B, H]`. Returns `h_t: [B, H, V]` in the dtype of `v_t` and the
    float32 state."""
    dims = checks.Dims()
    for name, x, layout in (
        ("q_t", q_t, "B H K"),
        ("k_t", k_t, "B H K"),
        ("v_t", v_t, "B H V"),
        ("i_t", i_t, "B H"),
        ("f_t", f_t, "B H"),
    ):
        dims.check(name, x, layout)
        checks.check_floating(name, x)
    _check_state(dims, "state", state)
    scale = q_t.shape[-1] ** -0.5 if scale is None else scale
    acc = accumulation_dtype(*(x.dtype for x in (q_t, k_t, v_t, i_t, f_t, *state)))
    q, k, v, i, f = (x.astype(acc) for x in (q_t, k_t, v_t, i_t, f_t))
    state, h = _token_step(MLSTMState(*(x.astype(acc) for x in state)), q * scale, k, v, i, f)
    return h.astype(v_t.dtype), state
