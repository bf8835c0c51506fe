"""The ops as the mixers call them: each is the single-device op of `seqjax.ops` (or
`seqjax.scan`), or its sequence-parallel form when it is traced under a mesh
(`jax.set_mesh`, as the train step does) whose `sequence` axis has more than one device.
Arguments and results are the op's; the sequence-parallel form gets the mesh from the context.

| op | sequence-parallel form |
|---|---|
| `linear_attention`, `simple_gla`, `gla`, `ssd` | LASP-2 (`linear_attention`) |
| `delta_rule`, `gated_delta_rule` | LASP-2 with `[K, K]` shard transitions |
| `linear_recurrence`, `hgrn`, `rg_lru`, `lru`, `selective_scan` | shard summaries (`scans`) |
| `causal_conv` | a halo exchange (`conv`) |
| `softmax_attention` | Ulysses or ring (`attention`), contiguous shards |

So the GLA, HGRN2, LightNet, RetNet, TransNormer, Mamba-2, DeltaNet, Gated DeltaNet, Mamba,
HGRN, RG-LRU (Hawk/Griffin), LRU, diagonal linear RNN and attention layers, and every short
convolution, run sequence-parallel. The other mixers call their ops directly (mLSTM, whose
stabilizer is a running max; S4/S5; the nonlinear RNNs, which are sequential by nature; Aaren;
MoM's routed memories; Based's and the linearized-attention layers' hybrid forms): under a
sequence mesh XLA partitions them like any other function of a sharded array, gathering the
time axis they scan, which is correct but not parallel over the sequence.

Attention keeps contiguous shards (no zig-zag): in a hybrid the recurrent layers need the
tokens in their natural order, and zig-zag order would have to be undone around every one of
them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
from jax.sharding import AbstractMesh

from seqjax.ops import attention as attention_ops
from seqjax.ops import delta_rule as delta_ops
from seqjax.ops import gla as gla_ops
from seqjax.ops import hgrn as hgrn_ops
from seqjax.ops import lru as lru_ops
from seqjax.ops import rg_lru as rg_lru_ops
from seqjax.ops import selective_scan as selective_scan_ops
from seqjax.ops import short_conv
from seqjax.ops import ssd as ssd_ops
from seqjax.parallel import attention, conv, scans
from seqjax.parallel import linear_attention as lasp
from seqjax.parallel.mesh import SEQUENCE
from seqjax.scan import linear_recurrence as linear_recurrence_op

SEQUENCE_METHODS = ("auto", *attention.ATTENTION_METHODS)


def sequence_mesh() -> AbstractMesh | None:
    """The context mesh when it has a `sequence` axis of more than one device, else None."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or SEQUENCE not in mesh.axis_names or mesh.shape[SEQUENCE] == 1:
        return None
    return mesh


def _over_sequence(op: Callable, parallel_op: Callable) -> Callable:
    @functools.wraps(op)
    def call(*args, **kwargs):
        mesh = sequence_mesh()
        if mesh is None:
            return op(*args, **kwargs)
        return parallel_op(*args, mesh=mesh, **kwargs)

    return call


linear_attention = _over_sequence(gla_ops.linear_attention, lasp.sequence_parallel_linear_attention)
simple_gla = _over_sequence(gla_ops.simple_gla, lasp.sequence_parallel_simple_gla)
gla = _over_sequence(gla_ops.gla, lasp.sequence_parallel_gla)
ssd = _over_sequence(ssd_ops.ssd, lasp.sequence_parallel_ssd)
delta_rule = _over_sequence(delta_ops.delta_rule, lasp.sequence_parallel_delta_rule)
gated_delta_rule = _over_sequence(
    delta_ops.gated_delta_rule, lasp.sequence_parallel_gated_delta_rule
)
linear_recurrence = _over_sequence(linear_recurrence_op, scans.sequence_parallel_linear_recurrence)
hgrn = _over_sequence(hgrn_ops.hgrn, scans.sequence_parallel_hgrn)
rg_lru = _over_sequence(rg_lru_ops.rg_lru, scans.sequence_parallel_rg_lru)
lru = _over_sequence(lru_ops.lru, scans.sequence_parallel_lru)
selective_scan = _over_sequence(
    selective_scan_ops.selective_scan, scans.sequence_parallel_selective_scan
)
causal_conv = _over_sequence(short_conv.causal_conv, conv.sequence_parallel_causal_conv)


def softmax_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    sequence_method: str = "auto",
    initial_state: attention_ops.KVCache | None = None,
    **options: Any,
) -> tuple[jax.Array, attention_ops.KVCache]:
    """`seqjax.ops.softmax_attention`; under a sequence mesh, `sequence_method` picks Ulysses or
    ring attention (`"auto"`: Ulysses when the axis size divides both head counts, which moves
    fewer bytes than the ring's P - 1 rounds, ring otherwise)."""
    mesh = sequence_mesh()
    if mesh is None:
        return attention_ops.softmax_attention(q, k, v, initial_state=initial_state, **options)
    if initial_state is not None:
        raise ValueError(
            "initial_state: sequence-parallel attention does not continue a cache; prefill "
            "from a cache on a mesh without a sequence axis"
        )
    method = sequence_method
    if method == "auto":
        devices = mesh.shape[SEQUENCE]
        method = "ulysses" if q.shape[2] % devices == k.shape[2] % devices == 0 else "ring"
    return attention.sequence_parallel_attention(q, k, v, mesh=mesh, method=method, **options)
