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

Memory: ring attention materializes one `[T/P, T/P]` score block per head at a time (per zig-zag
chunk pair when zig-zagged). Gradients come from autodiff through the ring, whose backward pass
keeps every step's key/value block: O(T (K + V)) activations per device, not O(T / P).
"""

from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

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
from seqjax.parallel.mesh import BATCH_AXES
from seqjax.parallel.sequence import SEQUENCE, shard_index
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


def _batch_spec(mesh: Mesh, axis_name: str) -> tuple[str, ...] | None:
    """The mesh axes the batch is split over: those of `BATCH_AXES` the mesh has."""
    axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names and a != axis_name)
    return axes or None


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


def _block_partial(q, k, v, mask, *, scale) -> online_softmax.SoftmaxPartial:
    """Softmax partial of queries `q: [B, Tq, Hkv, G, K]` over keys `k: [B, Tk, Hkv, K]`,
    `v: [B, Tk, Hkv, V]`, where `mask: [B, Tq, Tk]` lets them; `[B, Tq, Hkv, G]` leading."""
    acc = accumulation_dtype(q.dtype)
    s = jnp.einsum("btngk,bsnk->btngs", q, k, preferred_element_type=acc) * scale
    s = jnp.where(mask[:, :, None, None], s, -jnp.inf)
    m = jnp.max(s, axis=-1)
    p = jnp.exp(s - jnp.where(jnp.isneginf(m), 0.0, m)[..., None])
    w = jnp.einsum("btngs,bsnv->btngv", p, v.astype(acc))
    return online_softmax.SoftmaxPartial(m, jnp.sum(p, axis=-1), w)


def _skipped_partial(q, k, v, mask) -> online_softmax.SoftmaxPartial:
    """The empty partial `(-inf, 0, 0)` of a block no query sees, typed (shard_map's varying
    axes) like `_block_partial`'s."""
    axes = set().union(*(jax.typeof(x).manual_axis_type.varying for x in (q, k, v, mask)))
    empty = online_softmax.empty_partial(q.shape[:-1], v.shape[-1], accumulation_dtype(q.dtype))
    return jax.tree.map(lambda x: jax.lax.pcast(x, tuple(axes), to="varying"), empty)


def _ring_steps(axis_size: int, length: int, causal: bool, window: int | None, zigzag: bool):
    """How many blocks each device visits: all `P`, or with a window on contiguous shards of
    `length` tokens only the nearest `1 + ceil((window - 1) / length)` (itself included)."""
    if window is None or not causal or zigzag:
        return axis_size
    return min(axis_size, 1 + -(-(window - 1) // length))


def _ring_shard(q, k, v, segments, *, axis_name, axis_size, zigzag, causal, window, scale):
    """Each device's queries against every key block, the blocks passed around the ring.

    Queries and keys are cut into their chunks (one, or two zig-zag chunks); every query
    chunk keeps a running softmax partial `[B, Tq, Hkv, G]` and merges each key chunk's."""
    batch, length, heads, _ = q.shape
    pieces = 2 if zigzag else 1
    device = shard_index(axis_name)
    grouped = q.reshape(batch, length, k.shape[2], heads // k.shape[2], q.shape[3])
    queries = list(
        zip(
            jnp.split(grouped, pieces, axis=1),
            jnp.split(segments, pieces, axis=1),
            _positions(device, length, axis_size, zigzag),
            strict=True,
        )
    )
    ring = [(i, (i + 1) % axis_size) for i in range(axis_size)]

    def visit_block(partials, block, step):
        """Merges the key block that left device `device - step` into every query chunk."""
        keys = zip(
            *(jnp.split(x, pieces, axis=1) for x in block),
            _positions((device - step) % axis_size, length, axis_size, zigzag),
            strict=True,
        )
        for key_chunk in keys:
            for i, query_chunk in enumerate(queries):
                visit = _visit(query_chunk, key_chunk, causal, window, scale)
                partials[i] = (
                    visit if partials[i] is None else online_softmax.combine(partials[i], visit)
                )
        return partials

    def rotate_and_visit(carry, step):
        partials, block = carry
        block = jax.lax.ppermute(block, axis_name, ring)
        return (visit_block(partials, block, step), block), None

    block = (k, v, segments)
    partials = visit_block([None] * pieces, block, 0)
    steps = _ring_steps(axis_size, length, causal, window, zigzag)
    (partials, _), _ = jax.lax.scan(rotate_and_visit, (partials, block), jnp.arange(1, steps))
    o = jnp.concatenate([online_softmax.normalize(p) for p in partials], axis=1)
    return o.reshape(batch, length, heads, v.shape[3]).astype(v.dtype)


def _visit(query_chunk, key_chunk, causal, window, scale) -> online_softmax.SoftmaxPartial:
    """The partial of one query chunk `(q, segments, positions)` over one key chunk
    `(k, v, segments, positions)`; not computed when the mask hides the whole chunk."""
    q, q_segments, q_positions = query_chunk
    k, v, k_segments, k_positions = key_chunk
    vis = Visibility(
        jnp.broadcast_to(q_positions, q_segments.shape),
        q_segments,
        jnp.broadcast_to(k_positions, k_segments.shape),
        k_segments,
    )
    mask = visible(vis, causal, window)
    compute = functools.partial(_block_partial, scale=scale)
    return jax.lax.cond(jnp.any(mask), compute, _skipped_partial, q, k, v, mask)


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
    spec = P(_batch_spec(mesh, axis_name), axis_name)
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
