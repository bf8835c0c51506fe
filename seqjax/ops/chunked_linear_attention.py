"""The chunkwise-parallel engine of the matrix-state family: one algorithm, every gate shape.

Every op built on it (linear attention, simple GLA and its RetNet / lightning / SSD wrappers,
GLA, mLSTM, prefix linear attention) is, for each head, the recurrence

    S_t = D_t S_{t-1} + w_t k_t v_t^T,        o_t = S_t^T q_t              (S_t: [K, V])

with a diagonal decay `D_t` (a scalar per head, or one value per key channel) and a write
weight `w_t`, computed in chunks of C tokens: within a chunk by masked matmuls, across chunks
by passing one `[K, V]` state per chunk. The delta rule (`seqjax.ops.delta_rule`) is this
recurrence too once its writes are solved for, and uses the same pieces (its own pass through
the chunks solves for the writes on the way).

**Potentials.** The ops differ only in their gates, and the engine sees the gates in one form:
log "potentials", per chunk and relative to the state entering it, such that

    weight of token j's write in the state that token t reads  = exp(query_t - key_j)  (j <= t)
    weight of the entering state S_n in what token t reads       = exp(query_t - enter)
    S_{n+1} = exp(exit - enter) * S_n + sum_j exp(exit - key_j) k_j v_j^T

each exponent being <= 0 (no `exp` of a large positive number is ever formed; masked pairs
are set to -inf before the `exp`, so their gradients stay finite). For a log-decay `g` with
in-chunk cumulative sum `b_t`: `query = key = b`, `enter = 0`, `exit = b_C`. mLSTM adds its
input gate and stabilizer to these (see `seqjax.ops.mlstm`). A potential has a trailing axis
G of size 1 (scalar decay per head) or K (one decay per key channel).

**Segments** (packed documents) are masks, not decays: pairs of tokens in different segments
are masked, a chunk's entering state reaches only the tokens before the chunk's first segment
start, and only the tokens after its last start write to the state it passes on.

**Per-channel decays inside a chunk** (GLA) need `exp(b_t - b_j)` per channel, which is not a
matmul. When the chunk's cumulative decay is moderate (every potential within
`FACTORED_EXPONENT_LIMIT` of the mid-chunk one; checked on the data, one `lax.cond` for the
whole batch) it is the matmul of `q_t exp(b_t - r)` and `k_j exp(r - b_j)` around that
mid-chunk `r`. Otherwise, following the secondary chunking of the GLA paper, the chunk is cut
into tiles of `TILE` tokens: blocks between different tiles are matmuls around a reference
between the two tiles (both factors <= 1), and blocks on the diagonal are computed in log
space, `sum_k q_tk k_jk exp(b_tk - b_jk)`. Both forms are exact; neither forms an `exp` of
more than `FACTORED_EXPONENT_LIMIT`.

**Backward.** `chunked` is a `jax.custom_vjp` that keeps only the inputs and the chunk-entering
states `[B, H, N, K, V]` (N = T / C). Its backward pass recomputes each chunk's matmuls,
differentiates them with `jax.vjp`, and runs the inter-chunk recurrence in reverse
(`dS_n = dS_n^local + exp(exit - enter) dS_{n+1}`, by the forward pass's `pass_states`).

**Blocks.** On CPU both passes run over blocks of chunks (`scan_blocks`): a block's chunks
are processed in parallel, then the state leaving it enters the next block (in reverse, its
cotangent leaves the block's backward for the one before). Blocks of `BLOCK_BYTES` per input
keep the intermediates in cache: at B = 2, H = 4, K = 64, simple GLA's forward ran 1.3x
(T = 4K) and 1.6x (T = 16K) faster than over all chunks at once, and its fwd+bwd planned 40%
less memory (the delta rule's 63% less). What is per token is done inside the blocks too:
the potentials of plain decays (a prefix sum within each chunk, `chunk_decay_potentials`) and
the query scale, which over the whole sequence were passes over memory of their own.

Layout: `[B, H, N, C, ...]` (batch, head, chunk, position in chunk), float32 throughout. Heads
before chunks make every matmul a plain batched one; XLA:CPU runs the batched `C x K x C`
matmuls 2.7x faster in this layout than with heads after the chunk positions. `chunked` takes
`q, k, v` (and returns `o`) in `time_chunks`, `[B, N, C, H, ...]`, a reshape of the op's
`[B, T, H, ...]`, and each block moves its heads first: without the whole-sequence
transposes in and out (and of their cotangents), Gated DeltaNet at T = 4K, K = 128 ran its
forward 14% and its fwd+bwd 8% faster, and planned 28% less fwd+bwd memory.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

# Tokens per tile of the per-channel (GLA) intra-chunk form; chunks that are not a multiple
# of it use the log-space form for the whole chunk. 8 plans a third less fwd+bwd memory than
# fla's 16 (the log-space diagonal blocks hold TILE * K values per token) and ran no slower.
TILE = 8
# Per-channel chunks whose potentials all lie within this distance of the mid-chunk potential
# (a cumulative decay of at most exp(-40) across the chunk, which the decays real GLA models
# learn stay well inside) take `_factored_intra_scores`: factors within exp(+-20), far from
# float32's limits, and one matmul per chunk. Larger decays take the tiled form.
FACTORED_EXPONENT_LIMIT = 20.0
# Chunks per group of the tiled form's loop (see `_tiled_intra_scores_by_chunk_groups`).
TILED_CHUNK_GROUP = 8
# Bytes of the largest input of a block of `scan_blocks` on CPU: the chunked forms do their
# chunk-parallel work one block at a time, so that its intermediates stay in cache (XLA:CPU's
# per-token rate fell by half from T = 512 to 32K when every chunk was processed at once).
BLOCK_BYTES = 2**19


class Potentials(NamedTuple):
    """Log weights of one chunked problem (see the module docstring), float32.

    Attributes:
      query: `[B, H, N, C, G]`, the potential at which token t reads the state.
      key: `[B, H, N, C, G]`, the potential at which token j writes.
      enter: `[B, H, N, G]`, the potential of the state entering the chunk.
      exit: `[B, H, N, G]`, the potential of the state leaving the chunk.
    """

    query: jax.Array
    key: jax.Array
    enter: jax.Array
    exit: jax.Array


def pad_time(x: jax.Array, chunk_size: int, fill: float = 0.0) -> jax.Array:
    """Pads axis 1 (T) of `[B, T, ...]` with `fill` to a multiple of `chunk_size`."""
    pad = -x.shape[1] % chunk_size
    return jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2), constant_values=fill)


def time_chunks(x: jax.Array, chunk_size: int, fill: float = 0.0) -> jax.Array:
    """`[B, T, H, ...]` -> `[B, N, C, H, ...]`, padding the end of T with `fill`: a reshape
    (no copy when C divides T), the layout in which `chunked` takes per-token inputs."""
    x = pad_time(x, chunk_size, fill)
    return x.reshape(x.shape[0], -1, chunk_size, *x.shape[2:])


def from_time_chunks(x: jax.Array, length: int) -> jax.Array:
    """`[B, N, C, H, ...]` -> `[B, T, H, ...]`, dropping the padding of `time_chunks`."""
    return x.reshape(x.shape[0], -1, *x.shape[3:])[:, :length]


def heads_first(x: jax.Array) -> jax.Array:
    """`[B, N, C, H, ...]` -> `[B, H, N, C, ...]`, the engine's layout."""
    return jnp.moveaxis(x, 3, 1)


