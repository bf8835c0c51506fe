"""Sequence parallelism of the short causal convolution: a halo exchange.

A token needs the `W - 1` inputs before it, so each shard receives the previous shard's last
`W - 1` rows (with their segment ids) in ONE `jax.lax.ppermute`, keeps those in its first
token's segment, and convolves locally with them as the cache (`seqjax.nn.conv.causal_conv`).
Shard 0 receives nothing and uses the caller's cache. Each shard must hold at least `W - 1`
tokens, so that the halo comes from one neighbour.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from seqjax import checks
from seqjax.ops.short_conv import causal_conv, init_conv_cache
from seqjax.parallel.mesh import SEQUENCE
from seqjax.parallel.sequence import check_sequence_split, shard_index, sharded_call


def sequence_parallel_causal_conv(
    x: jax.Array,
    kernel: jax.Array,
    bias: jax.Array | None = None,
    cache: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    *,
    mesh: Mesh,
    axis_name: str = SEQUENCE,
) -> tuple[jax.Array, jax.Array]:
    """`causal_conv(x, kernel, bias, cache, segment_ids)` with `T` split over `mesh`'s axis
    `axis_name`: `x: [B, T, D]`, `kernel: [W, D]`, `bias: [D]`, `cache: [B, W - 1, D]` (None:
    zeros); returns `(y [B, T, D] float32, new cache)`, the cache from the last shard."""
    dims = checks.Dims()
    dims.check("x", x, "B T D")
    dims.check("kernel", kernel, "W D")
    if bias is not None:
        dims.check("bias", bias, "D")
    width = kernel.shape[0]
    if cache is None:
        cache = init_conv_cache(x.shape[0], width, x.shape[2], x.dtype)
    expected = (x.shape[0], width - 1, x.shape[2])
    if cache.shape != expected:
        raise ValueError(
            f"cache: expected shape [B, W - 1, D] = {list(expected)}, got {cache.shape}"
        )
    checks.check_segment_ids(segment_ids, *x.shape[:2])
    per_shard_length = check_sequence_split(mesh, axis_name, x=x)
    if per_shard_length < width - 1:
        raise ValueError(
            f"x: each of the {mesh.shape[axis_name]} shards of mesh axis {axis_name!r} holds "
            f"{per_shard_length} tokens, fewer than kernel width - 1 = {width - 1}"
        )
    devices = mesh.shape[axis_name]

    def per_shard(x, segment_ids, cache, kernel, bias):
        halo = _halo(x, segment_ids, width - 1, devices, axis_name)
        halo = jnp.where(shard_index(axis_name) == 0, cache.astype(jnp.float32), halo)
        y, tail = causal_conv(x, kernel, bias, halo, segment_ids)
        return y, tail.astype(cache.dtype)

    return sharded_call(
        per_shard,
        mesh,
        axis_name,
        time=dict(x=x, segment_ids=segment_ids),
        rows=dict(cache=cache),
        shared=dict(kernel=kernel, bias=bias),
    )


def _halo(
    x: jax.Array, segment_ids: jax.Array | None, size: int, devices: int, axis_name: str
) -> jax.Array:
    """The previous shard's last `size` rows of `x: [B, T_p, D]` as float32 `[B, size, D]`,
    zeroed where they are not in the segment of this shard's first token (zeros on shard 0).
    One `ppermute`: the segment ids travel bitcast beside the rows."""
    last = slice(x.shape[1] - size, None)
    rows = x[:, last].astype(jnp.float32)
    if segment_ids is not None:
        ids = jax.lax.bitcast_convert_type(segment_ids[:, last].astype(jnp.int32), jnp.float32)
        rows = jnp.concatenate([rows, ids[..., None]], axis=-1)
    received = jax.lax.ppermute(rows, axis_name, [(p, p + 1) for p in range(devices - 1)])
    if segment_ids is None:
        return received
    halo, ids = received[..., :-1], jax.lax.bitcast_convert_type(received[..., -1], jnp.int32)
    # A halo row is in the first token's segment iff no id changes from it to that token.
    chain = jnp.concatenate([ids, segment_ids[:, :1].astype(jnp.int32)], axis=1)
    same = (chain[:, 1:] == chain[:, :-1]).astype(jnp.int32)
    kept = jnp.flip(jnp.cumprod(jnp.flip(same, axis=1), axis=1), axis=1)
    return jnp.where(kept[..., None] == 1, halo, 0.0)
