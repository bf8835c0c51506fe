"""Sequence parallelism of softmax attention: Ulysses (all-to-all) and ring attention.

The time axis of `q, k, v: [B, T, H, *]` is split over a mesh axis (`"sequence"`); the result
is `seqjax.ops.softmax_attention`'s, sharded the same way.

- `"ulysses"` (DeepSpeed-Ulysses, Jacobs et al. 2023): one `all_to_all` per input turns the
  sequence-sharded `[B, T/P, H, K]` into the head-sharded `[B, T, H/P, K]`, each device runs
  the single-device op over the whole sequence for its `H/P` heads (and `Hkv/P` key heads),
  and one `all_to_all` turns the output back. Heads and key heads must be divisible by `P`.
  Each device moves O(B T H (K + V) / P) bytes, independent of P at fixed T / P.
- `"ring"` (ring self-attention, Li et al. 2021; Liu et al. 2023): queries stay; the shard's
  key/value block (and its segment indices) travels `P - 1` steps around the ring with
  `ppermute`, and after each step the queries merge the block's softmax partial with the
  online-softmax combine (`seqjax.scan.online_softmax`, shared with Aaren and blockwise
  attention). The visibility mask of a block comes from its tokens' global positions (known
  from the block's source device, so positions need not travel). Any head count works. A
  block no query of the shard sees is skipped (`lax.cond`), and with a sliding window on
  contiguous shards only the `1 + ceil((window - 1) / (T/P))` steps that can reach a visible
  block are taken at all.

Causal load balancing (`zigzag=True`, ring and Ulysses): with contiguous shards the last device
does P times the causal work of the first. Cutting the sequence into `2P` chunks and giving
device p the chunks `p` and `2P - 1 - p` evens it out. The caller reorders the time axis of
every input once with `zigzag_order` (and restores outputs with `zigzag_restore`); this is
only for models whose layers are all attention: hybrids must keep contiguous shards, because
their recurrent layers need the tokens in their natural order.

Memory: ring attention visits a key block in tiles of at most `KEY_TILE` keys, so its score
blocks are `[T/P, tile]` per head. Its backward pass (a custom VJP) goes around the ring a second
time, recomputing the score blocks from the shard's own `q, k, v, o` and softmax normalizers,
with each key block's gradient accumulators `dk, dv` travelling beside it: O(T / P) memory per
device in both passes, and `P - 1` rounds (plus one to bring `dk, dv` home) in each.
"""

from __future__ import annotations

import functools
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from seqjax import checks
from seqjax.ops.attention import (
    AttentionImpl,
    KVCache,
    Visibility,
    init_kv_cache,
    ring_write,
    softmax_attention,
    visible,
)
from seqjax.parallel.mesh import SEQUENCE
from seqjax.parallel.sequence import sequence_specs, shard_index, varying_like
from seqjax.scan import online_softmax, segment_index
from seqjax.scan.linear_recurrence import accumulation_dtype

AttentionMethod = Literal["ulysses", "ring"]
ATTENTION_METHODS: tuple[str, ...] = ("ulysses", "ring")


# ----------------------------------------------------------------------------- zig-zag order


def _zigzag_permutation(length: int, axis_size: int, name: str) -> np.ndarray:
    """Time indices in zig-zag order: chunk p, then chunk 2P - 1 - p, for p = 0 .. P - 1."""
    chunks = 2 * axis_size
    if length % chunks:
        raise ValueError(
            f"{name}: T = {length} is not divisible by 2 x {axis_size} = {chunks} zig-zag chunks"
        )
    size = length // chunks
    order = np.stack([np.arange(axis_size), chunks - 1 - np.arange(axis_size)], axis=1)
    return (order.reshape(-1, 1) * size + np.arange(size)).reshape(-1)


def zigzag_order(x: jax.Array, axis_size: int, *, axis: int = 1) -> jax.Array:
    """`x` with its time axis permuted so that contiguous shard p of `axis_size` holds the
    chunks `p` and `2 axis_size - 1 - p` of the `2 axis_size` chunks of the natural order.

    For attention-only models (`zigzag=True`); a hybrid's recurrent layers need the natural
    order, so hybrids keep contiguous shards."""
    checks.check_positive("axis_size", axis_size)
    return jnp.take(x, _zigzag_permutation(x.shape[axis], axis_size, "x"), axis=axis)


