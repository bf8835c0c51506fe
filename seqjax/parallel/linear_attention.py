"""LASP-2 sequence parallelism of the gated linear-attention and delta-rule families.

Every op here is, per head, `S_t = A_t S_{t-1} + w_t` on a `[K, V]` state, so a shard of the
time axis acts on the state entering it as `S_out(p) = A_p S_in(p) + M_p`
(`seqjax.parallel.sequence`; Sun et al., "LASP-2"):

    linear_attention:   A_p = 1
    simple_gla:         A_p = exp(sum_t g_t)        one per head         A S = A * S
    gla:                A_p = exp(sum_t gk_t)       one per key channel  A S = A[:, None] * S
    (gated_)delta_rule: A_p = M_{N-1} ... M_1 M_0   `[K, K]`             A S = A @ S

with `M_n` the shard's chunk transitions (`seqjax.ops.delta_rule.chunk_transition`); the
log-decays are <= 0, so their sums are too and no `exp` of a positive number is formed. `M_p`
is the shard's final state from a zero state. Each shard computes its `(A_p, M_p)` without its
outputs (`states_after` at its last token, or the composed chunk transitions), one all-gather
and a fold give every shard its entering state `S_in(p)`, and the op itself run from
`S_in(p)` over the shard gives its output (the local correction). The final state, the fold's
last prefix, leaves `shard_map` replicated through one all-reduce of one state
(`sequence.replicated`).
Autodiff transposes the all-gather into one reduce-scatter.

Segments (packed documents): `A_p` is zeroed on rows where a segment starts in the shard (at
its first token or later), and `S_in(p)` on rows whose first token starts a segment.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from seqjax.ops import chunked_linear_attention as engine
from seqjax.ops import delta_rule as delta_ops
from seqjax.ops import gla as gla_ops
from seqjax.ops import ssd as ssd_ops
from seqjax.parallel.mesh import SEQUENCE
from seqjax.parallel.sequence import (
    boundary_flags,
    check_sequence_split,
    incoming_state,
    mask_rows,
    sharded_call,
    varying_like,
)
from seqjax.scan.linear_recurrence import accumulation_dtype

# `summary(inputs, segment_ids) -> (A_p, M_p)` and `correction(inputs, S_in, segment_ids) ->
# output`, on one shard's `[B, T / P, ...]` inputs.
Summary = Callable[[dict[str, jax.Array], jax.Array | None], tuple[jax.Array, jax.Array]]
Correction = Callable[[dict[str, jax.Array], jax.Array, jax.Array | None], jax.Array]


def _lasp2(
    summary: Summary,
    apply: Callable[[jax.Array, jax.Array], jax.Array],
    correction: Correction,
    inputs: dict[str, jax.Array],
    initial_state: jax.Array,
    segment_ids: jax.Array | None,
    mesh: Mesh,
    axis_name: str,
) -> tuple[jax.Array, jax.Array]:
    """`(output, final_state)` of an op of the family over `inputs` (each `[B, T, ...]`)
    sharded along T: the shard summaries `summary`, composed by `apply(A, S)`, one
    all-gather, then `correction` from each shard's entering state."""

    def per_shard(initial_state, segment_ids, **inputs):
        transition, state = summary(inputs, segment_ids)
        continues, closed = boundary_flags(segment_ids, axis_name)
        transition = mask_rows(continues & ~closed, transition)
        entering, final = incoming_state(
            transition, state, initial_state, apply=apply, axis_name=axis_name
        )
        entering = mask_rows(continues, entering)
        return correction(inputs, entering, segment_ids), final

    return sharded_call(
        per_shard,
        mesh,
        axis_name,
        time=dict(**inputs, segment_ids=segment_ids),
        rows=dict(initial_state=initial_state),
        shared={},
    )


def _validate(op, inputs, mesh, axis_name, segment_ids, initial_state, **options) -> None:
    """The split checks, then the op's own checks of shapes and dtypes on the whole inputs
    (traced: values, such as the sign of log-decays, are checked only under checkify)."""
    check_sequence_split(mesh, axis_name, **inputs, segment_ids=segment_ids)

    def run(inputs, segment_ids):
        return op(**inputs, initial_state=initial_state, segment_ids=segment_ids, **options)

    jax.eval_shape(run, inputs, segment_ids)


