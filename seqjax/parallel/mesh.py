"""The device mesh and the logical axis rules that map the modules' axis names onto it.

The mesh has the axes `("data", "fsdp", "tensor", "sequence")`:

- `data`: pure data parallelism (parameters replicated, the batch split);
- `fsdp`: the batch split *and* parameters sharded along their `embed` axis (ZeRO-3 style: XLA
  gathers a layer's weights when it needs them);
- `tensor`: Megatron-style tensor parallelism over heads, the MLP's hidden axis and the
  vocabulary;
- `sequence`: sequence parallelism, the time axis of every activation split into contiguous
  blocks; the mixers then run the sequence-parallel forms of their ops
  (`seqjax.parallel.dispatch`).

Parameters and activations carry logical names (`seqjax.nn`); `LOGICAL_RULES` is the one table
that says which mesh axes each name is split over. A dimension that a rule's mesh axes do not
divide (4 heads over 8 tensor devices) stays replicated rather than failing, so one config runs
on any mesh; `shardings_of` applies that fallback.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

SEQUENCE = "sequence"
MESH_AXES = ("data", "fsdp", "tensor", SEQUENCE)
BATCH_AXES = ("data", "fsdp")

LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("length", SEQUENCE),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("kv", None),
    ("state", None),
    ("layers", None),
)


def make_mesh(
    data: int = -1,
    fsdp: int = 1,
    tensor: int = 1,
    sequence: int = 1,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """A mesh of `data x fsdp x tensor x sequence` devices (one size may be -1: the rest of
    the devices). `sequence` is the last (fastest-varying) axis, so its devices are neighbours
    (one host, one ICI ring) and the sequence collectives stay local.

    Axes are `AxisType.Auto` (XLA propagates shardings from the annotated inputs and the
    logical constraints; `jax.make_mesh` now defaults to explicit axes)."""
    devices = jax.devices() if devices is None else list(devices)
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor, SEQUENCE: sequence}
    for name, size in sizes.items():
        if not isinstance(size, int) or (size < 1 and size != -1):
            raise ValueError(f"mesh.{name}: expected a positive int or -1, got {size!r}")
    free = [name for name, size in sizes.items() if size == -1]
    if len(free) > 1:
        raise ValueError(f"mesh: at most one axis may be -1, got {free}")
    known = math.prod(size for size in sizes.values() if size != -1)
    if free:
        if len(devices) % known:
            raise ValueError(
                f"mesh: {len(devices)} devices do not split into {free[0]} x {known} "
                f"(the other axes' product)"
            )
        sizes[free[0]] = len(devices) // known
    shape = tuple(sizes[name] for name in MESH_AXES)
    if math.prod(shape) != len(devices):
        raise ValueError(
            f"mesh: data x fsdp x tensor x sequence = {' x '.join(map(str, shape))} = "
            f"{math.prod(shape)} devices, but {len(devices)} are available"
        )
    grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batches `[B, T, ...]`: rows split over the data-parallel axes, time over `sequence`."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, SEQUENCE))


def _mesh_axes(name: str | None, rules: Sequence[tuple[str, Any]]) -> tuple[str, ...]:
    for logical, axes in rules:
        if logical == name:
            return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    return ()


def spec_of(
    names: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules=LOGICAL_RULES
) -> PartitionSpec:
    """The partition spec of an array with logical axis `names`: each dimension is split over
    its rule's mesh axes when their product divides it and none is taken by an earlier one;
    otherwise that dimension is replicated."""
    used: set[str] = set()
    spec = []
    for name, size in zip(names, shape, strict=True):
        axes = tuple(a for a in _mesh_axes(name, rules) if a not in used)
        ways = math.prod(mesh.shape[a] for a in axes)
        if not axes or size % ways:
            spec.append(None)
            continue
        used.update(axes)
        spec.append(axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


def shardings_of(abstract_tree: Any, mesh: Mesh, rules=LOGICAL_RULES) -> Any:
    """`NamedSharding`s for a pytree whose leaves may be boxed with logical names
    (`nn.Partitioned`, as `jax.eval_shape` of an init returns them); the result has the
    structure of the *unboxed* tree. Unnamed leaves (step counters, scalars) are replicated."""

    def sharding(leaf):
        if isinstance(leaf, nn.Partitioned):
            return NamedSharding(mesh, spec_of(leaf.names, leaf.value.shape, mesh, rules))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(sharding, abstract_tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))
