"""Sequence parallelism of the diagonal scans: the recurrentgemma scheme.

For `h_t = a_t * h_{t-1} + b_t` (elementwise, any trailing shape) shard `p` is summarized by
`A_p = prod_t a_t` over its tokens (zero on rows where a segment starts inside the shard or at
its first token) and `M_p`, its final state from a zero state. `incoming_state` (one
all-gather of the `(A_p, M_p)`, then a fold) gives the state `S_in(p)` entering the shard, and
the shard reruns its op from `S_in(p)`. Each op below reuses its own single-device code path
for both local passes; under `jit` whatever of the first pass its final state does not need
is dead code (`lru`'s readout, for one; `selective_scan` fuses its readout into the token loop,
so both of its passes cost a full local op).

Every `[B, T, ...]` input is split along `T` over the mesh axis `axis_name` (contiguous
shards) and along `B` over the mesh's data-parallel axes (`"data"`, `"fsdp"`) when present;
parameters are replicated. Outputs are sharded like the inputs; the final state is the last
shard's (the first's for a reversed scan).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from seqjax import checks
from seqjax.ops.common import ScanOpImpl, token_starts
from seqjax.ops.hgrn import hgrn
from seqjax.ops.lru import lambda_and_gamma, lru
from seqjax.ops.rg_lru import decay_and_input, rg_lru
from seqjax.ops.selective_scan import (
    DEFAULT_CHUNK_SIZE as SELECTIVE_SCAN_CHUNK_SIZE,
)
from seqjax.ops.selective_scan import (
    SelectiveScanImpl,
    discretized_decay,
    discretized_step,
    selective_scan,
)
from seqjax.parallel.mesh import SEQUENCE
from seqjax.parallel.sequence import (
    boundary_flags,
    check_sequence_split,
    incoming_state,
    mask_rows,
    shard_index,
    sharded_call,
    varying_like,
)
from seqjax.scan import SCAN_IMPLS, ScanImpl, linear_recurrence
from seqjax.scan.linear_recurrence import DEFAULT_CHUNK_SIZE, accumulation_dtype

Flags = tuple[jax.Array, jax.Array]


def diagonal_shard(
    run: Callable[[jax.Array], tuple[Any, jax.Array]],
    transition: jax.Array,
    initial_state: jax.Array | None,
    flags: Flags,
    axis_name: str,
    reverse: bool = False,
) -> tuple[Any, jax.Array]:
    """The recurrentgemma scheme on one shard. `run(h0) -> (output, final)` is the op on the
    shard's tokens from the state `h0`; `transition`, of the state's shape `[B, ...]`, is the
    product of the shard's decays; `flags` are `boundary_flags` (with the same `reverse`, for
    a recurrence that runs from the end)."""
    continues, closed = flags
    # `transition` comes from this shard's tokens, so it varies over `axis_name` already.
    _, local_final = run(varying_like((transition,), jnp.zeros_like(transition)))
    transition = mask_rows(jnp.broadcast_to(continues & ~closed, transition.shape[:1]), transition)
    if initial_state is None:
        initial_state = jnp.zeros_like(local_final)
    entering, _ = incoming_state(
        transition,
        local_final,
        initial_state.astype(local_final.dtype),
        apply=jnp.multiply,
        axis_name=axis_name,
        reverse=reverse,
    )
    return run(mask_rows(jnp.broadcast_to(continues, entering.shape[:1]), entering))


def sequence_parallel_linear_recurrence(
    a: jax.Array,
    b: jax.Array,
    h0: jax.Array | None = None,
    *,
    segment_ids: jax.Array | None = None,
    reverse: bool = False,
    impl: ScanImpl = "auto",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    mesh: Mesh,
    axis_name: str = SEQUENCE,
) -> tuple[jax.Array, jax.Array]:
    """`seqjax.scan.linear_recurrence` (`h_t = a_t * h_{t-1} + b_t` over axis 1 of
    `[B, T, ...]`) with `T` split over `mesh`'s axis `axis_name`; returns `(h, h_last)` as the
    single-device op does. With `reverse` the summaries fold from the last shard down, and
    `h_last` (the state at t = 0) comes from the first shard."""
    options = dict(reverse=reverse, impl=impl, chunk_size=chunk_size)
    jax.eval_shape(
        lambda a, b, h0: linear_recurrence(a, b, h0, segment_ids=segment_ids, **options),
        a,
        b,
        h0,
    )
    check_sequence_split(mesh, axis_name, b=b)
    acc = accumulation_dtype(a.dtype, b.dtype)

    def per_shard(a, b, segment_ids, h0):
        def run(state):
            return linear_recurrence(a, b, state, segment_ids=segment_ids, **options)

        flags = boundary_flags(segment_ids, axis_name, reverse=reverse)
        transition = jnp.prod(a.astype(acc), axis=1)
        return diagonal_shard(run, transition, h0, flags, axis_name, reverse)

    return sharded_call(
        per_shard,
        mesh,
        axis_name,
        time=dict(a=jnp.broadcast_to(a, b.shape), b=b, segment_ids=segment_ids),
        rows=dict(h0=h0),
        shared={},
        final_shard=0 if reverse else -1,
    )


def sequence_parallel_hgrn(
    x: jax.Array,
    g: jax.Array,
    initial_state: jax.Array | None = None,
    *,
    segment_ids: jax.Array | None = None,
    impl: ScanOpImpl = "auto",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    mesh: Mesh,
    axis_name: str = SEQUENCE,
) -> tuple[jax.Array, jax.Array]:
    """`seqjax.ops.hgrn` with `T` split over `mesh`'s axis `axis_name`; the shard's transition
    is `exp(sum_t g_t)`."""
    options = dict(segment_ids=segment_ids, impl=impl, chunk_size=chunk_size)
    jax.eval_shape(lambda *args: hgrn(*args, **options), x, g, initial_state)
    check_sequence_split(mesh, axis_name, x=x)

    def per_shard(x, g, segment_ids, initial_state):
        def run(state):
            return hgrn(x, g, state, segment_ids=segment_ids, impl=impl, chunk_size=chunk_size)

        transition = jnp.exp(jnp.sum(g.astype(accumulation_dtype(g.dtype)), axis=1))
        flags = boundary_flags(segment_ids, axis_name)
        return diagonal_shard(run, transition, initial_state, flags, axis_name)

    return sharded_call(
        per_shard,
        mesh,
        axis_name,
        time=dict(x=x, g=g, segment_ids=segment_ids),
        rows=dict(initial_state=initial_state),
        shared={},
    )


def sequence_parallel_rg_lru(
    x: jax.Array,
    gate_x: jax.Array,
    gate_a: jax.Array,
    a_param: jax.Array,
    initial_state: jax.Array | None = None,
    *,
    segment_ids: jax.Array | None = None,
    c: float = 8.0,
    impl: ScanImpl = "auto",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    mesh: Mesh,
    axis_name: str = SEQUENCE,
) -> tuple[jax.Array, jax.Array]:
    """`seqjax.ops.rg_lru` with `T` split over `mesh`'s axis `axis_name`.

    A shard's first token opens a segment (its input is not normalized) on rows where it
    starts a new segment, and on shard 0 when `initial_state` is None; the op can only say
    that for a whole call, so the shards build the op's decays and inputs
    (`rg_lru.decay_and_input`) and scan them. `impl` is one of the scan layer's algorithms.
    """
    checks.check_choice("impl", impl, SCAN_IMPLS)
    options = dict(segment_ids=segment_ids, c=c, impl=impl, chunk_size=chunk_size)
    jax.eval_shape(
        lambda *args: rg_lru(*args, **options), x, gate_x, gate_a, a_param, initial_state
    )
    check_sequence_split(mesh, axis_name, x=x)

    def per_shard(x, gate_x, gate_a, segment_ids, initial_state, a_param):
        continues, closed = boundary_flags(segment_ids, axis_name)
        opens = ~continues
        if initial_state is None:
            opens = opens | (shard_index(axis_name) == 0)
        starts = token_starts(segment_ids, *x.shape[:2]).at[:, 0].set(opens)
        a, normalized_x = decay_and_input(x, gate_x, gate_a, a_param, starts[..., None], c)

        def run(state):
            return linear_recurrence(
                a, normalized_x, state, segment_ids=segment_ids, impl=impl, chunk_size=chunk_size
            )

        transition = jnp.prod(a, axis=1)
        h, final = diagonal_shard(run, transition, initial_state, (continues, closed), axis_name)
        return h.astype(x.dtype), final

    return sharded_call(
        per_shard,
        mesh,
        axis_name,
        time=dict(x=x, gate_x=gate_x, gate_a=gate_a, segment_ids=segment_ids),
        rows=dict(initial_state=initial_state),
        shared=dict(a_param=a_param),
    )


def sequence_parallel_lru(
    x: jax.Array,
    nu_log: jax.Array,
    theta_log: jax.Array,
    B: jax.Array,
    C: jax.Array,
    D: jax.Array | None = None,
    gamma_log: jax.Array | None = None,
    initial_state: jax.Array | None = None,
    *,
    segment_ids: jax.Array | None = None,
    impl: ScanOpImpl = "auto",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    mesh: Mesh,
    axis_name: str = SEQUENCE,
) -> tuple[jax.Array, jax.Array]:
    """`seqjax.ops.lru` with `T` split over `mesh`'s axis `axis_name`; the shard's transition
    is `lambda ** (T / P)`."""
    parameters = dict(nu_log=nu_log, theta_log=theta_log, B=B, C=C, D=D, gamma_log=gamma_log)
    jax.eval_shape(
        lambda *args: lru(*args, segment_ids=segment_ids, impl=impl, chunk_size=chunk_size),
        x,
        *parameters.values(),
        initial_state,
    )
    length = check_sequence_split(mesh, axis_name, x=x)

    def per_shard(x, segment_ids, initial_state, **parameters):
        # The scan layer's custom VJP needs lambda (its decay) to vary like the inputs.
        parameters = varying_like((x,), parameters)

        def run(state):
            return lru(
                x,
                **parameters,
                initial_state=state,
                segment_ids=segment_ids,
                impl=impl,
                chunk_size=chunk_size,
            )

        lam, _ = lambda_and_gamma(
            parameters["nu_log"], parameters["theta_log"], parameters["gamma_log"], x.dtype
        )
        flags = boundary_flags(segment_ids, axis_name)
        transition = jnp.broadcast_to(lam**length, (x.shape[0], *lam.shape))
        return diagonal_shard(run, transition, initial_state, flags, axis_name)

    return sharded_call(
        per_shard,
        mesh,
        axis_name,
        time=dict(x=x, segment_ids=segment_ids),
        rows=dict(initial_state=initial_state),
        shared=parameters,
    )


def sequence_parallel_selective_scan(
    x: jax.Array,
    dt: jax.Array,
    A: jax.Array,
    B: jax.Array,
    C: jax.Array,
    D: jax.Array | None = None,
    z: jax.Array | None = None,
    dt_bias: jax.Array | None = None,
    initial_state: jax.Array | None = None,
    *,
    dt_softplus: bool = True,
    allow_neg_eigval: bool = False,
    segment_ids: jax.Array | None = None,
    impl: SelectiveScanImpl = "auto",
    chunk_size: int = SELECTIVE_SCAN_CHUNK_SIZE,
    mesh: Mesh,
    axis_name: str = SEQUENCE,
) -> tuple[jax.Array, jax.Array]:
    """`seqjax.ops.selective_scan` (Mamba-1, state `[B, D, N]`) with `T` split over `mesh`'s
    axis `axis_name`; the shard's transition is `prod_t exp(delta_t[d] A[d, n])` (or Grazzi
    et al.'s `2 exp(delta_t A) - 1` with `allow_neg_eigval`)."""
    options = dict(
        dt_softplus=dt_softplus, allow_neg_eigval=allow_neg_eigval, impl=impl, chunk_size=chunk_size
    )
    jax.eval_shape(
        lambda *args: selective_scan(*args, segment_ids=segment_ids, **options),
        *(x, dt, A, B, C, D, z, dt_bias, initial_state),
    )
    check_sequence_split(mesh, axis_name, x=x)

    def per_shard(x, dt, B, C, z, segment_ids, initial_state, A, D, dt_bias):
        def run(state):
            return selective_scan(
                x, dt, A, B, C, D, z, dt_bias, state, segment_ids=segment_ids, **options
            )

        real = accumulation_dtype(x.dtype, dt.dtype)
        delta = discretized_step(
            dt.astype(real), None if dt_bias is None else dt_bias.astype(real), dt_softplus
        )
        decays = discretized_decay(
            delta, A.astype(accumulation_dtype(A.dtype, real)), allow_neg_eigval
        )
        flags = boundary_flags(segment_ids, axis_name)
        return diagonal_shard(run, jnp.prod(decays, axis=1), initial_state, flags, axis_name)

    return sharded_call(
        per_shard,
        mesh,
        axis_name,
        time=dict(x=x, dt=dt, B=B, C=C, z=z, segment_ids=segment_ids),
        rows=dict(initial_state=initial_state),
        shared=dict(A=A, D=D, dt_bias=dt_bias),
    )