def heads_last(x: jax.Array) -> jax.Array:
    """`[B, H, N, C, ...]` -> `[B, N, C, H, ...]`, the inverse of `heads_first`."""
    return jnp.moveaxis(x, 1, 3)


def to_chunks(x: jax.Array, chunk_size: int, fill: float = 0.0) -> jax.Array:
    """`[B, T, H, ...]` -> `[B, H, N, C, ...]`, padding the end of T with `fill`."""
    return heads_first(time_chunks(x, chunk_size, fill))


def from_chunks(x: jax.Array, length: int) -> jax.Array:
    """`[B, H, N, C, ...]` -> `[B, T, H, ...]`, dropping the padding of `to_chunks`."""
    return from_time_chunks(heads_last(x), length)


def with_ones_column(v: jax.Array) -> jax.Array:
    """`[..., V]` -> `[..., V + 1]`: a value column of ones, whose state column is the key sum
    (the normalizer of linear attention, mLSTM and JRT)."""
    return jnp.concatenate([v, jnp.ones((*v.shape[:-1], 1), v.dtype)], axis=-1)


def with_key_sum(matrix: jax.Array, key_sum: jax.Array) -> jax.Array:
    """`[..., K, V]` and `[..., K]` as the one `[..., K, V + 1]` state of `with_ones_column`."""
    return jnp.concatenate([matrix, key_sum[..., None]], axis=-1)


