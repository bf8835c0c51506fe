"""Meshes, logical axis rules and shardings (`mesh`), and sequence parallelism of the ops over
the mesh axis `"sequence"`: the shard-summary core (`sequence`), LASP-2 for the
linear-attention and delta-rule families (`linear_attention`), the diagonal scans (`scans`),
short convolutions with a halo (`conv`), Ulysses and ring attention (`attention`), and the ops
as the mixers call them, sequence-parallel under a mesh whose `sequence` axis has more than one
device (`dispatch`)."""

from seqjax.parallel.mesh import (
    BATCH_AXES,
    LOGICAL_RULES,
    MESH_AXES,
    SEQUENCE,
    batch_sharding,
    make_mesh,
    shardings_of,
)

__all__ = [
    "BATCH_AXES",
    "LOGICAL_RULES",
    "MESH_AXES",
    "SEQUENCE",
    "batch_sharding",
    "make_mesh",
    "shardings_of",
]