def zigzag_restore(x: jax.Array, axis_size: int, *, axis: int = 1) -> jax.Array:
    """The inverse of `zigzag_order`: `x`'s time axis back in the natural order."""
    checks.check_positive("axis_size", axis_size)
    order = _zigzag_permutation(x.shape[axis], axis_size, "x")
    return jnp.take(x, np.argsort(order), axis=axis)


# ----------------------------------------------------------------------------- validation


def _validate(q, k, v, mesh, axis_name, method, zigzag, segment_ids, op_arguments) -> None:
    """The op's own checks (on shapes only), then the mesh's divisibility constraints."""
    checks.check_choice("method", method, ATTENTION_METHODS)
    checks.check_choice("axis_name", axis_name, mesh.axis_names)
    checks.check_bool("zigzag", zigzag)
    shapes = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v)]
    ids = (
        None if segment_ids is None else jax.ShapeDtypeStruct(segment_ids.shape, segment_ids.dtype)
    )
    jax.eval_shape(
        lambda q, k, v, ids: softmax_attention(q, k, v, segment_ids=ids, **op_arguments),
        *shapes,
        ids,
    )
    if k.shape[1] != q.shape[1]:
        raise ValueError(
            f"k, v: sequence-parallel attention needs as many keys as queries, S = T = "
            f"{q.shape[1]}, got S = {k.shape[1]}"
        )
    devices = mesh.shape[axis_name]
    pieces = 2 * devices if zigzag else devices
    if q.shape[1] % pieces:
        what = f"2 x {devices} = {pieces} zig-zag chunks" if zigzag else f"{devices} devices"
        raise ValueError(
            f"q: T = {q.shape[1]} is not divisible by the {what} of mesh axis {axis_name!r}"
        )
    if method == "ulysses":
        for name, heads in (("q", q.shape[2]), ("k, v", k.shape[2])):
            if heads % devices:
                raise ValueError(
                    f"{name}: {heads} heads are not divisible by the {devices} devices of mesh "
                    f"axis {axis_name!r} (Ulysses splits heads; use method='ring')"
                )


# ----------------------------------------------------------------------------- Ulysses


def _ulysses_shard(q, k, v, segments=None, *, axis_name, axis_size, zigzag, op_arguments):
    """Sequence-sharded `[B, T/P, H, *]` -> head-sharded `[B, T, H/P, *]`, the op, and back."""

    def to_heads(x):
        x = jax.lax.all_to_all(x, axis_name, split_axis=2, concat_axis=1, tiled=True)
        return zigzag_restore(x, axis_size) if zigzag else x

    if segments is not None:
        segments = jax.lax.all_gather(segments, axis_name, axis=1, tiled=True)
        if zigzag:
            segments = zigzag_restore(segments, axis_size)
    o, _ = softmax_attention(
        to_heads(q), to_heads(k), to_heads(v), segment_ids=segments, **op_arguments
    )
    if zigzag:
        o = zigzag_order(o, axis_size)
    return jax.lax.all_to_all(o, axis_name, split_axis=1, concat_axis=2, tiled=True)


# ----------------------------------------------------------------------------- ring


def _positions(device: jax.Array, length: int, axis_size: int, zigzag: bool) -> list[jax.Array]:
    """Global positions of the chunks device `device` holds: one chunk of `length` tokens, or
    the two zig-zag chunks `device` and `2P - 1 - device` of `length / 2` tokens each."""
    if not zigzag:
        return [device * length + jnp.arange(length, dtype=jnp.int32)]
    size = length // 2
    chunk = jnp.arange(size, dtype=jnp.int32)
    return [device * size + chunk, (2 * axis_size - 1 - device) * size + chunk]


KEY_TILE = 512


