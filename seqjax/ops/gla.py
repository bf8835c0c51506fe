"""The gated linear-attention family: linear attention, simple GLA and GLA, one chunked engine.

For each head, with a `[K, V]` matrix state and `scale` (default `K ** -0.5`) on the query,

    linear_attention:  S_t = S_{t-1}                   + k_t v_t^T
    simple_gla:        S_t = exp(g_t) S_{t-1}          + k_t v_t^T     g: [B, T, H] <= 0
    gla:               S_t = diag(exp(gk_t)) S_{t-1}   + k_t v_t^T     gk: [B, T, H, K] <= 0
                       o_t = S_t^T (scale q_t)

(GLA: Yang et al., "Gated Linear Attention Transformers with Hardware-Efficient Training";
`fla.ops.{linear_attn, simple_gla, gla}`). `retention` (RetNet) and `lightning_attention`
(TransNormerLLM) are `simple_gla` with the fixed per-head decays of those papers; the SSD of
Mamba-2 is in `seqjax.ops.ssd`.

Impls: `"reference"` (a token loop reading like the equations above), `"chunked"` (the
chunkwise-parallel engine of `seqjax.ops.chunked_linear_attention`, with a `custom_vjp` that
stores only the chunk-entering states; what `"auto"` picks), and `"parallel"` (the quadratic
masked form `O = ((Q K^T) * decay mask) V`, one chunk as long as the sequence, differentiated
by JAX; for short sequences and as a second reference), and `"pallas"` (the kernels of
`pallas_kernels.gla`, see `seqjax.kernels`: what `"auto"` picks on TPU; packed
segments fall back to `"chunked"`). The chunked and Pallas impls support reverse-mode
differentiation only.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp

from seqjax import checks, kernels
from seqjax.ops import chunked_linear_attention as engine
from seqjax.ops.common import reset, scan_tokens
from seqjax.scan.linear_recurrence import accumulation_dtype

GLAImpl = Literal["auto", "reference", "chunked", "parallel", "pallas"]
GLA_IMPLS: tuple[str, ...] = ("auto", "reference", "chunked", "parallel", "pallas")
DEFAULT_CHUNK_SIZE = 64
# Added to linear attention's normalizer, as fla's `normalize_output` does.
NORMALIZER_EPS = 1e-10


class LinearAttentionState(NamedTuple):
    """State of normalized linear attention: `S: [B, H, K, V]` and the key sum `z: [B, H, K]`."""

    S: jax.Array
    z: jax.Array


def _validate(
    q, k, v, log_decay, decay_layout, initial_state, segment_ids, impl, chunk_size
) -> checks.Dims:
    dims = checks.Dims()
    dims.check("q", q, "B T H K")
    dims.check("k", k, "B T H K")
    dims.check("v", v, "B T H V")
    for name, x in (("q", q), ("k", k), ("v", v)):
        checks.check_floating(name, x)
    if log_decay is not None:
        name = "gk" if decay_layout.endswith("K") else "g"
        dims.check(name, log_decay, decay_layout)
        checks.check_floating(name, log_decay)
        checks.check_values(name, log_decay <= 0, f"log-decays {name} <= 0")
    if initial_state is not None:
        dims.check("initial_state", initial_state, "B H K V")
    checks.check_segment_ids(segment_ids, *q.shape[:2])
    checks.check_choice("impl", impl, GLA_IMPLS)
    checks.check_positive("chunk_size", chunk_size)
    return dims


def _token_step(
    state: jax.Array, q_t: jax.Array, k_t: jax.Array, v_t: jax.Array, log_decay_t: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """One token: `S = exp(g_t) S + k_t v_t^T`, `o_t = S^T q_t` (scale already in `q_t`).

    `q_t, k_t: [B, H, K]`, `v_t: [B, H, V]`, `log_decay_t: [B, H, G]` (G = 1 or K).
    """
    state = jnp.exp(log_decay_t)[..., None] * state + k_t[..., :, None] * v_t[..., None, :]
    return state, jnp.einsum("bhk,bhkv->bhv", q_t, state)


def _reference(q, k, v, log_decay, initial_state, segment_ids):
    def step(state, xs):
        start, (q_t, k_t, v_t, g_t) = xs
        return _token_step(reset(start, state), q_t, k_t, v_t, g_t)

    o, final = scan_tokens(step, initial_state, (q, k, v, log_decay), segment_ids)
    return o, final


def _chunked_form(q, k, v, log_decay, scale, initial_state, segment_ids, chunk_size, parallel):
    length = q.shape[1]
    size = length if parallel else min(chunk_size, length)
    counts = engine.segment_counts(segment_ids, length, size)
    if parallel:
        pot = engine.decay_potentials(log_decay, size)
        q, k, v = (engine.to_chunks(x, size) for x in (q * scale, k, v))
        states, final = engine.pass_states(
            *engine.chunk_summaries(k, v, pot, counts), initial_state
        )
        o = engine.chunk_outputs(q, k, v, pot, counts, states, tile=None)
        return engine.from_chunks(o, length), final
    q, k, v, log_decay = (engine.time_chunks(x, size) for x in (q, k, v, log_decay))
    # A scalar typed like q: under `shard_map` it then varies over q's manual axes, as the
    # cotangent that `chunked` returns for it does.
    scale = jnp.full_like(q, scale, shape=())
    o, final, _ = engine.chunked(q, k, v, log_decay, initial_state, counts, engine.TILE, scale)
    return engine.from_time_chunks(o, length), final


def _decay_and_state(log_decay, initial_state, k, v, acc):
    """`log_decay: [B, T, H, G]` (zeros, G = 1, when None) and the initial state (zeros when
    None), both in the accumulation dtype."""
    batch, length, heads, key_dim = k.shape
    # Zeros typed like k: under `shard_map` they vary over k's manual axes, as the
    # cotangents that `engine.chunked` returns for them do.
    if log_decay is None:
        log_decay = jnp.zeros_like(k, acc, shape=(batch, length, heads, 1))
    if initial_state is None:
        initial_state = jnp.zeros_like(k, acc, shape=(batch, heads, key_dim, v.shape[-1]))
    return log_decay.astype(acc), initial_state.astype(acc)


def _run(q, k, v, log_decay, scale, initial_state, segment_ids, impl, chunk_size):
    """Shared body: float32 (or wider) accumulation, scale on q, dispatch.

    `log_decay: [B, T, H, G]` or None (no decay). `o` stays in the accumulation dtype, or is
    in the dtype of `v` from the kernel."""
    key_dim = q.shape[-1]
    scale = key_dim**-0.5 if scale is None else scale
    # The kernel takes a per-head decay as [B, T, H] (G = 1 is the same recurrence either way).
    per_head = log_decay is not None and log_decay.shape[-1] == 1
    args = (q, k, v, log_decay[..., 0] if per_head else log_decay, initial_state)
    kernel = kernels.choose("gla", impl, args, segment_ids)
    if kernel is not None:
        return kernel.gla(*args, scale=scale, chunk_size=None, **kernels.options())
    inputs = [q, k, v] + [x for x in (log_decay, initial_state) if x is not None]
    acc = accumulation_dtype(*(x.dtype for x in inputs))
    q, k, v = q.astype(acc), k.astype(acc), v.astype(acc)
    log_decay, initial_state = _decay_and_state(log_decay, initial_state, k, v, acc)
    if impl == "reference":
        o, final = _reference(q * scale, k, v, log_decay, initial_state, segment_ids)
    else:
        parallel = impl == "parallel"
        o, final = _chunked_form(
            q, k, v, log_decay, scale, initial_state, segment_ids, chunk_size, parallel
        )
    return o, final


def linear_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    scale: float | None = None,
    normalize: bool = False,
    initial_state: jax.Array | LinearAttentionState | None = None,
    segment_ids: jax.Array | None = None,
    impl: GLAImpl = "auto",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[jax.Array, jax.Array | LinearAttentionState]:
    """Causal linear attention `S_t = S_{t-1} + k_t v_t^T`, `o_t = S_t^T (scale q_t)`.

    Args:
      q, k: `[B, T, H, K]` (feature maps already applied); v: `[B, T, H, V]`.
      scale: multiplies `q`; None means `K ** -0.5`.
      normalize: divide by the normalizer, `o_t = S_t^T q_t / (q_t . z_t + 1e-10)` with
        `z_t = sum_{s <= t} k_s` (scale cancels); the state is then a `LinearAttentionState`.
      initial_state: `[B, H, K, V]` (a `LinearAttentionState` when normalizing); None: zeros.
      segment_ids: `[B, T]` ints; the state restarts at every new segment.
      impl: `"reference"`, `"chunked"`, `"parallel"`, `"pallas"` or `"auto"` (`"pallas"` on
        TPU, else `"chunked"`; see `seqjax.kernels.SLOWER_ON_GPU`).
      chunk_size: tokens per chunk of `"chunked"` (the kernels take theirs from
        `pallas_kernels.blocks`).

    Returns:
      `o: [B, T, H, V]` in the dtype of `v`, and the float32 state after each row's last token.
    """
    if not normalize:
        _validate(q, k, v, None, "", initial_state, segment_ids, impl, chunk_size)
        o, final = _run(q, k, v, None, scale, initial_state, segment_ids, impl, chunk_size)
        return o.astype(v.dtype), final
    state = None if initial_state is None else _augmented_state(initial_state)
    v_aug = engine.with_ones_column(v)
    _validate(q, k, v_aug, None, "", state, segment_ids, impl, chunk_size)
    o_aug, final = _run(q, k, v_aug, None, scale, state, segment_ids, impl, chunk_size)
    o = normalized_output(o_aug).astype(v.dtype)
    return o, LinearAttentionState(final[..., :-1], final[..., -1])


def _augmented_state(state: LinearAttentionState) -> jax.Array:
    """`(S, z)` as one `[B, H, K, V + 1]` state: z is the state of a value column of ones."""
    if not isinstance(state, LinearAttentionState):
        raise TypeError(
            "initial_state: expected a LinearAttentionState(S, z) when normalize=True, "
            f"got {type(state).__name__}"
        )
    return engine.with_key_sum(state.S, state.z)


def normalized_output(o_aug: jax.Array) -> jax.Array:
    """`[..., V + 1]` (what was read from values and from `with_ones_column`'s ones) ->
    `[..., V]`, the values divided by the normalizer plus `NORMALIZER_EPS`."""
    return o_aug[..., :-1] / (o_aug[..., -1:] + NORMALIZER_EPS)


def simple_gla(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array,
    *,
    scale: float | None = None,
    initial_state: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    impl: GLAImpl = "auto",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[jax.Array, jax.Array]:
    """Linear attention with one decay per head and token: `S_t = exp(g_t) S_{t-1} + k_t v_t^T`.

    Args:
      q, k: `[B, T, H, K]`; v: `[B, T, H, V]`.
      g: log-decays `[B, T, H]`, `g <= 0` (checked when concrete).
      scale, initial_state (`[B, H, K, V]`), segment_ids, impl, chunk_size: as in
        `linear_attention`.

    Returns:
      `o: [B, T, H, V]` in the dtype of `v`, and the float32 state `[B, H, K, V]`.
    """
    _validate(q, k, v, g, "B T H", initial_state, segment_ids, impl, chunk_size)
    o, final = _run(q, k, v, g[..., None], scale, initial_state, segment_ids, impl, chunk_size)
    return o.astype(v.dtype), final


def gla(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    gk: jax.Array,
    *,
    scale: float | None = None,
    initial_state: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    impl: GLAImpl = "auto",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[jax.Array, jax.Array]:
    """Gated linear attention: `S_t = diag(exp(gk_t)) S_{t-1} + k_t v_t^T`.

    Exact for any log-decays: inside a chunk, no exponent is ever positive (secondary
    chunking, see `seqjax.ops.chunked_linear_attention`), so decays of `exp(-20)` per token
    and cumulative decays far below float32's range give no inf or NaN.

    Args:
      q, k: `[B, T, H, K]`; v: `[B, T, H, V]`.
      gk: log-decays per key channel `[B, T, H, K]`, `gk <= 0` (checked when concrete).
      scale, initial_state (`[B, H, K, V]`), segment_ids, impl, chunk_size: as in
        `linear_attention`.

    Returns:
      `o: [B, T, H, V]` in the dtype of `v`, and the float32 state `[B, H, K, V]`.
    """
    _validate(q, k, v, gk, "B T H K", initial_state, segment_ids, impl, chunk_size)
    o, final = _run(q, k, v, gk, scale, initial_state, segment_ids, impl, chunk_size)
    return o.astype(v.dtype), final


def _state_pass(k, v, log_decay, initial_state, segment_ids, chunk_size):
    """Validated inputs in chunks, and the chunk-entering states, for `chunk_states` and
    `states_after`: `(k, v, potentials, counts, states [B, H, N, K, V])`."""
    dims = checks.Dims()
    dims.check("k", k, "B T H K")
    dims.check("v", v, "B T H V")
    if log_decay is not None:
        layout = "B T H" if log_decay.ndim == 3 else "B T H K"
        dims.check("log_decay", log_decay, layout)
        checks.check_values("log_decay", log_decay <= 0, "log-decays <= 0")
    if initial_state is not None:
        dims.check("initial_state", initial_state, "B H K V")
    checks.check_segment_ids(segment_ids, *k.shape[:2])
    checks.check_positive("chunk_size", chunk_size)
    length = k.shape[1]
    acc = accumulation_dtype(k.dtype, v.dtype)
    if log_decay is not None and log_decay.ndim == 3:
        log_decay = log_decay[..., None]
    log_decay, initial_state = _decay_and_state(log_decay, initial_state, k, v, acc)
    size = min(chunk_size, length)
    pot = engine.decay_potentials(log_decay, size)
    k, v = (engine.to_chunks(x.astype(acc), size) for x in (k, v))
    counts = engine.segment_counts(segment_ids, length, size)
    states, _ = engine.pass_states(*engine.chunk_summaries(k, v, pot, counts), initial_state)
    return k, v, pot, counts, states


def chunk_states(
    k: jax.Array,
    v: jax.Array,
    log_decay: jax.Array | None = None,
    *,
    initial_state: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> jax.Array:
    """The states entering every chunk, `[B, N, H, K, V]` with `N = ceil(T / chunk_size)`.

    State `n` is the state after token `n * chunk_size - 1` (state 0 is `initial_state`), for
    the recurrence of `linear_attention` (`log_decay=None`), `simple_gla` (`[B, T, H]`) or
    `gla` (`[B, T, H, K]`). Sequence parallelism, rollback and state probes start from these.
    """
    states = _state_pass(k, v, log_decay, initial_state, segment_ids, chunk_size)[-1]
    return jnp.moveaxis(states, 2, 1)  # [B, H, N, K, V] -> [B, N, H, K, V]


def states_after(
    k: jax.Array,
    v: jax.Array,
    log_decay: jax.Array | None,
    positions: jax.Array,
    *,
    initial_state: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> jax.Array:
    """The state after each token of `positions: [B, P]` (ints in [0, T)), `[B, P, H, K, V]`.

    For the same recurrences as `chunk_states`. With packed segments, the positions of the
    segments' last tokens (`cu_seqlens[1:] - 1` of `seqjax.segments`) give every segment's
    final state, as a prepacked prefill needs; any other position gives the state to roll
    back to. Costs one chunk's work per position beyond the chunk pass.
    """
    positions = checks.check_positions(positions, *k.shape[:2])
    k, v, pot, counts, states = _state_pass(k, v, log_decay, initial_state, segment_ids, chunk_size)
    after = engine.states_after(k, v, pot, counts, states, positions)
    return jnp.moveaxis(after, 2, 1)  # [B, H, P, K, V] -> [B, P, H, K, V]


def _step(q_t, k_t, v_t, log_decay_t, state, scale):
    scale = q_t.shape[-1] ** -0.5 if scale is None else scale
    acc = accumulation_dtype(q_t.dtype, k_t.dtype, v_t.dtype, log_decay_t.dtype, state.dtype)
    q_t, k_t, v_t, log_decay_t = (x.astype(acc) for x in (q_t, k_t, v_t, log_decay_t))
    state, o_t = _token_step(state.astype(acc), q_t * scale, k_t, v_t, log_decay_t)
    return o_t, state


def linear_attention_step(
    q_t: jax.Array,
    k_t: jax.Array,
    v_t: jax.Array,
    state: jax.Array | LinearAttentionState,
    *,
    scale: float | None = None,
    normalize: bool = False,
) -> tuple[jax.Array, jax.Array | LinearAttentionState]:
    """One decoding step of `linear_attention`: `q_t, k_t: [B, H, K]`, `v_t: [B, H, V]`."""
    no_decay = jnp.zeros((*q_t.shape[:-1], 1), jnp.float32)
    if not normalize:
        o_t, state = _step(q_t, k_t, v_t, no_decay, state, scale)
        return o_t.astype(v_t.dtype), state
    v_aug = engine.with_ones_column(v_t)
    o_aug, state = _step(q_t, k_t, v_aug, no_decay, _augmented_state(state), scale)
    return (
        normalized_output(o_aug).astype(v_t.dtype),
        LinearAttentionState(state[..., :-1], state[..., -1]),
    )


def simple_gla_step(
    q_t: jax.Array,
    k_t: jax.Array,
    v_t: jax.Array,
    g_t: jax.Array,
    state: jax.Array,
    *,
    scale: float | None = None,
) -> tuple[jax.Array, jax.Array]:
    """One decoding step of `simple_gla`: `g_t: [B, H]`, `state: [B, H, K, V]`."""
    o_t, state = _step(q_t, k_t, v_t, g_t[..., None], state, scale)
    return o_t.astype(v_t.dtype), state


def gla_step(
    q_t: jax.Array,
    k_t: jax.Array,
    v_t: jax.Array,
    gk_t: jax.Array,
    state: jax.Array,
    *,
    scale: float | None = None,
) -> tuple[jax.Array, jax.Array]:
    """One decoding step of `gla`: `gk_t: [B, H, K]`, `state: [B, H, K, V]`."""
    o_t, state = _step(q_t, k_t, v_t, gk_t, state, scale)
    return o_t.astype(v_t.dtype), state


def retention_log_decays(num_heads: int) -> jax.Array:
    """RetNet's per-head decays, `log(1 - 2^(-5 - h))` for h = 0 .. H-1 (`[H]`)."""
    return jnp.log1p(-(2.0 ** (-5.0 - jnp.arange(num_heads, dtype=jnp.float32))))


def retention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    **kwargs,
) -> tuple[jax.Array, jax.Array]:
    """RetNet's multi-scale retention (Sun et al., "Retentive Network"): `simple_gla` with the
    fixed decay `gamma_h = 1 - 2^(-5 - h)` of head h. Keyword arguments as `simple_gla`."""
    g = jnp.broadcast_to(retention_log_decays(q.shape[2]), q.shape[:3])
    return simple_gla(q, k, v, g, **kwargs)


