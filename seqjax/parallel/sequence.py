"""Sequence parallelism of recurrences: one long sequence split over a mesh axis.

Inside `jax.shard_map` each device holds one contiguous block of the time axis (shard `p` of
`P` holds tokens `[p T/P, (p+1) T/P)`). Every recurrence of seqjax composes over shards the
same way: the state leaving shard `p` is an affine function of the state entering it,

    S_out(p) = A_p S_in(p) + M_p,        S_in(p) = S_out(p - 1),  S_in(0) = initial_state,

where `M_p` is the shard's final state from a zero state (its own tokens only) and `A_p` its
transition: the product of its decays (elementwise for diagonal decays, a `K x K` matrix for
the delta rule's Householder products). `A_p` is zero when a segment starts inside the shard
or at its first token, since no earlier state reaches its end then. The composition is
associative (LASP-2's `(A1, M1) o (A2, M2) = (A2 A1, A2 M1 + M2)`), so one `all_gather` of
the `(A_p, M_p)` and an exclusive prefix over the `P` gathered pairs give every shard its
`S_in(p)`, and the last prefix is the sequence's final state. The shard then reruns its local
op from `S_in(p)` (the correction), and nothing else moves between devices: the bytes moved
are `P` summaries, independent of `T`. Autodiff transposes the one all-gather into one
reduce-scatter, so the backward pass also has a single collective.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from seqjax.parallel.mesh import BATCH_AXES


def shard_index(axis_name: str) -> jax.Array:
    return jax.lax.axis_index(axis_name)


def sequence_specs(mesh: Mesh, axis_name: str, batch: int) -> tuple[P, P]:
    """`(tokens, rows)`: the partition specs of `[B, T, ...]` arrays (T over `axis_name`, B
    over the mesh's data-parallel axes) and of `[B, ...]` arrays such as states (B only,
    replicated over `axis_name`). Rows stay replicated when the data-parallel devices do not
    divide `batch`, as `spec_of` does for any dimension."""
    axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names and a != axis_name)
    if batch % math.prod(mesh.shape[a] for a in axes):
        axes = ()
    rows = axes or None
    return P(rows, axis_name), P(rows)


def check_sequence_split(mesh: Mesh, axis_name: str, **arrays: jax.Array | None) -> int:
    """The number of tokens per shard of the `[B, T, ...]` `arrays` (None skipped); a
    ValueError naming the argument unless `axis_name` is an axis of `mesh` whose size divides
    `T`."""
    if axis_name not in mesh.axis_names:
        raise ValueError(f"axis_name: {axis_name!r} is not an axis of the mesh {mesh.axis_names}")
    devices = mesh.shape[axis_name]
    per_shard = 0
    for name, x in arrays.items():
        if x is None:
            continue
        if x.ndim < 2:
            raise ValueError(f"{name}: expected shape [B, T, ...], got {x.shape}")
        if x.shape[1] % devices:
            raise ValueError(
                f"{name}: T = {x.shape[1]} is not divisible by the {devices} devices of mesh "
                f"axis {axis_name!r}"
            )
        per_shard = x.shape[1] // devices
    return per_shard


def sharded_call(
    per_shard: Callable[..., tuple[Any, Any]],
    mesh: Mesh,
    axis_name: str,
    *,
    time: dict[str, Any],
    rows: dict[str, Any],
    shared: dict[str, Any],
    final_shard: int = -1,
) -> tuple[Any, Any]:
    """`per_shard(**time, **rows, **shared) -> (output, final)` under `jax.shard_map`, with
    `time` (`[B, T, ...]` arrays, None allowed) split over `axis_name` and the batch, `rows`
    (`[B, ...]`) over the batch, and `shared` replicated. `output` is sharded like `time`;
    `final` (the sequence's final state) is returned from shard `final_shard`: the last one,
    or the first for a reversed recurrence (`replicated`)."""
    batch = jax.tree.leaves(time)[0].shape[0]
    tokens, rows_spec = sequence_specs(mesh, axis_name, batch)

    def body(time, rows, shared):
        output, final = per_shard(**time, **rows, **shared)
        return output, jax.tree.map(lambda x: replicated(x, axis_name, final_shard), final)

    return jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(tokens, rows_spec, P()),
        out_specs=(tokens, rows_spec),
    )(time, rows, shared)


def replicated(x: jax.Array, axis_name: str, shard: int = -1) -> jax.Array:
    """Shard `shard`'s `x` (negative: counted from the end), typed as replicated over
    `axis_name` (one all-reduce of `x`): how the sequence's final state, which one shard
    holds, leaves `shard_map` with a spec without the axis."""
    source = shard % jax.lax.axis_size(axis_name)
    return jax.lax.psum(jnp.where(shard_index(axis_name) == source, x, 0), axis_name)


def boundary_flags(
    segment_ids: jax.Array | None, axis_name: str, *, reverse: bool = False
) -> tuple[jax.Array, jax.Array]:
    """`(continues, closed)`, each `[B]` bool, for this shard of `segment_ids: [B, T_p]`:
    `continues`: its first token is in the segment of the previous shard's last token (always
    on shard 0, whose first segment the initial state seeds); `closed`: a segment starts at
    one of its later tokens, so no state entering the shard reaches its end. Without
    segments: all True / all False. With `reverse` the recurrence runs from the end: "first"
    is the shard's last token, "previous" the next shard, and shard P - 1 is seeded."""
    if segment_ids is None:
        batch = ()
        return jnp.ones(batch, bool), jnp.zeros(batch, bool)
    index = shard_index(axis_name)
    if reverse:
        last = jax.lax.axis_size(axis_name) - 1
        edge, neighbour_edge = segment_ids[:, -1], segment_ids[:, 0]
        neighbour, seeded = jnp.minimum(index + 1, last), index == last
    else:
        edge, neighbour_edge = segment_ids[:, 0], segment_ids[:, -1]
        neighbour, seeded = jnp.maximum(index - 1, 0), index == 0
    edges = jax.lax.all_gather(neighbour_edge, axis_name)  # [P, B]
    continues = seeded | (edge == edges[neighbour])
    closed = jnp.any(segment_ids[:, 1:] != segment_ids[:, :-1], axis=1)
    return continues, closed


