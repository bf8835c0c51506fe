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

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

SEQUENCE = "sequence"


def shard_index(axis_name: str) -> jax.Array:
    return jax.lax.axis_index(axis_name)


def boundary_flags(segment_ids: jax.Array | None, axis_name: str) -> tuple[jax.Array, jax.Array]:
    """`(continues, closed)`, each `[B]` bool, for this shard of `segment_ids: [B, T_p]`:
    `continues`: its first token is in the segment of the previous shard's last token (always
    on shard 0, whose first segment the initial state seeds); `closed`: a segment starts at
    one of its later tokens, so no state entering the shard reaches its end. Without
    segments: all True / all False."""
    if segment_ids is None:
        batch = ()
        return jnp.ones(batch, bool), jnp.zeros(batch, bool)
    last = jax.lax.all_gather(segment_ids[:, -1], axis_name)  # [P, B]
    index = shard_index(axis_name)
    previous = last[jnp.maximum(index - 1, 0)]
    continues = (index == 0) | (segment_ids[:, 0] == previous)
    closed = jnp.any(segment_ids[:, 1:] != segment_ids[:, :-1], axis=1)
    return continues, closed


def incoming_state(
    transition: Any,
    state: Any,
    initial_state: Any,
    *,
    apply: Callable[[Any, Any], Any],
    axis_name: str,
) -> tuple[Any, Any]:
    """`(S_in, S_final)`: the state entering this shard and the state after the last shard,
    from this shard's `transition` `A_p` and local final `state` `M_p` (pytrees; `apply(A, S)`
    is `A S`) and the sequence's `initial_state`. One all-gather of `(A_p, M_p)`; each device
    then folds the `P` summaries itself (P is small, the summaries are `T`-independent)."""
    gathered = jax.lax.all_gather((transition, state), axis_name)

    def fold(entering, summary):
        a, m = summary
        leaving = jax.tree.map(jnp.add, apply(a, entering), m)
        return leaving, entering

    final, entering = jax.lax.scan(fold, varying(initial_state, axis_name), gathered)
    index = shard_index(axis_name)
    return jax.tree.map(lambda x: x[index], entering), final


def varying(tree: Any, axis_name: str) -> Any:
    """`tree` typed as varying over `axis_name` (shard_map's type of per-shard values), as a
    scan carry that meets per-shard values must be."""

    def cast(x):
        x = jnp.asarray(x)
        if axis_name in jax.typeof(x).manual_axis_type.varying:
            return x
        return jax.lax.pcast(x, axis_name, to="varying")

    return jax.tree.map(cast, tree)


def mask_rows(mask: jax.Array, tree: Any) -> Any:
    """`tree`'s leaves `[B, ...]` where `mask: [B]`, zeros elsewhere."""
    return jax.tree.map(
        lambda x: jnp.where(mask.reshape(mask.shape + (1,) * (x.ndim - 1)), x, 0), tree
    )