def prefix_sum(x: jax.Array, axis: int) -> jax.Array:
    """The inclusive cumulative sum along `axis`, by a parallel prefix scan: XLA:CPU lowers
    `jnp.cumsum` to a window sum of O(n) adds per element, and the scan's log2(n) passes
    ran 2.2x faster over GLA's per-channel decays (C = 64, with the transpose to chunks)."""
    return lax.associative_scan(jnp.add, x, axis=axis)


def decay_potentials(log_decay: jax.Array, chunk_size: int) -> Potentials:
    """Potentials of `S_t = exp(g_t) S_{t-1} + k_t v_t^T` from `g: [B, T, H, G]` (<= 0), in
    chunks of `chunk_size` (the padding does not decay): `[B, H, N, C, G]`."""
    return chunk_decay_potentials(time_chunks(log_decay, chunk_size))


def chunk_decay_potentials(log_decay: jax.Array) -> Potentials:
    """`decay_potentials` of log-decays already in `time_chunks`, `[B, N, C, H, G]`."""
    cumulative = prefix_sum(heads_first(log_decay), axis=3)
    exit_ = cumulative[..., -1, :]
    return Potentials(cumulative, cumulative, jnp.zeros_like(exit_), exit_)


def block_potentials(gates: jax.Array | Potentials) -> Potentials:
    """The potentials of `chunked`'s `gates`: built from log-decays, or given."""
    return gates if isinstance(gates, Potentials) else chunk_decay_potentials(gates)


def segment_counts(segment_ids: jax.Array | None, length: int, chunk_size: int) -> jax.Array | None:
    """`[B, 1, N, C]` int32: how many segments have started in the chunk up to each token.

    A token opens a segment where its id differs from the previous token's (never at t = 0,
    whose segment `initial_state` seeds). Padding continues the last segment.
    """
    if segment_ids is None:
        return None
    starts = jnp.pad(segment_ids[:, 1:] != segment_ids[:, :-1], ((0, 0), (1, 0)))
    starts = pad_time(starts.astype(jnp.int32), chunk_size)
    return jnp.cumsum(starts.reshape(starts.shape[0], 1, -1, chunk_size), axis=3)


def masked_exp(log_weight: jax.Array, valid: jax.Array | None) -> jax.Array:
    """exp(log_weight) where valid, else 0; masked before the exp so no inf (or nan) appears."""
    if valid is None:
        return jnp.exp(log_weight)
    return jnp.exp(jnp.where(valid, log_weight, -jnp.inf))


def _expand(mask: jax.Array | None, ndim: int) -> jax.Array | None:
    return None if mask is None else mask.reshape(mask.shape + (1,) * (ndim - mask.ndim))


def chunk_summaries(
    k: jax.Array, v: jax.Array, pot: Potentials, counts: jax.Array | None
) -> tuple[jax.Array, jax.Array]:
    """Each chunk's transition `S_{n+1} = decay * S_n + increment`.

    Returns `decay: [B, H, N, G, 1]` (broadcastable to the state) and
    `increment: [B, H, N, K, V] = sum_j exp(exit - key_j) k_j v_j^T`.
    """
    increment = jnp.einsum("bhnck,bhncv->bhnkv", leaving_keys(k, pot, counts), v)
    return chunk_decay(pot, counts), increment


def leaving_keys(k: jax.Array, pot: Potentials, counts: jax.Array | None) -> jax.Array:
    """`[B, H, N, C, K]`: each key weighted by its write's weight in the state leaving the
    chunk, `exp(exit - key_j)`, 0 before the chunk's last segment start."""
    writes_out = None if counts is None else counts == counts[..., -1:]
    return k * masked_exp(pot.exit[..., None, :] - pot.key, _expand(writes_out, pot.key.ndim))