def _zero_state(k: jax.Array, v: jax.Array) -> jax.Array:
    batch, _, heads, key_dim = k.shape
    return jnp.zeros((batch, heads, key_dim, v.shape[-1]), accumulation_dtype(k.dtype, v.dtype))


def _family(
    op: Callable[..., tuple[jax.Array, jax.Array]],
    summary: Summary,
    apply: Callable[[jax.Array, jax.Array], jax.Array],
    inputs: dict[str, jax.Array],
    initial_state: jax.Array | None,
    segment_ids: jax.Array | None,
    mesh: Mesh,
    axis_name: str,
    **options,
) -> tuple[jax.Array, jax.Array]:
    """`op(**inputs, initial_state=, segment_ids=, **options)` sequence-parallel over
    `axis_name`, for an op whose state is one `[B, H, K, V]` array."""
    _validate(op, inputs, mesh, axis_name, segment_ids, initial_state, **options)
    if initial_state is None:
        initial_state = _zero_state(inputs["k"], inputs["v"])

    def correction(inputs, entering, segment_ids):
        return op(**inputs, initial_state=entering, segment_ids=segment_ids, **options)[0]

    return _lasp2(summary, apply, correction, inputs, initial_state, segment_ids, mesh, axis_name)


# ------------------------------------------------------------- gated linear attention


def _decay_summary(chunk_size: int, log_decay_name: str) -> Summary:
    """`(A_p [B, H, G], M_p)` of the gated linear-attention family: the shard's total decay
    (G = 1 per head, or K per key channel) and its state after its last token from zeros
    (`gla.states_after`, no outputs)."""

    def summary(inputs, segment_ids):
        k, v = inputs["k"], inputs["v"]
        log_decay = inputs[log_decay_name]
        last = np.full((k.shape[0], 1), k.shape[1] - 1)
        state = gla_ops.states_after(
            k,
            v,
            log_decay,
            last,
            initial_state=varying_like((k, v), _zero_state(k, v)),
            segment_ids=segment_ids,
            chunk_size=chunk_size,
        )[:, 0]
        if log_decay.ndim == 3:
            log_decay = log_decay[..., None]
        return jnp.exp(jnp.sum(log_decay.astype(state.dtype), axis=1)), state

    return summary


def _decay_apply(transition: jax.Array, state: jax.Array) -> jax.Array:
    """`A S` for a diagonal decay over K, `A: [B, H, G]`, `S: [B, H, K, V]`."""
    return transition[..., None] * state


def sequence_parallel_linear_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    scale: float | None = None,
    normalize: bool = False,
    initial_state: jax.Array | gla_ops.LinearAttentionState | None = None,
    segment_ids: jax.Array | None = None,
    impl: gla_ops.GLAImpl = "auto",
    chunk_size: int = gla_ops.DEFAULT_CHUNK_SIZE,
    mesh: Mesh,
    axis_name: str = SEQUENCE,
) -> tuple[jax.Array, jax.Array | gla_ops.LinearAttentionState]:
    """`seqjax.ops.linear_attention` with T split over the mesh axis `axis_name` (LASP-2).

    Arguments and results as the op's; with `normalize=True` the `LinearAttentionState`
    `(S, z)` travels as one state with `z` as an extra value column (the op's own trick).
    `o` is sharded like `q`, the final state replicated over `axis_name`; T must be divisible
    by the axis size.

    Each shard runs `simple_gla` with `g = 0` (the same recurrence): `linear_attention`'s own
    zero decay is not typed as varying inside `shard_map`, which its chunked backward pass
    rejects.
    """
    options = dict(scale=scale, impl=impl, chunk_size=chunk_size)
    inputs = dict(q=q, k=k, v=v)
    _validate(
        gla_ops.linear_attention,
        inputs,
        mesh,
        axis_name,
        segment_ids,
        initial_state,
        normalize=normalize,
        **options,
    )
    state = initial_state
    if normalize:
        if initial_state is not None:
            state = engine.with_key_sum(initial_state.S, initial_state.z)
        # In the accumulation dtype, so that the output is normalized before its cast, as in
        # the op.
        inputs["v"] = engine.with_ones_column(v.astype(accumulation_dtype(v.dtype)))
    if state is None:
        state = _zero_state(k, inputs["v"])

    def zero_decay(inputs):
        return {**inputs, "g": jnp.zeros_like(inputs["q"][..., 0])}

    def summary(inputs, segment_ids):
        return _decay_summary(chunk_size, "g")(zero_decay(inputs), segment_ids)

    def correction(inputs, entering, segment_ids):
        o, _ = gla_ops.simple_gla(
            **zero_decay(inputs), initial_state=entering, segment_ids=segment_ids, **options
        )
        return gla_ops.normalized_output(o).astype(v.dtype) if normalize else o

    o, final = _lasp2(
        summary, _decay_apply, correction, inputs, state, segment_ids, mesh, axis_name
    )
    if normalize:
        return o, gla_ops.LinearAttentionState(final[..., :-1], final[..., -1])
    return o, final


