"""Softmax attention with grouped-query heads, sliding windows, packed segments and a KV cache.

For query t of head h (key/value head `h // G` with `G = H / Hkv` queries per key head),

    o_t = sum_{s in vis(t)} softmax_s(scale q_t . k_s + bias_{h,t,s}) v_s,

    vis(t) = {s : same segment as t,  s <= t if causal,  s > t - window if window},

so the window counts the query itself and the `window - 1` tokens before it. Scores and the
softmax are float32 whatever the input dtype. A query that sees no key (only possible with a
`bias` of `-inf`) outputs zeros.

Impls (all agree in values and gradients; `benchmarks/attention.py` measures them):

- `"reference"`: the scores materialized, `[B, H, T, S]`; the readable ground truth.
- `"xla"`: `jax.nn.dot_product_attention`, which asks for cuDNN's flash attention on GPU when the
  call is one cuDNN supports (causal or local window, no segments, cache or bias) and is XLA's
  materialized form otherwise.
- `"blockwise"`: flash attention in pure JAX: a loop over query blocks, and inside it an
  online-softmax loop (`seqjax.scan.online_softmax`) over only the key blocks a query block can
  see (causal and window block ranges are skipped, not masked), with a `custom_vjp` whose
  backward recomputes the probabilities block by block from the saved log-sum-exp
  (FlashAttention-2). Memory O(B H T (K + V) + B H block^2); compute O(T^2) causal, O(T window)
  windowed. Being a `custom_vjp`, it has no forward mode (`jax.jvp`, `jax.hessian`): use
  `"reference"` or `"xla"` for those, since `"auto"` may pick it.
- `"pallas"`: the flash-attention kernels that ship with JAX (Triton on GPU, splash on TPU;
  interpreted on CPU), see `seqjax.ops.attention_pallas` for what each supports. A call a
  kernel cannot do falls back to `"xla"` on GPU and to `"blockwise"` elsewhere.
- `"auto"`: `"pallas"` on TPU where splash supports the call, else `"blockwise"`; `"xla"` on
  GPU (cuDNN); on CPU `"xla"` up to `AUTO_BLOCKWISE_LENGTH` keys and `"blockwise"` beyond
  (`benchmarks/attention.py` measures both).

The state is a `KVCache`: the keys and values a later query can see, and their positions. The
parallel form returns it (`final_state`) and takes one (`initial_state`, the cache of the tokens
before `q`), so prefill, chunked prefill and speculative verification are one call;
`softmax_attention_step` decodes one token. A cache of capacity `C` stores position `p` in slot
`p % C`: with a window `C >= window` makes it a ring buffer (decode memory O(window)); without
one, `C` must hold every token. Unlike the recurrent ops' states, a cache stores keys and values
in their own dtype: it holds inputs, not accumulations.
"""

from __future__ import annotations

import functools
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from seqjax import checks
from seqjax.ops import attention_pallas
from seqjax.ops.common import take_rows
from seqjax.scan import online_softmax, segment_index, segment_starts
from seqjax.scan.linear_recurrence import accumulation_dtype

AttentionImpl = Literal["auto", "reference", "xla", "blockwise", "pallas"]
ATTENTION_IMPLS: tuple[str, ...] = ("auto", "reference", "xla", "blockwise", "pallas")
DEFAULT_BLOCK_SIZE = 512
AUTO_BLOCKWISE_LENGTH = 256


class KVCache(NamedTuple):
    """Keys and values a later query attends to.

    k: `[B, C, Hkv, K]`, v: `[B, C, Hkv, V]`; positions: `[B, C]` int32, the token position held
    by each slot, -1 for an empty slot (or one a later query must not see: an earlier packed
    segment); length: `[B]` int32, the number of tokens seen, i.e. the next token's position.
    """

    k: jax.Array
    v: jax.Array
    positions: jax.Array
    length: jax.Array


def init_kv_cache(
    batch: int, capacity: int, kv_heads: int, key_dim: int, value_dim: int, dtype=jnp.float32
) -> KVCache:
    """An empty cache of `capacity` slots (`window` suffices for sliding-window attention)."""
    for name, value in (
        ("batch", batch),
        ("capacity", capacity),
        ("kv_heads", kv_heads),
        ("key_dim", key_dim),
        ("value_dim", value_dim),
    ):
        checks.check_positive(name, value)
    return KVCache(
        jnp.zeros((batch, capacity, kv_heads, key_dim), dtype),
        jnp.zeros((batch, capacity, kv_heads, value_dim), dtype),
        jnp.full((batch, capacity), -1, jnp.int32),
        jnp.zeros((batch,), jnp.int32),
    )


