"""Meshes, logical axis rules and shardings (sequence parallelism of the ops comes later)."""

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