def chunk_decay(pot: Potentials, counts: jax.Array | None) -> jax.Array:
    """`[B, H, N, G, 1]`: the decay of the entering state across the chunk, 0 where a segment
    starts in it."""
    carries = None if counts is None else counts[..., -1] == 0
    return masked_exp(pot.exit - pot.enter, _expand(carries, pot.exit.ndim))[..., None]


def pass_states(
    decay: jax.Array, increment: jax.Array, state: jax.Array, reverse: bool = False
) -> tuple[jax.Array, jax.Array]:
    """Runs `S <- decay_n S + increment_n` over the chunks n of `[B, H, N, K, V]` from `state`,
    with the diagonal `decay: [B, H, N, G, 1]`. `reverse` runs the cotangent pass: from the
    last chunk back.

    Returns the state before every step `[B, H, N, K, V]` and the state after the last. In
    the forward pass those are the chunk-entering states and the final state; in reverse, on
    cotangents, the gradients w.r.t. every chunk's leaving state and w.r.t. the initial state.
    """
    num_chunks = increment.shape[2]
    per_chunk = (decay, increment)

    # The decay is read unbroadcast. The states go to a fresh buffer: written over the
    # increments, XLA would copy that buffer every step (the write of state n does not
    # depend on the read of increment n, so it cannot order them).
    def step(i, carry):
        state, out = carry
        n = num_chunks - 1 - i if reverse else i
        out = lax.dynamic_update_index_in_dim(out, state, n, 2)
        decay_n, increment_n = (lax.dynamic_index_in_dim(x, n, 2, False) for x in per_chunk)
        return decay_n * state + increment_n, out

    last, before = lax.fori_loop(0, num_chunks, step, (state, jnp.zeros_like(increment)))
    return before, last


def states_after(
    k: jax.Array,
    v: jax.Array,
    pot: Potentials,
    counts: jax.Array | None,
    states: jax.Array,
    positions: jax.Array,
) -> jax.Array:
    """`[B, H, P, K, V]`: the state after token `positions[b, p]` (`[B, P]` ints), in the
    frame of that token's query potential; `states` are the chunk-entering states.

    It is the chunk summary of the token's chunk cut at the token: its entering state
    decayed to the token, plus the writes of the tokens up to it in its segment.
    """
    size = k.shape[3]
    chunk, offset = positions // size, positions % size

    def at_chunk(x):  # [B, H, N, ...] -> [B, H, P, ...], the chunk of every position
        index = chunk.reshape(chunk.shape[0], 1, -1, *([1] * (x.ndim - 3)))
        return jnp.take_along_axis(x, index, axis=2)

    def at_token(x):  # [B, H, P, C, ...] -> [B, H, P, ...], the token itself
        index = offset.reshape(offset.shape[0], 1, -1, 1, *([1] * (x.ndim - 4)))
        return jnp.take_along_axis(x, index, axis=3)[:, :, :, 0]

    key, query = at_chunk(pot.key), at_chunk(pot.query)
    exit_ = at_token(query)  # [B, H, P, G]
    writes = jnp.arange(size) <= offset[:, None, :, None]  # [B, 1, P, C]
    carries = None
    if counts is not None:
        counts = at_chunk(counts)
        writes = writes & (counts == at_token(counts[..., None])[..., :1])
        carries = at_token(counts[..., None])[..., 0] == 0
    key_weight = masked_exp(exit_[..., None, :] - key, writes[..., None])
    written = jnp.einsum("bhpck,bhpcv->bhpkv", at_chunk(k) * key_weight, at_chunk(v))
    decay = masked_exp(exit_ - at_chunk(pot.enter), _expand(carries, exit_.ndim))
    return decay[..., None] * at_chunk(states) + written


def entering_weight(pot: Potentials, counts: jax.Array | None) -> jax.Array:
    """`[B, H, N, C, G]`: the weight of the chunk's entering state in what token t reads,
    `exp(query_t - enter)`, 0 past the chunk's first segment start."""
    reads_in = None if counts is None else counts == 0
    return masked_exp(pot.query - pot.enter[..., None, :], _expand(reads_in, pot.query.ndim))


