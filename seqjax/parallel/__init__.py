"""Meshes, logical axis rules and shardings (`mesh`), and sequence parallelism of the ops over a
mesh axis `"sequence"`: the shard-summary core (`sequence`), LASP-2 for the linear-attention
and delta-rule families (`linear_attention`), the diagonal scans (`scans`), short convolutions
with a halo (`conv`), Ulysses and ring attention (`attention`). The mixers do not call the
sequence-parallel forms yet."""

from seqjax.parallel.mesh import (
    BATCH_AXES,
    LOGICAL_RULES,
    MESH_AXES,
    batch_sharding,
    make_mesh,
    shardings_of,
)

__all__ = [
    "BATCH_AXES",
    "LOGICAL_RULES",
    "MESH_AXES",
    "batch_sharding",
    "make_mesh",
    "shardings_of",
]