# ----------------------------------------------------------------------------- masks


class Visibility(NamedTuple):
    """What decides which keys a query sees, for queries `[B, T]` and keys `[B, S]`.

    Positions are absolute (a cache's tokens come before the new ones); a key with position
    -1 is invisible; segments are `segment_index`es, equal within a packed document.
    """

    q_positions: jax.Array
    q_segments: jax.Array
    k_positions: jax.Array
    k_segments: jax.Array


def visible(
    vis: Visibility, causal: bool, window: int | None, q_index=slice(None), k_index=slice(None)
) -> jax.Array:
    """`[B, Tq, Sk]` bool: query t sees key s (for the given query and key index ranges)."""
    qp = vis.q_positions[:, q_index, None]
    kp = vis.k_positions[:, None, k_index]
    ok = (kp >= 0) & (vis.q_segments[:, q_index, None] == vis.k_segments[:, None, k_index])
    if causal:
        ok &= kp <= qp
    if window is not None:
        ok &= kp > qp - window
    return ok


def _visibility(batch, length, key_length, segment_ids, cache) -> Visibility:
    """Positions and segments of the queries `[B, T]` and of the keys `[cache; new]`.

    Without a cache, keys and queries are the same tokens, except in non-causal cross
    attention (`key_length != length`), where only the positions' validity matters.
    """
    start = jnp.zeros((batch,), jnp.int32) if cache is None else cache.length
    positions = start[:, None] + jnp.arange(length, dtype=jnp.int32)
    segments = (
        jnp.zeros((batch, length), jnp.int32) if segment_ids is None else segment_index(segment_ids)
    )
    if key_length != length:
        key_positions = jnp.broadcast_to(
            jnp.arange(key_length, dtype=jnp.int32), (batch, key_length)
        )
        return Visibility(positions, segments, key_positions, jnp.zeros_like(key_positions))
    if cache is None:
        return Visibility(positions, segments, positions, segments)
    # The cache's tokens belong to the first segment of the row: `initial_state` seeds it.
    cache_segments = jnp.broadcast_to(segments[:, :1], cache.positions.shape)
    return Visibility(
        positions,
        segments,
        jnp.concatenate([cache.positions, positions], axis=1),
        jnp.concatenate([cache_segments, segments], axis=1),
    )


# ----------------------------------------------------------------------------- the cache


def ring_write(
    slots: tuple[jax.Array, ...],
    positions: jax.Array,
    length: jax.Array,
    new: tuple[jax.Array, ...],
    segment_ids: jax.Array | None,
) -> tuple[tuple[jax.Array, ...], jax.Array, jax.Array]:
    """Writes the tokens `new` (arrays `[B, T, ...]`) into cache slots `[B, C, ...]`.

    Position p lives in slot `p mod C`, so after `n = length + T` tokens slot c holds the
    newest position `p = (n - 1) - ((n - 1 - c) mod C)`: from `new` if `p >= length`, else the
    slot keeps what it had. Slots before the row's last segment are emptied (position -1,
    zeros), since a later token continues that segment. Returns `(slots, positions, n)`.
    """
    count = new[0].shape[1]
    capacity = positions.shape[1]
    end = length + count
    index = jnp.arange(capacity, dtype=jnp.int32)
    newest = (end[:, None] - 1) - jnp.mod(end[:, None] - 1 - index, capacity)  # [B, C]
    is_new = newest >= length[:, None]
    source = jnp.clip(newest - length[:, None], 0, count - 1)
    positions = jnp.where(is_new, newest, positions)
    if segment_ids is not None:
        starts = segment_starts(segment_ids)
        last_start = jnp.max(jnp.where(starts, jnp.arange(count, dtype=jnp.int32), 0), axis=1)
        # A row whose tokens continue one segment keeps the cache's older tokens.
        first = jnp.where(jnp.any(starts, axis=1), length + last_start, 0)
        positions = jnp.where(positions >= first[:, None], positions, -1)
    keep = positions >= 0

    def write(old, x):
        fresh = take_rows(x, source).astype(old.dtype)
        expand = (...,) + (None,) * (old.ndim - 2)
        return jnp.where(keep[expand], jnp.where(is_new[expand], fresh, old), 0)

    slots = tuple(write(old, x) for old, x in zip(slots, new, strict=True))
    return slots, jnp.where(keep, positions, -1), end.astype(jnp.int32)