def chunk_outputs(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    pot: Potentials,
    counts: jax.Array | None,
    states: jax.Array,
    tile: int | None,
) -> jax.Array:
    """`o: [B, H, N, C, V]`: what each token reads from its chunk's entering state (inter)
    plus what it reads from the earlier tokens of its chunk (intra)."""
    inter = jnp.einsum("bhnck,bhnkv->bhncv", q * entering_weight(pot, counts), states)
    scores = intra_scores(q, k, pot, counts, tile)
    return inter + jnp.einsum("bhnts,bhnsv->bhntv", scores, v)


def pair_mask(counts: jax.Array | None, size: int, strict: bool = False) -> jax.Array:
    """`[B, 1, N, C, C]` (`[1, 1, 1, C, C]` without segments) bool: s <= t (s < t when
    `strict`) in t's segment."""
    causal = jnp.tril(jnp.ones((1, 1, 1, size, size), bool), -1 if strict else 0)
    if counts is None:
        return causal
    return causal & (counts[..., :, None] == counts[..., None, :])


def intra_scores(
    q: jax.Array, k: jax.Array, pot: Potentials, counts: jax.Array | None, tile: int | None
) -> jax.Array:
    """`[B, H, N, C, C]`: `A_ts = sum_k q_tk k_sk exp(query_tk - key_sk)`, masked to s <= t in
    t's segment. `tile` cuts a per-channel chunk into tiles (module docstring); None, or a
    size that does not divide C, computes the whole chunk in log space."""
    size = q.shape[3]
    mask = pair_mask(counts, size)
    if pot.query.shape[-1] == 1:
        return jnp.einsum("bhntk,bhnsk->bhnts", q, k) * pair_weights(pot, mask)
    if tile is None or size % tile or tile >= size:
        log_weight = pot.query[..., :, None, :] - pot.key[..., None, :, :]  # [B, H, N, C, C, K]
        weight = masked_exp(log_weight, mask[..., None])
        return jnp.einsum("bhntk,bhnsk,bhntsk->bhnts", q, k, weight)
    return jax.lax.cond(
        factorable(pot),
        lambda: _factored_intra_scores(q, k, pot, mask, mid_chunk_potential(pot)),
        lambda: _tiled_intra_scores_by_chunk_groups(q, k, pot, mask, tile),
    )


def pair_weights(pot: Potentials, mask: jax.Array) -> jax.Array:
    """`[B, H, N, C, C]`: `exp(query_t - key_s)` of one potential per head (G = 1), 0 where
    not `mask`.

    When every potential of every chunk lies within `FACTORED_EXPONENT_LIMIT` of its chunk's
    midrange r (checked on the data, one `lax.cond`), the weights are the outer product of
    `exp(query_t - r)` and `exp(r - key_s)`: 2 C exps per chunk instead of C^2, which took
    as long as a `C x K x C` matmul. Otherwise one masked exp per pair.
    """
    query, key = pot.query[..., 0], pot.key[..., 0]  # [B, H, N, C]
    high = jnp.maximum(jnp.max(query, axis=-1), jnp.max(key, axis=-1))[..., None]
    low = jnp.minimum(jnp.min(query, axis=-1), jnp.min(key, axis=-1))[..., None]
    # The weights do not depend on r: no gradient flows through it.
    reference = lax.stop_gradient((high + low) / 2)

    def factored():
        outer = jnp.exp(query - reference)[..., :, None] * jnp.exp(reference - key)[..., None, :]
        return jnp.where(mask, outer, 0.0)

    def per_pair():
        return masked_exp(query[..., :, None] - key[..., None, :], mask)

    return lax.cond(jnp.max(high - low) <= 2 * FACTORED_EXPONENT_LIMIT, factored, per_pair)


def mid_chunk_potential(pot: Potentials) -> jax.Array:
    """`[B, H, N, 1, K]`: the reference of `_factored_intra_scores`, between the chunk's first
    and last key potentials."""
    return (pot.key[..., :1, :] + pot.key[..., -1:, :]) / 2