def sequence_parallel_simple_gla(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array,
    *,
    scale: float | None = None,
    initial_state: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    impl: gla_ops.GLAImpl = "auto",
    chunk_size: int = gla_ops.DEFAULT_CHUNK_SIZE,
    mesh: Mesh,
    axis_name: str = SEQUENCE,
) -> tuple[jax.Array, jax.Array]:
    """`seqjax.ops.simple_gla` (`g: [B, T, H]`) with T split over the mesh axis `axis_name`
    (LASP-2); arguments and results as the op's, `o` sharded like `q`, the final state
    replicated over `axis_name`."""
    return _family(
        gla_ops.simple_gla,
        _decay_summary(chunk_size, "g"),
        _decay_apply,
        dict(q=q, k=k, v=v, g=g),
        initial_state,
        segment_ids,
        mesh,
        axis_name,
        scale=scale,
        impl=impl,
        chunk_size=chunk_size,
    )


def sequence_parallel_gla(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    gk: jax.Array,
    *,
    scale: float | None = None,
    initial_state: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    impl: gla_ops.GLAImpl = "auto",
    chunk_size: int = gla_ops.DEFAULT_CHUNK_SIZE,
    mesh: Mesh,
    axis_name: str = SEQUENCE,
) -> tuple[jax.Array, jax.Array]:
    """`seqjax.ops.gla` (`gk: [B, T, H, K]`) with T split over the mesh axis `axis_name`
    (LASP-2); arguments and results as the op's, `o` sharded like `q`, the final state
    replicated over `axis_name`."""
    return _family(
        gla_ops.gla,
        _decay_summary(chunk_size, "gk"),
        _decay_apply,
        dict(q=q, k=k, v=v, gk=gk),
        initial_state,
        segment_ids,
        mesh,
        axis_name,
        scale=scale,
        impl=impl,
        chunk_size=chunk_size,
    )


def sequence_parallel_ssd(
    x: jax.Array,
    dt: jax.Array,
    A: jax.Array,
    B: jax.Array,
    C: jax.Array,
    D: jax.Array | None = None,
    dt_bias: jax.Array | None = None,
    initial_state: jax.Array | None = None,
    *,
    dt_softplus: bool = True,
    segment_ids: jax.Array | None = None,
    impl: ssd_ops.SSDImpl = "auto",
    chunk_size: int = ssd_ops.DEFAULT_CHUNK_SIZE,
    mesh: Mesh,
    axis_name: str = SEQUENCE,
) -> tuple[jax.Array, jax.Array]:
    """`seqjax.ops.ssd` (Mamba-2) with T split over the mesh axis `axis_name`: the op's own
    mapping to `simple_gla`, run by `sequence_parallel_simple_gla`; arguments and results as
    the op's."""
    options = dict(dt_softplus=dt_softplus, segment_ids=segment_ids, impl=impl)
    jax.eval_shape(
        lambda *args: ssd_ops.ssd(*args, chunk_size=chunk_size, **options),
        *(x, dt, A, B, C, D, dt_bias, initial_state),
    )
    q, k, v, g, acc = ssd_ops.as_simple_gla(x, dt, A, B, C, dt_bias, dt_softplus)
    y, final = sequence_parallel_simple_gla(
        q,
        k,
        v,
        g,
        scale=1.0,
        initial_state=initial_state,
        segment_ids=segment_ids,
        impl=impl,
        chunk_size=chunk_size,
        mesh=mesh,
        axis_name=axis_name,
    )
    return ssd_ops.add_skip(y, x, D, acc).astype(x.dtype), final