def _key_tiles(k, v, mask):
    """A key chunk cut into tiles of at most `KEY_TILE` tokens (the largest divisor of its
    length that fits), stacked on a new leading axis: `k: [n, B, tile, Hkv, K]`, `v`
    likewise, `mask: [n, B, Tq, tile]`. The score blocks are then `[Tq, tile]` per head,
    linear in the shard's length rather than quadratic."""
    length = k.shape[1]
    tile = max(d for d in range(1, min(length, KEY_TILE) + 1) if length % d == 0)

    def stack(x, axis):
        x = x.reshape(*x.shape[:axis], length // tile, tile, *x.shape[axis + 1 :])
        return jnp.moveaxis(x, axis, 0)

    return stack(k, 1), stack(v, 1), stack(mask, 2)


def _block_partial(q, k, v, mask, *, scale) -> online_softmax.SoftmaxPartial:
    """Softmax partial of queries `q: [B, Tq, Hkv, G, K]` over keys `k: [B, Tk, Hkv, K]`,
    `v: [B, Tk, Hkv, V]`, where `mask: [B, Tq, Tk]` lets them; `[B, Tq, Hkv, G]` leading.
    The keys are visited tile by tile (`_key_tiles`), merged by the online-softmax combine."""
    acc = accumulation_dtype(q.dtype)

    def visit_tile(partial, tile):
        k, v, mask = tile
        s = jnp.einsum("btngk,bsnk->btngs", q, k, preferred_element_type=acc) * scale
        s = jnp.where(mask[:, :, None, None], s, -jnp.inf)
        m = jnp.max(s, axis=-1)
        p = jnp.exp(s - jnp.where(jnp.isneginf(m), 0.0, m)[..., None])
        w = jnp.einsum("btngs,bsnv->btngv", p, v.astype(acc))
        tile_partial = online_softmax.SoftmaxPartial(m, jnp.sum(p, axis=-1), w)
        return online_softmax.combine(partial, tile_partial), None

    empty = online_softmax.empty_partial(q.shape[:-1], v.shape[-1], acc)
    partial = varying_like((q, k, v, mask), empty)
    return jax.lax.scan(visit_tile, partial, _key_tiles(k, v, mask))[0]


def _block_grads(q, do, lse, delta, k, v, mask, *, scale):
    """The gradients `(dq, dk, dv)` of one query chunk's attention over one key chunk (the
    flash-attention backward, tile by tile over the keys): `p = exp(s - lse)` on the visible
    scores, `dv = p^T do`, `ds = p (do v^T - delta)`, `dq = ds k scale`, `dk = ds^T q scale`;
    `q, do: [B, Tq, Hkv, G, *]`, `lse, delta: [B, Tq, Hkv, G]`, `mask: [B, Tq, Tk]`."""
    acc = accumulation_dtype(q.dtype)
    do = do.astype(acc)

    def visit_tile(dq, tile):
        k, v, mask = tile
        s = jnp.einsum("btngk,bsnk->btngs", q, k, preferred_element_type=acc) * scale
        p = jnp.where(mask[:, :, None, None], jnp.exp(s - lse[..., None]), 0.0)
        dv = jnp.einsum("btngs,btngv->bsnv", p, do)
        ds = p * (jnp.einsum("btngv,bsnv->btngs", do, v.astype(acc)) - delta[..., None])
        dq = dq + jnp.einsum("btngs,bsnk->btngk", ds, k.astype(acc)) * scale
        dk = jnp.einsum("btngs,btngk->bsnk", ds, q.astype(acc)) * scale
        return dq, (dk, dv)

    dq = varying_like((q, do, lse, delta, k, v, mask), jnp.zeros(q.shape, acc))
    dq, (dk, dv) = jax.lax.scan(visit_tile, dq, _key_tiles(k, v, mask))

    def unstack(x):
        return jnp.moveaxis(x, 0, 1).reshape(x.shape[1], -1, *x.shape[3:])

    return dq, unstack(dk), unstack(dv)


def _skipped_partial(q, k, v, mask) -> online_softmax.SoftmaxPartial:
    """The empty partial `(-inf, 0, 0)` of a block no query sees, typed like
    `_block_partial`'s."""
    empty = online_softmax.empty_partial(q.shape[:-1], v.shape[-1], accumulation_dtype(q.dtype))
    return varying_like((q, k, v, mask), empty)


def _skipped_grads(q, do, lse, delta, k, v, mask):
    """Zero gradients of a block no query sees, typed like `_block_grads`'."""
    acc = accumulation_dtype(q.dtype)
    zeros = (
        jnp.zeros(q.shape, acc),
        jnp.zeros(k.shape, acc),
        jnp.zeros(v.shape, acc),
    )
    return varying_like((q, do, lse, delta, k, v, mask), zeros)


def _ring_steps(axis_size: int, length: int, causal: bool, window: int | None, zigzag: bool):
    """How many blocks each device visits: all `P`, or with a window on contiguous shards of
    `length` tokens only the nearest `1 + ceil((window - 1) / length)` (itself included)."""
    if window is None or not causal or zigzag:
        return axis_size
    return min(axis_size, 1 + -(-(window - 1) // length))


class Ring(NamedTuple):
    """The static settings of a ring-attention shard."""

    axis_name: str
    axis_size: int
    zigzag: bool
    causal: bool
    window: int | None
    scale: float

    @property
    def pieces(self) -> int:
        """Chunks per shard: two zig-zag chunks, or one."""
        return 2 if self.zigzag else 1

    def split(self, x: jax.Array) -> list[jax.Array]:
        return jnp.split(x, self.pieces, axis=1)

    def mask(self, query_chunk, key_chunk) -> jax.Array:
        """`[B, Tq, Tk]`: which keys of a chunk `(segments, positions)` the queries of a
        chunk `(segments, positions)` see."""
        (q_segments, q_positions), (k_segments, k_positions) = query_chunk, key_chunk
        vis = Visibility(
            jnp.broadcast_to(q_positions, q_segments.shape),
            q_segments,
            jnp.broadcast_to(k_positions, k_segments.shape),
            k_segments,
        )
        return visible(vis, self.causal, self.window)

    def walk(self, visit, carry, block):
        """Runs `visit(carry, block, step) -> (carry, block)` on this device's own key block
        (step 0), then on each block arriving from the previous device (`ppermute`), for as
        many steps as the mask can reach; returns the final carry and block."""
        length = block[0].shape[1]
        steps = _ring_steps(self.axis_size, length, self.causal, self.window, self.zigzag)
        ring = [(i, (i + 1) % self.axis_size) for i in range(self.axis_size)]

        def rotate_and_visit(state, step):
            carry, block = state
            return visit(carry, jax.lax.ppermute(block, self.axis_name, ring), step), None

        state = visit(carry, block, 0)
        (carry, block), _ = jax.lax.scan(rotate_and_visit, state, jnp.arange(1, steps))
        return carry, block, steps

    def key_positions(self, step, length: int) -> list[jax.Array]:
        """Global positions of the chunks of the key block visited at `step` (it left device
        `device - step`)."""
        source = (shard_index(self.axis_name) - step) % self.axis_size
        return _positions(source, length, self.axis_size, self.zigzag)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _ring_attention(q, k, v, segments, ring: Ring):
    """One shard's ring attention `o: [B, T/P, H, V]`. Its custom VJP recomputes the score
    blocks in a second trip around the ring, so that only this shard's `q, k, v, o` and its
    softmax normalizers are kept: O(T / P) memory per device, as the forward pass."""
    return _ring_forward(q, k, v, segments, ring)[0]


def _grouped(x: jax.Array, kv_heads: int) -> jax.Array:
    """`[B, T, H, *] -> [B, T, Hkv, G, *]`: the query heads of each key head together."""
    batch, length, heads = x.shape[:3]
    return x.reshape(batch, length, kv_heads, heads // kv_heads, *x.shape[3:])


def _ring_forward(q, k, v, segments, ring: Ring):
    """`(o [B, T/P, H, V], lse [B, T/P, Hkv, G] float32)`: each query chunk keeps a running
    softmax partial and merges each key chunk's as the blocks pass around the ring."""
    batch, length, heads, _ = q.shape
    device = shard_index(ring.axis_name)
    query_positions = _positions(device, length, ring.axis_size, ring.zigzag)
    queries = list(
        zip(
            ring.split(_grouped(q, k.shape[2])),
            zip(ring.split(segments), query_positions, strict=True),
            strict=True,
        )
    )
    compute = functools.partial(_block_partial, scale=ring.scale)

    def visit(partials, block, step):
        keys = zip(*(ring.split(x) for x in block), ring.key_positions(step, length), strict=True)
        for k_chunk, v_chunk, k_segments, k_positions in keys:
            for i, (q_chunk, query_mask) in enumerate(queries):
                mask = ring.mask(query_mask, (k_segments, k_positions))
                args = (q_chunk, k_chunk, v_chunk, mask)
                partial = jax.lax.cond(jnp.any(mask), compute, _skipped_partial, *args)
                partials[i] = (
                    partial if partials[i] is None else online_softmax.combine(partials[i], partial)
                )
        return partials, block

    partials, _, _ = ring.walk(visit, [None] * ring.pieces, (k, v, segments))
    o = jnp.concatenate([online_softmax.normalize(p) for p in partials], axis=1)
    # Every query sees at least itself, so the denominators are positive.
    lse = jnp.concatenate([p.max + jnp.log(p.denominator) for p in partials], axis=1)
    return o.reshape(batch, length, heads, v.shape[3]).astype(v.dtype), lse


def _ring_attention_fwd(q, k, v, segments, ring: Ring):
    o, lse = _ring_forward(q, k, v, segments, ring)
    return o, (q, k, v, segments, o, lse)


def _ring_attention_bwd(ring: Ring, residuals, do):
    """The flash-attention backward around the ring: the key blocks travel again, each with
    its gradient accumulators `dk, dv`; every device adds its queries' share, and after the
    last step one `ppermute` returns the accumulators to the blocks' own devices."""
    q, k, v, segments, o, lse = residuals
    length, kv_heads = q.shape[1], k.shape[2]
    acc = accumulation_dtype(q.dtype)
    delta = _grouped(jnp.sum(do.astype(acc) * o.astype(acc), axis=-1), kv_heads)
    device = shard_index(ring.axis_name)
    queries = list(
        zip(
            *(ring.split(x) for x in (_grouped(q, kv_heads), _grouped(do, kv_heads), lse, delta)),
            zip(
                ring.split(segments),
                _positions(device, length, ring.axis_size, ring.zigzag),
                strict=True,
            ),
            strict=True,
        )
    )
    compute = functools.partial(_block_grads, scale=ring.scale)

    def visit(dq, block, step):
        k, v, k_segments, dk, dv = block
        dk, dv = ring.split(dk), ring.split(dv)
        keys = zip(
            ring.split(k),
            ring.split(v),
            ring.split(k_segments),
            ring.key_positions(step, length),
            strict=True,
        )
        for j, (k_chunk, v_chunk, k_chunk_segments, k_positions) in enumerate(keys):
            for i, (q_chunk, do_chunk, lse_chunk, delta_chunk, query_mask) in enumerate(queries):
                mask = ring.mask(query_mask, (k_chunk_segments, k_positions))
                args = (q_chunk, do_chunk, lse_chunk, delta_chunk, k_chunk, v_chunk, mask)
                grads = jax.lax.cond(jnp.any(mask), compute, _skipped_grads, *args)
                dq[i], dk[j], dv[j] = dq[i] + grads[0], dk[j] + grads[1], dv[j] + grads[2]
        block = (k, v, k_segments, jnp.concatenate(dk, axis=1), jnp.concatenate(dv, axis=1))
        return dq, block

    zeros = [jnp.zeros_like(x, acc) for x in ring.split(_grouped(q, kv_heads))]
    dq = varying_like((q,), zeros)
    accumulators = varying_like((k, v), (jnp.zeros_like(k, acc), jnp.zeros_like(v, acc)))
    block = (k, v, segments, *accumulators)
    dq, block, steps = ring.walk(visit, dq, block)
    dk, dv = block[3:]
    if steps > 1:
        home = [(i, (i - (steps - 1)) % ring.axis_size) for i in range(ring.axis_size)]
        dk, dv = jax.lax.ppermute((dk, dv), ring.axis_name, home)
    dq = jnp.concatenate(dq, axis=1).reshape(q.shape)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_ring_attention.defvjp(_ring_attention_fwd, _ring_attention_bwd)


def _ring_shard(q, k, v, segments, *, axis_name, axis_size, zigzag, causal, window, scale):
    """This device's queries against every key block, the blocks passed around the ring."""
    return _ring_attention(
        q, k, v, segments, Ring(axis_name, axis_size, zigzag, causal, window, scale)
    )


# ----------------------------------------------------------------------------- the op


def _final_cache(k, v, segment_ids, window) -> KVCache:
    """`softmax_attention`'s final state: the cache of every token (`window` of them when
    windowed), in the natural order."""
    batch, length, kv_heads, key_dim = k.shape
    capacity = length if window is None else window
    cache = init_kv_cache(batch, capacity, kv_heads, key_dim, v.shape[3], k.dtype)
    (keys, values), positions, end = ring_write(
        (cache.k, cache.v), cache.positions, cache.length, (k, v), segment_ids
    )
    return KVCache(keys, values, positions, end)


def sequence_parallel_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mesh: Mesh,
    axis_name: str = SEQUENCE,
    method: AttentionMethod = "ulysses",
    causal: bool = True,
    window: int | None = None,
    segment_ids: jax.Array | None = None,
    scale: float | None = None,
    zigzag: bool = False,
    impl: AttentionImpl = "auto",
    block_size: int | None = None,
) -> tuple[jax.Array, KVCache]:
    """`softmax_attention` with the time axis of every input split over `mesh`'s `axis_name`.

    Args:
      q: `[B, T, H, K]`; k: `[B, S, Hkv, K]`; v: `[B, S, Hkv, V]`, `H % Hkv == 0`; T (and S)
        divisible by the axis size (by twice it with `zigzag`).
      mesh: the device mesh; the batch is split over its `"data"` / `"fsdp"` axes if any.
      axis_name: the mesh axis the time axis is split over.
      method: `"ulysses"` (all-to-all to heads; `H` and `Hkv` divisible by the axis size) or
        `"ring"` (key/value blocks around the ring; any head count).
      causal, window, segment_ids, scale: as in `softmax_attention` (segments may cross shard
        boundaries; with `zigzag`, `segment_ids` are zig-zag ordered like `q`).
      zigzag: the inputs are in `zigzag_order` (causal load balancing; attention-only models,
        see the module docstring); the output is in the same order.
      impl, block_size: the single-device impl Ulysses runs per head group (the ring computes
        its blocks itself).

    Returns:
      `o: [B, T, H, V]` sharded like `q` (and ordered like it), and the final `KVCache` in the
      natural order, as `softmax_attention` returns it. No `bias` or `initial_state`.
    """
    op_arguments = {"causal": causal, "window": window, "scale": scale, "impl": impl}
    if block_size is not None:
        op_arguments["block_size"] = block_size
    _validate(q, k, v, mesh, axis_name, method, zigzag, segment_ids, op_arguments)
    axis_size = mesh.shape[axis_name]
    scale = q.shape[3] ** -0.5 if scale is None else scale
    natural_ids = segment_ids
    if zigzag and segment_ids is not None:
        natural_ids = zigzag_restore(segment_ids, axis_size)
    spec, _ = sequence_specs(mesh, axis_name, q.shape[0])
    shard_arguments = {"axis_name": axis_name, "axis_size": axis_size, "zigzag": zigzag}
    if method == "ulysses":
        # Without segments the op keeps its structured (cuDNN-able) causal/window call.
        inputs = (q, k, v) if segment_ids is None else (q, k, v, segment_ids)
        per_shard = functools.partial(
            _ulysses_shard, op_arguments={**op_arguments, "scale": scale}, **shard_arguments
        )
    else:
        # Segment indices (equal within a packed document) need the whole row: made here.
        if segment_ids is None:
            segments = jnp.zeros(q.shape[:2], jnp.int32)
        else:
            segments = segment_index(natural_ids)
            segments = zigzag_order(segments, axis_size) if zigzag else segments
        inputs = (q, k, v, segments)
        per_shard = functools.partial(
            _ring_shard, causal=causal, window=window, scale=scale, **shard_arguments
        )
    # The single-device op's loops are not typed for shard_map (their carries start
    # replicated), so Ulysses runs unchecked; autodiff is still exact (JAX then psums the
    # cotangents of replicated axes).
    o = jax.shard_map(
        per_shard,
        mesh=mesh,
        in_specs=(spec,) * len(inputs),
        out_specs=spec,
        check_vma=method == "ring",
    )(*inputs)
    if zigzag:
        k, v = zigzag_restore(k, axis_size), zigzag_restore(v, axis_size)
    return o, _final_cache(k, v, natural_ids, window)