def factorable(pot: Potentials) -> jax.Array:
    """Scalar bool: every potential lies within `FACTORED_EXPONENT_LIMIT` of the mid-chunk
    one. The per-channel potentials are non-increasing in t (`query = key = b`, log-decays
    <= 0), so the chunk's first and last are the farthest from it, each by half their
    difference: only those are read."""
    spread = jnp.max(pot.key[..., 0, :] - pot.key[..., -1, :]) / 2
    return spread <= FACTORED_EXPONENT_LIMIT


def _factored_intra_scores(
    q: jax.Array, k: jax.Array, pot: Potentials, mask: jax.Array, reference: jax.Array
) -> jax.Array:
    """`intra_scores` as one matmul per chunk, `(q_t exp(query_t - r)) . (k_s exp(r - key_s))`
    around the mid-chunk potential r; exact, and safe while every exponent is within
    `FACTORED_EXPONENT_LIMIT` of r (the caller checks)."""
    query_factor = q * jnp.exp(pot.query - reference)
    key_factor = k * jnp.exp(reference - pot.key)
    return jnp.einsum("bhntk,bhnsk->bhnts", query_factor, key_factor) * mask


def _tiled_intra_scores_by_chunk_groups(
    q: jax.Array, k: jax.Array, pot: Potentials, mask: jax.Array, tile: int
) -> jax.Array:
    """`_tiled_intra_scores` over groups of `TILED_CHUNK_GROUP` chunks at a time, each group
    rematerialized in the backward pass: the log-space diagonal blocks hold `TILE * K`
    values per token, too many to keep for the whole sequence at once."""

    def group_first(x):  # [B, H, N, ...] -> [N, B, H, ...]
        return jnp.moveaxis(jnp.broadcast_to(x, (*q.shape[:3], *x.shape[3:])), 2, 0)

    def one_chunk(xs):
        q, k, query, key, mask = (x[:, :, None] for x in xs)
        return _tiled_intra_scores(q, k, Potentials(query, key, None, None), mask, tile)[:, :, 0]

    xs = tuple(group_first(x) for x in (q, k, pot.query, pot.key, mask))
    scores = jax.lax.map(jax.checkpoint(one_chunk), xs, batch_size=TILED_CHUNK_GROUP)
    return jnp.moveaxis(scores, 0, 2)


def _tiled_intra_scores(
    q: jax.Array, k: jax.Array, pot: Potentials, mask: jax.Array, tile: int
) -> jax.Array:
    """`intra_scores` for per-channel potentials that are non-increasing in t (`query = key =
    b`): off-diagonal tile blocks as matmuls around the key potential at the end of the tile
    before the query tile, diagonal blocks in log space."""
    batch, heads, num_chunks, size, dim = q.shape
    tiles = size // tile

    def split(x):  # [B, H, N, C, K] -> [B, H, N, I, c, K]
        return x.reshape(batch, heads, num_chunks, tiles, tile, dim)

    q, k, query, key = split(q), split(k), split(pot.query), split(pot.key)
    tile_end = key[..., -1, :]  # [B, H, N, I, K]
    # Query tile i reads earlier tiles through the key potential at the end of tile i - 1
    # (tile 0 reads no earlier tile; its own first potential keeps its factor <= 1).
    reference = jnp.concatenate([query[..., :1, 0, :], tile_end[..., :-1, :]], axis=3)
    query_factor = q * jnp.exp(query - reference[..., None, :])
    key_factor = k * jnp.exp(tile_end[..., None, :] - key)
    earlier = jnp.tril(jnp.ones((tiles, tiles), bool), -1)[..., None]
    between = masked_exp(reference[..., :, None, :] - tile_end[..., None, :, :], earlier)
    off_diagonal = jnp.einsum("bhnitk,bhnixk,bhnxsk->bhnitxs", query_factor, between, key_factor)

    log_weight = query[..., :, None, :] - key[..., None, :, :]  # [B, H, N, I, c, c, K]
    causal = jnp.tril(jnp.ones((tile, tile), bool))[..., None]
    diagonal = jnp.einsum("bhnitk,bhnisk,bhnitsk->bhnits", q, k, masked_exp(log_weight, causal))
    same_tile = jnp.eye(tiles, dtype=q.dtype)[:, None, :, None]
    scores = off_diagonal + diagonal[..., :, :, None, :] * same_tile
    return scores.reshape(batch, heads, num_chunks, size, size) * mask