def _write_token(cache: KVCache, k: jax.Array, v: jax.Array) -> KVCache:
    """The cache after one more token `k, v: [B, Hkv, *]`: position `length` into slot
    `length mod C`, the other slots untouched (what `ring_write` does for one token without
    segments, as a scatter of one row instead of a select over every slot, so a decode step
    costs O(1) writes)."""
    rows = jnp.arange(cache.k.shape[0])
    slot = jnp.mod(cache.length, cache.positions.shape[1])
    return KVCache(
        cache.k.at[rows, slot].set(k.astype(cache.k.dtype)),
        cache.v.at[rows, slot].set(v.astype(cache.v.dtype)),
        cache.positions.at[rows, slot].set(cache.length),
        cache.length + 1,
    )


def _final_cache(cache, k, v, segment_ids, window) -> KVCache:
    """The cache after the tokens `k, v: [B, T, Hkv, *]` (a new one of capacity T, or
    `window`, when `cache` is None)."""
    if cache is None:
        batch, length, kv_heads, key_dim = k.shape
        capacity = length if window is None else window
        cache = init_kv_cache(batch, capacity, kv_heads, key_dim, v.shape[3], k.dtype)
    (keys, values), positions, length = ring_write(
        (cache.k, cache.v), cache.positions, cache.length, (k, v), segment_ids
    )
    return KVCache(keys, values, positions, length)


# ----------------------------------------------------------------------------- validation


def _validate(q, k, v, causal, window, segment_ids, bias, cache, impl, block_size):
    dims = checks.Dims()
    dims.check("q", q, "B T H K")
    dims.check("k", k, "B S G K")
    dims.check("v", v, "B S G V")
    for name, x in (("q", q), ("k", k), ("v", v)):
        checks.check_floating(name, x)
    heads, kv_heads = q.shape[2], k.shape[2]
    if heads % kv_heads:
        raise ValueError(
            f"k, v: expected a number of heads dividing q's H = {heads} (grouped-query "
            f"attention), got {kv_heads}"
        )
    if window is not None:
        checks.check_positive("window", window)
        if not causal:
            raise ValueError("window: a sliding window needs causal=True, got causal=False")
    if (causal or segment_ids is not None or cache is not None) and k.shape[1] != q.shape[1]:
        raise ValueError(
            f"k, v: causal attention, segment_ids and initial_state need as many keys as "
            f"queries, S = T = {q.shape[1]}, got S = {k.shape[1]}"
        )
    checks.check_segment_ids(segment_ids, *q.shape[:2])
    if cache is not None:
        batch, _, kv, key_dim = k.shape
        dims = checks.Dims(B=batch, G=kv, K=key_dim, V=v.shape[3])
        dims.check("initial_state.k", cache.k, "B C G K")
        dims.check("initial_state.v", cache.v, "B C G V")
        dims.check("initial_state.positions", cache.positions, "B C")
        dims.check("initial_state.length", cache.length, "B")
        _check_capacity(cache, q.shape[1], window, "initial_state")
    if bias is not None:
        keys = k.shape[1] + (0 if cache is None else cache.k.shape[1])
        full = (q.shape[0], heads, q.shape[1], keys)
        if jnp.ndim(bias) != 4 or any(
            b not in (1, f) for b, f in zip(bias.shape, full, strict=True)
        ):
            raise ValueError(
                f"bias: expected 4 dims broadcastable to [B, H, T, S] = {list(full)} (S counts "
                f"the cache's slots first), got {jnp.shape(bias)}"
            )
        checks.check_floating("bias", bias)
    checks.check_choice("impl", impl, ATTENTION_IMPLS)
    checks.check_positive("block_size", block_size)


def _check_capacity(cache: KVCache, new_tokens: int, window: int | None, name: str) -> None:
    capacity = cache.k.shape[1]
    if window is not None:
        if capacity < window:
            raise ValueError(
                f"{name}: a ring buffer for window {window} needs at least {window} slots, got "
                f"capacity {capacity}"
            )
        return
    checks.check_values(
        f"{name}.length",
        cache.length + new_tokens <= capacity,
        f"room for {new_tokens} more token(s): length + {new_tokens} <= capacity {capacity} "
        "(without a window the cache holds every token)",
    )