def alibi_slopes(num_heads: int) -> jax.Array:
    """ALiBi's head slopes `2^(-8 h / H)`, h = 1 .. H, interleaved as ALiBi does when H is not
    a power of two (the slopes of the next lower power, then every other slope of twice it)."""

    def power_of_two(n):
        return [2.0 ** (-8.0 * (h + 1) / n) for h in range(n)]

    lower = 2 ** math.floor(math.log2(num_heads))
    slopes = power_of_two(lower)
    if lower != num_heads:
        slopes += power_of_two(2 * lower)[0::2][: num_heads - lower]
    return jnp.asarray(slopes, jnp.float32)


def lightning_log_decays(num_heads: int, layer_idx: int, num_layers: int) -> jax.Array:
    """TransNormerLLM's per-head decays, `log lambda_h = -s_h (1 - l / (L - 1) + 1e-5)` with
    ALiBi slopes `s_h` (a single layer, L = 1, uses `l / (L - 1) = 0`)."""
    if not 0 <= layer_idx < num_layers:
        raise ValueError(f"layer_idx: expected 0 <= layer_idx < num_layers = {num_layers}")
    depth = layer_idx / (num_layers - 1) if num_layers > 1 else 0.0
    return -alibi_slopes(num_heads) * (1.0 - depth + 1e-5)


def lightning_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    layer_idx: int,
    num_layers: int,
    **kwargs,
) -> tuple[jax.Array, jax.Array]:
    """Lightning attention (Qin et al., TransNormerLLM): `simple_gla` with the fixed per-head
    decay of layer `layer_idx` of `num_layers` (`lightning_log_decays`). TransNormerLLM does
    not scale the query: pass `scale=1.0` to reproduce it. Keyword arguments as `simple_gla`."""
    g = jnp.broadcast_to(lightning_log_decays(q.shape[2], layer_idx, num_layers), q.shape[:3])
    return simple_gla(q, k, v, g, **kwargs)