def incoming_state(
    transition: Any,
    state: Any,
    initial_state: Any,
    *,
    apply: Callable[[Any, Any], Any],
    axis_name: str,
    reverse: bool = False,
) -> tuple[Any, Any]:
    """`(S_in, S_final)`: the state entering this shard and the state after the last shard,
    from this shard's `transition` `A_p` and local final `state` `M_p` (pytrees; `apply(A, S)`
    is `A S`) and the sequence's `initial_state`. One all-gather of `(A_p, M_p)`; each device
    then folds the `P` summaries itself (P is small, the summaries are `T`-independent), from
    the last shard down with `reverse`."""
    gathered = jax.lax.all_gather((transition, state), axis_name)

    def fold(entering, summary):
        a, m = summary
        leaving = jax.tree.map(jnp.add, apply(a, entering), m)
        return leaving, entering

    final, entering = jax.lax.scan(
        fold, varying(initial_state, axis_name), gathered, reverse=reverse
    )
    index = shard_index(axis_name)
    return jax.tree.map(lambda x: x[index], entering), final


def varying(tree: Any, axis_name: str) -> Any:
    """`tree` typed as varying over `axis_name` (shard_map's type of per-shard values), as a
    scan carry that meets per-shard values must be."""
    return _cast_missing(tree, {axis_name})


def varying_like(arrays: Sequence[jax.Array], tree: Any) -> Any:
    """`tree` typed as varying over every mesh axis one of `arrays` varies over: how values
    made inside `shard_map` (zeros, a replicated parameter) meet per-shard values in a scan
    carry, a `lax.cond`'s branches or a custom VJP."""
    return _cast_missing(
        tree, set().union(*(jax.typeof(x).manual_axis_type.varying for x in arrays))
    )


def _cast_missing(tree: Any, axes: set[str]) -> Any:
    def cast(x):
        x = jnp.asarray(x)
        missing = tuple(sorted(axes - jax.typeof(x).manual_axis_type.varying))
        return jax.lax.pcast(x, missing, to="varying") if missing else x

    return jax.tree.map(cast, tree)


def mask_rows(mask: jax.Array, tree: Any) -> Any:
    """`tree`'s leaves `[B, ...]` where `mask: [B]`, zeros elsewhere."""
    return jax.tree.map(
        lambda x: jnp.where(mask.reshape(mask.shape + (1,) * (x.ndim - 1)), x, 0), tree
    )