# ----------------------------------------------------------------------------- impls


def _group(q: jax.Array, kv_heads: int) -> jax.Array:
    """`[B, T, H, K] -> [B, T, Hkv, G, K]`: query heads grouped by the key head they share."""
    b, t, h, d = q.shape
    return q.reshape(b, t, kv_heads, h // kv_heads, d)


def _grouped_bias(bias: jax.Array, kv_heads: int) -> jax.Array:
    """`[B|1, H|1, T|1, S|1] -> [B|1, Hkv|1, G|1, T|1, S|1]`."""
    b, h, t, s = bias.shape
    if h == 1:
        return bias.reshape(b, 1, 1, t, s)
    return bias.reshape(b, kv_heads, h // kv_heads, t, s)


def _reference(q, k, v, vis, causal, window, bias, scale):
    """Materialized scores `[B, Hkv, G, T, S]` in float32 (or wider for float64 inputs)."""
    acc = accumulation_dtype(q.dtype)
    qg = _group(q, k.shape[2])
    s = jnp.einsum("btngk,bsnk->bngts", qg, k, preferred_element_type=acc) * scale
    if bias is not None:
        s = s + _grouped_bias(bias, k.shape[2]).astype(acc)
    mask = visible(vis, causal, window)[:, None, None]
    s = jnp.where(mask, s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.exp(s - jnp.where(jnp.isneginf(m), 0.0, m))
    u = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(u > 0, u, 1.0)
    o = jnp.einsum("bngts,bsnv->btngv", p, v.astype(acc))
    return o.reshape(*q.shape[:3], v.shape[-1])


def _xla(q, k, v, vis, causal, window, bias, scale, structured):
    """`jax.nn.dot_product_attention`; `structured` calls pass the mask as `is_causal` and
    `local_window_size` (what lets cuDNN skip masked blocks) instead of a dense mask."""
    if structured:
        mask, local = None, None if window is None else (window - 1, 0)
        is_causal = causal
    else:
        mask, local, is_causal = visible(vis, causal, window)[:, None], None, False
    # dot_product_attention wants one head size for q, k and v: zero columns pad the smaller
    # (zero key columns add nothing to the scores; zero value columns are sliced off).
    acc = accumulation_dtype(q.dtype)
    key_dim, value_dim = k.shape[-1], v.shape[-1]
    width = max(key_dim, value_dim)
    q, k, v = (_pad_axis(x, 3, width) for x in (q, k, v))
    call = functools.partial(
        jax.nn.dot_product_attention,
        q,
        k,
        v,
        bias=None if bias is None else bias.astype(jnp.float32),
        mask=mask,
        scale=scale,
        is_causal=is_causal,
        local_window_size=local,
    )
    o = None
    if structured and jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16):
        # cuDNN's flash attention, where it takes the shapes (it raises when tracing if not).
        try:
            o = call(implementation="cudnn")
        except (ValueError, NotImplementedError):
            o = None
    if o is None:
        o = call()
    o = o[..., :value_dim].astype(acc)
    if structured and bias is None:
        return o  # every query sees itself
    # A query that sees no key gets zeros, as in the other impls (dot_product_attention
    # averages the values then).
    seen = visible(vis, causal, window)[:, None]
    if bias is not None:
        seen = seen & jnp.isfinite(bias)
    has_key = jnp.moveaxis(jnp.any(seen, axis=-1), 1, 2)  # [B, T, H or 1]
    return jnp.where(has_key[..., None], o, 0.0)


# ----------------------------------------------------------------------------- blockwise


class _Blocks(NamedTuple):
    """Static block layout: `nq` query blocks; `nc` key blocks of cache, then `nk` of new keys.

    In causal attention queries and new keys are the same tokens, so query block i and
    new-key block i hold the same positions.
    """

    size: int
    nq: int
    nc: int
    nk: int


def _pad_axis(x: jax.Array, axis: int, length: int, value=0) -> jax.Array:
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, length - x.shape[axis])
    return jnp.pad(x, pad, constant_values=value)


def _key_block_range(i, blocks: _Blocks, causal: bool, window: int | None):
    """New-key blocks `[lo, hi]` query block `i` can see."""
    hi = i if causal else blocks.nk - 1
    if window is None:
        return 0, hi
    return jnp.maximum(0, (i * blocks.size - window + 1) // blocks.size), hi


def _query_block_range(j, blocks: _Blocks, causal: bool, window: int | None):
    """Query blocks `[lo, hi]` that can see new-key block `j`."""
    if not causal:
        return 0, blocks.nq - 1
    if window is None:
        return j, blocks.nq - 1
    return j, jnp.minimum(blocks.nq - 1, ((j + 1) * blocks.size - 2 + window) // blocks.size)


def _bias_block(bias, i, j, size):
    """The `[B|1, Hkv|1, G|1, size|1, size|1]` block of the grouped bias at query block i,
    key block j (broadcast axes stay of size 1)."""
    t, s = bias.shape[-2:]
    starts = (0, 0, 0, 0 if t == 1 else i * size, 0 if s == 1 else j * size)
    sizes = (*bias.shape[:3], 1 if t == 1 else size, 1 if s == 1 else size)
    return lax.dynamic_slice(bias, starts, sizes)


def _scores(qb, kb, vis, i, j, blocks, causal, window, bias, scale):
    """Scores `[B, Hkv, G, Bq, Bk]` of query block i against key block j, masked with -inf."""
    size = blocks.size
    acc = accumulation_dtype(qb.dtype)
    s = jnp.einsum("btngk,bsnk->bngts", qb, kb, preferred_element_type=acc) * scale
    if bias is not None:
        s = s + _bias_block(bias, i, j, size).astype(acc)
    q_index = lax.dynamic_slice_in_dim(jnp.arange(vis.q_positions.shape[1]), i * size, size)
    k_index = lax.dynamic_slice_in_dim(jnp.arange(vis.k_positions.shape[1]), j * size, size)
    mask = visible(vis, causal, window, q_index, k_index)[:, None, None]
    return jnp.where(mask, s, -jnp.inf)


def _blockwise_forward(q, k, v, vis, bias, causal, window, scale, blocks):
    """Returns `o: [B, Tp, Hkv, G, V]` float32 and `lse: [B, Hkv, G, Tp]`."""
    size = blocks.size
    batch, _, kv_heads, groups, _ = q.shape
    value_dim = v.shape[-1]
    acc = accumulation_dtype(q.dtype)

    def query_block(_, i):
        qb = lax.dynamic_slice_in_dim(q, i * size, size, axis=1)
        lo, hi = _key_block_range(i, blocks, causal, window)

        def visit(step, partial):
            j = jnp.where(step < blocks.nc, step, step + lo)
            kb = lax.dynamic_slice_in_dim(k, j * size, size, axis=1)
            vb = lax.dynamic_slice_in_dim(v, j * size, size, axis=1)
            s = _scores(qb, kb, vis, i, j, blocks, causal, window, bias, scale)
            m = jnp.max(s, axis=-1)
            p = jnp.exp(s - jnp.where(jnp.isneginf(m), 0.0, m)[..., None])
            w = jnp.einsum("bngts,bsnv->bngtv", p, vb, preferred_element_type=acc)
            block = online_softmax.SoftmaxPartial(m, jnp.sum(p, axis=-1), w)
            return online_softmax.combine(partial, block)

        start = online_softmax.empty_partial((batch, kv_heads, groups, size), value_dim, acc)
        partial = lax.fori_loop(0, blocks.nc + hi - lo + 1, visit, start)
        lse = partial.max + jnp.log(partial.denominator)
        return None, (online_softmax.normalize(partial), lse)

    _, (o, lse) = lax.scan(query_block, None, jnp.arange(blocks.nq))
    # o: [Nq, B, Hkv, G, size, V] -> [B, Tp, Hkv, G, V]; lse: [Nq, B, Hkv, G, size].
    o = jnp.moveaxis(o, 4, 1).reshape(blocks.nq, size, batch, kv_heads, groups, value_dim)
    o = jnp.moveaxis(o, 2, 0).reshape(batch, blocks.nq * size, kv_heads, groups, value_dim)
    lse = jnp.moveaxis(lse, 0, 3).reshape(batch, kv_heads, groups, blocks.nq * size)
    return o, lse


def _blockwise_backward(q, k, v, vis, bias, causal, window, scale, blocks, o, lse, do):
    """FlashAttention-2's backward: for each key block, the query blocks that see it.

    With `P = exp(S - lse)` recomputed per block and `D_t = do_t . o_t`:
    `dv_j += P^T do`, `dS = P * (do v_j^T - D)`, `dk_j += scale dS^T q`, `dq += scale dS k_j`,
    `dbias = dS`.
    """
    size = blocks.size
    acc = accumulation_dtype(q.dtype)
    delta = jnp.einsum("btngv,btngv->bngt", do, o)
    lse_safe = jnp.where(jnp.isfinite(lse), lse, 0.0)
    do = do.astype(acc)

    def key_block(carry, j):
        dq, dbias = carry
        kb = lax.dynamic_slice_in_dim(k, j * size, size, axis=1)
        vb = lax.dynamic_slice_in_dim(v, j * size, size, axis=1)
        # Every query block may see a cache block; new-key block j - nc has its range.
        lo, hi = _query_block_range(j - blocks.nc, blocks, causal, window)
        lo = jnp.where(j < blocks.nc, 0, lo)
        hi = jnp.where(j < blocks.nc, blocks.nq - 1, hi)

        def visit(i, grads):
            dk, dv, dq, dbias = grads
            qb = lax.dynamic_slice_in_dim(q, i * size, size, axis=1)
            dob = lax.dynamic_slice_in_dim(do, i * size, size, axis=1)
            s = _scores(qb, kb, vis, i, j, blocks, causal, window, bias, scale)
            lse_b = lax.dynamic_slice_in_dim(lse_safe, i * size, size, axis=3)
            delta_b = lax.dynamic_slice_in_dim(delta, i * size, size, axis=3)
            p = jnp.exp(s - lse_b[..., None])
            dv = dv + jnp.einsum("bngts,btngv->bsnv", p, dob)
            dp = jnp.einsum("btngv,bsnv->bngts", dob, vb, preferred_element_type=acc)
            ds = p * (dp - delta_b[..., None])
            dk = dk + scale * jnp.einsum("bngts,btngk->bsnk", ds, qb, preferred_element_type=acc)
            dq_b = scale * jnp.einsum("bngts,bsnk->btngk", ds, kb, preferred_element_type=acc)
            dq = lax.dynamic_update_slice_in_dim(
                dq, lax.dynamic_slice_in_dim(dq, i * size, size, axis=1) + dq_b, i * size, axis=1
            )
            if dbias is not None:
                dbias = _add_bias_block(dbias, ds, i, j, size)
            return dk, dv, dq, dbias

        zeros = (
            jnp.zeros(kb.shape, acc),
            jnp.zeros(vb.shape, acc),
        )
        dk, dv, dq, dbias = lax.fori_loop(lo, hi + 1, visit, (*zeros, dq, dbias))
        return (dq, dbias), (dk, dv)

    dq0 = jnp.zeros(q.shape, acc)
    dbias0 = None if bias is None else jnp.zeros(bias.shape, acc)
    (dq, dbias), (dk, dv) = lax.scan(key_block, (dq0, dbias0), jnp.arange(blocks.nc + blocks.nk))
    dk = jnp.moveaxis(dk, 0, 1).reshape(k.shape)
    dv = jnp.moveaxis(dv, 0, 1).reshape(v.shape)
    return dq, dk, dv, dbias


def _add_bias_block(dbias, ds, i, j, size):
    """Adds the block `ds: [B, Hkv, G, size, size]`, summed over the bias's broadcast axes."""
    axes = tuple(a for a in range(5) if dbias.shape[a] == 1 and ds.shape[a] != 1)
    block = jnp.sum(ds, axis=axes, keepdims=True)
    t, s = dbias.shape[-2:]
    starts = (0, 0, 0, 0 if t == 1 else i * size, 0 if s == 1 else j * size)
    return lax.dynamic_update_slice(
        dbias, lax.dynamic_slice(dbias, starts, block.shape) + block, starts
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _blockwise_core(q, k, v, vis, bias, causal, window, scale, blocks):
    return _blockwise_forward(q, k, v, vis, bias, causal, window, scale, blocks)[0]


def _blockwise_fwd(q, k, v, vis, bias, causal, window, scale, blocks):
    o, lse = _blockwise_forward(q, k, v, vis, bias, causal, window, scale, blocks)
    return o, (q, k, v, vis, bias, o, lse)


def _blockwise_bwd(causal, window, scale, blocks, residuals, do):
    q, k, v, vis, bias, o, lse = residuals
    dq, dk, dv, dbias = _blockwise_backward(
        q, k, v, vis, bias, causal, window, scale, blocks, o, lse, do
    )
    zero_vis = jax.tree.map(lambda x: jnp.zeros(x.shape, jax.dtypes.float0), vis)
    return (
        dq.astype(q.dtype),
        dk.astype(k.dtype),
        dv.astype(v.dtype),
        zero_vis,
        None if bias is None else dbias.astype(bias.dtype),
    )


_blockwise_core.defvjp(_blockwise_fwd, _blockwise_bwd)


def _blockwise(q, k, v, vis, causal, window, bias, scale, cache, block_size):
    """Pads queries, the cache's keys and the new keys to whole blocks and runs the core."""
    batch, length, heads, _ = q.shape
    kv_heads, key_length = k.shape[2], k.shape[1]
    cache_len = 0 if cache is None else cache.k.shape[1]
    size = min(block_size, max(length, cache_len + key_length))
    blocks = _Blocks(size, -(-length // size), -(-cache_len // size), -(-key_length // size))
    tp, cp, kp = blocks.nq * size, blocks.nc * size, blocks.nk * size

    qg = _pad_axis(_group(q, kv_heads), 1, tp)
    new_k, new_v = _pad_axis(k, 1, kp), _pad_axis(v, 1, kp)
    q_pos = _pad_axis(vis.q_positions, 1, tp)
    q_seg = _pad_axis(vis.q_segments, 1, tp)
    k_pos, k_seg = vis.k_positions[:, cache_len:], vis.k_segments[:, cache_len:]
    k_pos, k_seg = _pad_axis(k_pos, 1, kp, -1), _pad_axis(k_seg, 1, kp)
    if cache is not None:
        keys = jnp.concatenate([_pad_axis(cache.k.astype(k.dtype), 1, cp), new_k], axis=1)
        values = jnp.concatenate([_pad_axis(cache.v.astype(v.dtype), 1, cp), new_v], axis=1)
        k_pos = jnp.concatenate([_pad_axis(vis.k_positions[:, :cache_len], 1, cp, -1), k_pos], 1)
        k_seg = jnp.concatenate([_pad_axis(vis.k_segments[:, :cache_len], 1, cp), k_seg], 1)
    else:
        keys, values = new_k, new_v
    padded_vis = Visibility(q_pos, q_seg, k_pos, k_seg)
    if bias is not None:
        bias = _grouped_bias(bias, kv_heads)
        if bias.shape[3] != 1:
            bias = _pad_axis(bias, 3, tp)
        if bias.shape[4] != 1:
            parts = [_pad_axis(bias[..., :cache_len], 4, cp)] if cache is not None else []
            bias = jnp.concatenate([*parts, _pad_axis(bias[..., cache_len:], 4, kp)], axis=4)
    o = _blockwise_core(qg, keys, values, padded_vis, bias, causal, window, scale, blocks)
    return o[:, :length].reshape(batch, length, heads, v.shape[-1])


# ----------------------------------------------------------------------------- the op


def _resolve(impl: str, keys: int, pallas_ok: bool) -> str:
    """The impl that runs: `"auto"`'s choice, or the fallback of a `"pallas"` call the kernel
    cannot do (`"xla"`, i.e. cuDNN, on GPU; `"blockwise"` elsewhere)."""
    backend = jax.default_backend()
    if impl == "auto" and backend == "tpu" and pallas_ok:
        return "pallas"
    if impl == "auto" and backend == "cpu":
        return "xla" if keys <= AUTO_BLOCKWISE_LENGTH else "blockwise"
    if impl == "auto" or (impl == "pallas" and not pallas_ok):
        return "xla" if backend == "gpu" else "blockwise"
    return impl


def softmax_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = True,
    window: int | None = None,
    segment_ids: jax.Array | None = None,
    bias: jax.Array | None = None,
    scale: float | None = None,
    initial_state: KVCache | None = None,
    impl: AttentionImpl = "auto",
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> tuple[jax.Array, KVCache]:
    """Softmax attention over `[B, T, H, K]` queries; returns `(o [B, T, H, V], cache)`.

    Args:
      q: `[B, T, H, K]`; k: `[B, S, Hkv, K]`; v: `[B, S, Hkv, V]` with `H % Hkv == 0`
        (grouped-query heads). `S != T` only for non-causal cross attention without segments
        or cache.
      causal: token t sees keys s <= t.
      window: (causal only) token t sees keys s > t - window, itself included.
      segment_ids: `[B, T]` int; tokens of different segments never attend to each other.
      bias: added to the scores, 4 dims broadcastable to `[B, H, T, S]` (with a cache, its
        `C` slots come first along S).
      scale: on the scores; None means `K ** -0.5`.
      initial_state: a `KVCache` of earlier tokens, seen by the first segment of each row
        (`init_kv_cache` makes an empty one with room for a prompt and its continuation).
      impl: see the module docstring.
      block_size: key and query block length of `"blockwise"`.

    Returns:
      `o` in `v`'s dtype, and the cache after the last token: `initial_state`'s slots
      updated, or a new one of capacity T (`window` when windowed).
    """
    _validate(q, k, v, causal, window, segment_ids, bias, initial_state, impl, block_size)
    batch, length, _, key_dim = q.shape
    scale = key_dim**-0.5 if scale is None else scale
    cache = initial_state
    structured = segment_ids is None and cache is None and bias is None
    kernel = attention_pallas.backend_kernel()
    pallas_ok = attention_pallas.supports(kernel, q, k, v, causal, window, segment_ids, bias, cache)
    impl = _resolve(impl, k.shape[1], pallas_ok)
    vis = _visibility(batch, length, k.shape[1], segment_ids, cache)
    keys, values = k, v
    if cache is not None and impl in ("reference", "xla"):
        keys = jnp.concatenate([cache.k.astype(k.dtype), k], axis=1)
        values = jnp.concatenate([cache.v.astype(v.dtype), v], axis=1)
    if impl == "reference":
        o = _reference(q, keys, values, vis, causal, window, bias, scale)
    elif impl == "xla":
        o = _xla(q, keys, values, vis, causal, window, bias, scale, structured)
    elif impl == "blockwise":
        o = _blockwise(q, k, v, vis, causal, window, bias, scale, cache, block_size)
    else:
        o = attention_pallas.attention(
            q,
            k,
            v,
            causal=causal,
            window=window,
            segment_ids=segment_ids,
            scale=scale,
            kernel=kernel,
            interpret=jax.default_backend() == "cpu",
        )
    return o.astype(v.dtype), _final_cache(cache, k, v, segment_ids, window)


def softmax_attention_step(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    cache: KVCache,
    *,
    window: int | None = None,
    bias: jax.Array | None = None,
    scale: float | None = None,
) -> tuple[jax.Array, KVCache]:
    """Decodes one token: writes `k, v: [B, Hkv, *]` into the cache, then attends with
    `q: [B, H, K]` over it. Returns `(o [B, H, V], cache)`.

    `bias`: optional, broadcastable to `[B, H, C]` over the cache's slots. With a window the
    cache is a ring buffer of at least `window` slots; without one it must have room.
    """
    dims = checks.Dims()
    dims.check("q", q, "B H K")
    dims.check("k", k, "B G K")
    dims.check("v", v, "B G V")
    dims.check("cache.k", cache.k, "B C G K")
    dims.check("cache.v", cache.v, "B C G V")
    if q.shape[1] % k.shape[1]:
        raise ValueError(
            f"k, v: expected a number of heads dividing q's H = {q.shape[1]}, got {k.shape[1]}"
        )
    if window is not None:
        checks.check_positive("window", window)
    _check_capacity(cache, 1, window, "cache")
    cache = _write_token(cache, k, v)
    now = cache.length - 1
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    kv_heads = k.shape[1]
    acc = accumulation_dtype(q.dtype)
    qg = q.reshape(q.shape[0], kv_heads, -1, q.shape[-1])
    s = jnp.einsum("bngk,bcnk->bngc", qg, cache.k, preferred_element_type=acc) * scale
    if bias is not None:
        b = jnp.broadcast_to(bias, (q.shape[0], q.shape[1], cache.k.shape[1]))
        s = s + b.reshape(s.shape).astype(acc)
    ok = cache.positions >= 0
    if window is not None:
        ok &= cache.positions > now[:, None] - window
    s = jnp.where(ok[:, None, None], s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.exp(s - jnp.where(jnp.isneginf(m), 0.0, m))
    u = jnp.sum(p, axis=-1, keepdims=True)
    o = jnp.einsum("bngc,bcnv->bngv", p / jnp.where(u > 0, u, 1.0), cache.v.astype(acc))
    return o.reshape(q.shape[0], q.shape[1], v.shape[-1]).astype(v.dtype), cache
