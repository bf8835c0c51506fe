"""N-gram heads: attention with a fixed pattern that reads what followed earlier occurrences of
the current n-gram (Akyürek, Wang, Kim and Andreas, "In-Context Language Learning:
Architectures and Algorithms", ICML 2024, Section 7; berlino/seq_icl
`src/models/sequence/rnn/ngram.py`, `induction_head` and `Ngram`).

For an order N, position t attends with equal weights to every earlier position s whose N
preceding tokens are the N tokens ending at t, and reads the input there, i.e. the token that
followed that earlier occurrence (an in-context n-gram model of the next token):

    A_N[t, s] = 1  iff  s < t  and  x_{s-1-k} = x_{t-k}  for k = 0 .. N-1
    h_N[t]    = sum_s A_N[t, s] x_s / sum_s A_N[t, s]        (0 where no s matches)
    y[t]      = sum_N h_N[t] W_N + x_t W_x + b

The pattern `A_N` has no parameters and passes no gradient (the reference builds it from the
input token ids); the values `x_s` do. All the compared positions must lie in the document of
`t` (packed segments never match across a boundary; the reference has one document per row),
so `s >= N` and `t >= N - 1` within it. The reference uses one layer per order, each
`t0(h_N) + t1(x)` with two biased linear maps, at layers 1-3 of an 8-layer hybrid (orders 1, 2,
3 beside RetNet; 1, 2, 4 beside GLA); here one layer holds a head per order in `orders`
(default 1, 2, 3) and one output map of `[h_1 .. h_N, x]`, the same function as summing the
per-order maps.

Token identity. A mixer sees vectors, not token ids: "x_a = x_b" is equality of the layer's
input vectors (relative squared distance `|x_a - x_b|^2 <= tol (|x_a|^2 + |x_b|^2)`, `tol =
match_tolerance`, which absorbs float rounding between the parallel and the decoding pass).
Directly after the embedding the input is `RMSNorm(E[token])`, a function of the token alone,
so there the heads are exactly the reference's: place the n-gram layer first
(`layers=("ngram", "gla", ...)`). Deeper, inputs are contextual and equal vectors mean equal
contexts.

The cache holds every input seen (the heads look back without limit, like full attention),
the document number of each and their count; decoding token by token equals the parallel pass.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from seqjax.nn.layers import dense
from seqjax.nn.mixer import frozen, positive, require
from seqjax.scan import segment_index


@frozen
class NgramConfig:
    """`width` (d_model), the head `orders` (N of each head; the reference's RetNet hybrid has
    1, 2 and 3), and `match_tolerance` (the relative squared distance under which two inputs
    count as the same token)."""

    width: int
    orders: tuple[int, ...] = (1, 2, 3)
    match_tolerance: float = 1e-3

    def __post_init__(self):
        # Config files give lists; a frozen config must stay hashable.
        object.__setattr__(self, "orders", tuple(self.orders))
        positive(self, "width")
        require(len(self.orders) > 0, "orders", "expected at least one order")
        for order in self.orders:
            ok = isinstance(order, int) and order > 0
            require(ok, "orders", f"expected positive ints, got {self.orders}")
        require(0 < self.match_tolerance < 1, "match_tolerance", "expected a value in (0, 1)")


class NgramCache(NamedTuple):
    """inputs: `[B, C, D]`, the layer's inputs seen (slots at and after `length` are unused);
    documents: `[B, C]` int32, each slot's document number (it grows at each packed segment);
    length: `[B]` int32, the number of tokens seen."""

    inputs: jax.Array
    documents: jax.Array
    length: jax.Array


def _rows(x: jax.Array, slots: jax.Array) -> jax.Array:
    """`x[b, slots[b, t]]` for `x: [B, S, ...]`, `slots: [B, T]` (clipped into range)."""
    index = jnp.clip(slots, 0, x.shape[1] - 1)
    return jnp.take_along_axis(x, index.reshape(*index.shape, *(1,) * (x.ndim - 2)), axis=1)


def _shift(x: jax.Array, steps: int, fill) -> jax.Array:
    """`x[..., s - steps]` along the last axis, `fill` where `s < steps`."""
    pad = [(0, 0)] * (x.ndim - 1) + [(steps, 0)]
    return jnp.pad(x, pad, constant_values=fill)[..., : x.shape[-1]]


def same_tokens(a: jax.Array, b: jax.Array, tolerance: float) -> jax.Array:
    """`[B, T, S]` bool: `a[:, t]` and `b[:, s]` (`[B, T, D]`, `[B, S, D]`) are the same vector
    up to a relative squared distance `tolerance`."""
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    # Full float32 products: the bfloat16 passes an accelerator may default to would blur
    # equal vectors into unequal ones.
    dot = jnp.einsum("btd,bsd->bts", a, b, precision=jax.lax.Precision.HIGHEST)
    a2 = jnp.sum(a * a, axis=-1)[:, :, None]
    b2 = jnp.sum(b * b, axis=-1)[:, None, :]
    return a2 + b2 - 2 * dot <= tolerance * (a2 + b2)


def ngram_attention(
    inputs: jax.Array,
    documents: jax.Array,
    query_slots: jax.Array,
    orders: tuple[int, ...],
    tolerance: float = 1e-3,
) -> jax.Array:
    """The n-gram heads `h_N` of `orders` (module docstring) for the queries at `query_slots`.

    inputs: `[B, S, D]`, the sequence so far (keys and values; the queries' own inputs at
    their slots). documents: `[B, S]` int, the document of each slot. query_slots: `[B, T]`
    int, the slot of each query (slots after a query's are never read by it). Returns
    `[B, T, H, D]` float32, head `h` of order `orders[h]`. Costs `max(orders)` comparisons of
    the T queries' inputs with the S slots' (`O(T S D)` each), shared by the heads.
    """
    require(
        documents.shape == inputs.shape[:2],
        "documents",
        f"expected [B, S] = {inputs.shape[:2]} (inputs: [B, S, D]), got {documents.shape}",
    )
    require(
        query_slots.ndim == 2 and query_slots.shape[0] == inputs.shape[0],
        "query_slots",
        f"expected [B, T] with B = {inputs.shape[0]}, got {query_slots.shape}",
    )
    for order in orders:
        ok = isinstance(order, int) and order > 0
        require(ok, "orders", f"expected positive ints, got {orders!r}")
    pattern = jax.lax.stop_gradient(inputs)
    query_document = _rows(documents, query_slots)
    same_document = documents[:, None, :] == query_document[:, :, None]
    slots = jnp.arange(inputs.shape[1])
    # The n-grams ending at t and at s - 1 agree on their last k + 1 tokens.
    suffix = (slots[None, None, :] < query_slots[:, :, None]) & same_document  # s < t
    suffixes = []
    for k in range(max(orders)):
        # x_{t-k} against x_{s-1-k} for every s.
        query_rows = _rows(pattern, query_slots - k)
        suffix &= _shift(same_tokens(query_rows, pattern, tolerance), 1 + k, False)
        suffixes.append(suffix)
    heads = []
    for order in orders:
        # Every compared slot in the query's document: s-N .. s and t-N+1 .. t (contiguous).
        key_inside = _shift(documents, order, -1) == documents
        query_inside = (_rows(documents, query_slots - (order - 1)) == query_document) & (
            query_slots >= order - 1
        )
        match = suffixes[order - 1] & key_inside[:, None, :] & query_inside[:, :, None]
        weights = match / jnp.maximum(jnp.sum(match, axis=-1, keepdims=True), 1)
        heads.append(jnp.einsum("bts,bsd->btd", weights, inputs.astype(jnp.float32)))
    return jnp.stack(heads, axis=2)


def _write(buffer: jax.Array, new: jax.Array, start: jax.Array) -> jax.Array:
    """`buffer[b, start[b] : start[b] + T] = new[b]` (the cache must have room)."""
    return jax.vmap(lambda buf, x, s: jax.lax.dynamic_update_slice_in_dim(buf, x, s, axis=0))(
        buffer, new.astype(buffer.dtype), start
    )


class Ngram(nn.Module):
    """The n-gram heads of `config.orders` and their output map (module docstring).

    A call without a cache returns the cache of exactly its tokens: to decode on, start from
    `init_cache(batch, max_length)`, whose capacity bounds the tokens the layer can hold.
    """

    config: NgramConfig

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        *,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
        cache: NgramCache | None = None,
    ) -> tuple[jax.Array, NgramCache]:
        del positions  # the pattern depends on token identity alone
        c = self.config
        batch, length, _ = x.shape
        documents = (
            jnp.zeros((batch, length), jnp.int32)
            if segment_ids is None
            else segment_index(segment_ids)
        )
        if cache is None:
            inputs, slot_documents = x, documents
            start = jnp.zeros((batch,), jnp.int32)
        else:
            # The call's first segment continues the cache's last document.
            last = _rows(cache.documents, cache.length[:, None] - 1)[:, 0]
            documents = documents + jnp.where(cache.length > 0, last, 0)[:, None]
            start = cache.length
            inputs = _write(cache.inputs, x, start)
            slot_documents = _write(cache.documents, documents, start)
        query_slots = start[:, None] + jnp.arange(length)
        heads = ngram_attention(inputs, slot_documents, query_slots, c.orders, c.match_tolerance)
        features = jnp.concatenate([heads.astype(x.dtype), x[:, :, None]], axis=2)  # [B, T, H+1, D]
        y = dense(c.width, (None, None, "embed"), "o", axis=(-2, -1), use_bias=True)(features)
        return y, NgramCache(inputs, slot_documents, start + length)

    def init_cache(self, batch_size: int, max_length: int, dtype=jnp.float32) -> NgramCache:
        return NgramCache(
            jnp.zeros((batch_size, max_length, self.config.width), dtype),
            jnp.zeros((batch_size, max_length), jnp.int32),
            jnp.zeros((batch_size,), jnp.int32),
        )