def _leaf_axes(axes, tree):
    """`axes` (a pytree prefix of `tree` with int leaves) repeated down to every leaf of
    `tree`, in `tree`'s structure."""
    return jax.tree.map(lambda axis, sub: jax.tree.map(lambda _: axis, sub), axes, tree)


def block_chunks(xs, axes) -> int:
    """Chunks per block of `scan_blocks` for the leaves of `xs` (the chunks of each on its
    axis in `axes`): on CPU as many as keep the largest leaf's block within `BLOCK_BYTES`;
    elsewhere all of them (an accelerator wants the parallel work at once, and its chunked
    forms are the fallback of the Pallas kernels)."""
    leaves, leaf_axes = jax.tree.leaves(xs), jax.tree.leaves(_leaf_axes(axes, xs))
    num_chunks = leaves[0].shape[leaf_axes[0]]
    if jax.default_backend() != "cpu":
        return num_chunks
    per_chunk = max(
        x.size // x.shape[axis] * x.dtype.itemsize
        for x, axis in zip(leaves, leaf_axes, strict=True)
    )
    return max(1, BLOCK_BYTES // per_chunk)


def scan_blocks(fn, carry, xs, in_axes, out_axes, reverse: bool = False):
    """Runs `carry, ys_block = fn(carry, xs_block)` over blocks of `block_chunks` chunks.

    The leaves of `xs` (a pytree; None leaves allowed) have their chunks on the axes given by
    `in_axes` (a pytree prefix of `xs`, as `jax.vmap`'s), and those of `ys` on `out_axes`
    (a prefix of `ys`): 2 in the engine's layout `[B, H, N, ...]`, 1 for per-token inputs in
    `time_chunks`, `[B, N, C, H, ...]`. `ys` is returned whole with the last carry. `reverse`
    visits the blocks from the last. A sequence of at most one block is one call; otherwise
    the full blocks run in a loop that writes `ys` in place, and the shorter last block (if
    any) is one more call.
    """
    in_axes = _leaf_axes(in_axes, xs)
    num_chunks = jax.tree.leaves(xs)[0].shape[jax.tree.leaves(in_axes)[0]]
    size = block_chunks(xs, in_axes)
    if num_chunks <= size:
        return fn(carry, xs)
    full = num_chunks // size * size

    def block(start, size):
        return jax.tree.map(
            lambda axis, x: lax.dynamic_slice_in_dim(x, start, size, axis), in_axes, xs
        )

    def write(ys, ys_block, start):
        return jax.tree.map(
            lambda axis, y, y_block: lax.dynamic_update_slice_in_dim(y, y_block, start, axis),
            _leaf_axes(out_axes, ys),
            ys,
            ys_block,
        )

    def stitched(ys_shape):
        def whole(axis, y):
            return jnp.zeros((*y.shape[:axis], num_chunks, *y.shape[axis + 1 :]), y.dtype)

        return jax.tree.map(whole, _leaf_axes(out_axes, ys_shape), ys_shape)

    def step(i, loop_carry):
        carry, ys = loop_carry
        start = (full // size - 1 - i if reverse else i) * size
        carry, ys_block = fn(carry, block(start, size))
        return carry, write(ys, ys_block, start)

    def loop(carry, ys):
        return lax.fori_loop(0, full // size, step, (carry, ys))

    def last(carry, ys):
        if full == num_chunks:
            return carry, ys
        carry, ys_block = fn(carry, block(full, num_chunks - full))
        return carry, write(ys, ys_block, full)

    ys = stitched(jax.eval_shape(fn, carry, block(0, size))[1])
    if reverse:
        return loop(*last(carry, ys))
    return last(*loop(carry, ys))


def _block_axes(gates: jax.Array | Potentials) -> tuple:
    """`scan_blocks` axes of `chunked`'s inputs `(q, k, v, gates, counts)`: log-decay gates
    are per-token inputs in `time_chunks` (axis 1), Potentials in the engine's layout."""
    return (1, 1, 1, 2 if isinstance(gates, Potentials) else 1, 2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def chunked(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    gates: jax.Array | Potentials,
    initial_state: jax.Array,
    counts: jax.Array | None,
    tile: int | None,
    scale: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The chunked recurrence on `q, k: [B, N, C, H, K]`, `v: [B, N, C, H, V]` (`time_chunks`),
    `gates` (below), `counts` (from `segment_counts`, or None) in the engine's layout,
    `initial_state: [B, H, K, V]`, and the scalar `scale` of the queries (applied per block,
    where it costs no pass over memory of its own: 8% of GLA's forward at K = 64).

    `gates` are log-decays `g: [B, N, C, H, G]` in `time_chunks`, whose potentials each block
    builds in cache (`chunk_decay_potentials`: the prefix sums and the move of heads first
    over the whole sequence took a quarter of GLA's forward), or the `Potentials` of gates
    that are not plain decays (mLSTM's) in the engine's layout.

    Returns `(o [B, N, C, H, V], final_state [B, H, K, V], states [B, H, N, K, V])`, the
    last being the states entering every chunk. Reverse-mode only (a `custom_vjp`).
    """

    def block(state, xs):
        q, k, v, gates, counts = xs
        q, k, v = heads_first(q) * scale, heads_first(k), heads_first(v)
        pot = block_potentials(gates)
        states, final = pass_states(*chunk_summaries(k, v, pot, counts), state)
        o = chunk_outputs(q, k, v, pot, counts, states, tile)
        return final, (heads_last(o), states)

    xs = (q, k, v, gates, counts)
    final, (o, states) = scan_blocks(block, initial_state, xs, _block_axes(gates), (1, 2))
    return o, final, states


def _chunked_fwd(q, k, v, gates, initial_state, counts, tile, scale):
    out = chunked(q, k, v, gates, initial_state, counts, tile, scale)
    return out, (q, k, v, gates, counts, scale, out[2])


def _chunked_bwd(tile, residuals, cotangents):
    q, k, v, gates, counts, scale, states = residuals
    d_out, d_final, d_states = cotangents

    def block(carry, xs):
        d_final, d_scale = carry
        q, k, v, gates, counts, states, d_out, d_states = xs
        unscaled_q, k, v, d_out = (heads_first(x) for x in (q, k, v, d_out))
        q = unscaled_q * scale
        pot, potentials_vjp = jax.vjp(block_potentials, gates)
        _, outputs_vjp = jax.vjp(
            lambda q, k, v, pot, states: chunk_outputs(q, k, v, pot, counts, states, tile),
            q,
            k,
            v,
            pot,
            states,
        )
        dq, dk, dv, d_pot, d_states_read = outputs_vjp(d_out)
        (decay, _), summaries_vjp = jax.vjp(
            lambda k, v, pot: chunk_summaries(k, v, pot, counts), k, v, pot
        )
        # Gradient w.r.t. the state leaving chunk n (entering n + 1): what chunk n + 1 reads
        # from it, plus what flows back through chunk n + 1's decay.
        d_leaving, d_initial = pass_states(decay, d_states_read + d_states, d_final, reverse=True)
        d_decay = jnp.sum(d_leaving * states, axis=-1, keepdims=True)
        if decay.shape[-2] == 1:
            d_decay = jnp.sum(d_decay, axis=-2, keepdims=True)
        dk2, dv2, d_pot2 = summaries_vjp((d_decay, d_leaving))
        (d_gates,) = potentials_vjp(jax.tree.map(jnp.add, d_pot, d_pot2))
        d_scale = d_scale + jnp.sum(dq * unscaled_q)
        d_inputs = (heads_last(x) for x in (dq * scale, dk + dk2, dv + dv2))
        return (d_initial, d_scale), (*d_inputs, d_gates)

    xs = (q, k, v, gates, counts, states, d_out, d_states)
    in_axes = (*_block_axes(gates), 2, 1, 2)
    out_axes = _block_axes(gates)[:4]
    carry = (d_final, jnp.zeros_like(scale))
    (d_initial, d_scale), (dq, dk, dv, d_gates) = scan_blocks(
        block, carry, xs, in_axes, out_axes, True
    )
    return dq, dk, dv, d_gates, d_initial, None, d_scale


chunked.defvjp(_chunked_fwd, _chunked_bwd)