# ------------------------------------------------------------------------- delta rule


def _delta_summary(chunk_size: int) -> Summary:
    """`(A_p [B, H, K, K], M_p)` of the delta-rule family: the shard's chunk transitions
    `S <- M_n S + D_n` (`delta_rule.chunk_transition`) composed, `(M2, D2) . (M1, D1) =
    (M2 M1, M2 D1 + D2)`, from the first chunk's."""

    def summary(inputs, segment_ids):
        transitions, increments = delta_ops.chunk_transition(
            inputs["k"],
            inputs["v"],
            inputs["beta"],
            inputs.get("g"),
            segment_ids=segment_ids,
            chunk_size=chunk_size,
        )
        chunks = (jnp.moveaxis(transitions, 1, 0), jnp.moveaxis(increments, 1, 0))

        def compose(carry, chunk):
            transition, state = carry
            m, d = chunk
            return (m @ transition, m @ state + d), None

        first = tuple(x[0] for x in chunks)
        rest = tuple(x[1:] for x in chunks)
        return jax.lax.scan(compose, first, rest)[0]

    return summary


def _matrix_apply(transition: jax.Array, state: jax.Array) -> jax.Array:
    """`A S` for a `[K, K]` transition, `A: [B, H, K, K]`, `S: [B, H, K, V]`."""
    return transition @ state


def sequence_parallel_delta_rule(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    beta: jax.Array,
    *,
    scale: float | None = None,
    initial_state: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    impl: delta_ops.DeltaImpl = "auto",
    chunk_size: int = delta_ops.DEFAULT_CHUNK_SIZE,
    mesh: Mesh,
    axis_name: str = SEQUENCE,
) -> tuple[jax.Array, jax.Array]:
    """`seqjax.ops.delta_rule` with T split over the mesh axis `axis_name` (LASP-2 with
    `[K, K]` shard transitions); arguments and results as the op's, `o` sharded like `q`,
    the final state replicated over `axis_name`."""
    return _family(
        delta_ops.delta_rule,
        _delta_summary(chunk_size),
        _matrix_apply,
        dict(q=q, k=k, v=v, beta=beta),
        initial_state,
        segment_ids,
        mesh,
        axis_name,
        scale=scale,
        impl=impl,
        chunk_size=chunk_size,
    )


def sequence_parallel_gated_delta_rule(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array,
    beta: jax.Array,
    *,
    scale: float | None = None,
    initial_state: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    impl: delta_ops.DeltaImpl = "auto",
    chunk_size: int = delta_ops.DEFAULT_CHUNK_SIZE,
    mesh: Mesh,
    axis_name: str = SEQUENCE,
) -> tuple[jax.Array, jax.Array]:
    """`seqjax.ops.gated_delta_rule` (`g: [B, T, H]`) with T split over the mesh axis
    `axis_name` (LASP-2 with `[K, K]` shard transitions); arguments and results as the
    op's, `o` sharded like `q`, the final state replicated over `axis_name`."""
    return _family(
        delta_ops.gated_delta_rule,
        _delta_summary(chunk_size),
        _matrix_apply,
        dict(q=q, k=k, v=v, g=g, beta=beta),
        initial_state,
        segment_ids,
        mesh,
        axis_name,
        scale=scale,
        impl=impl,
        chunk_size=chunk_size,
    )
