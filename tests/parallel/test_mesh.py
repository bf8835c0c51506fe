import flax.linen as nn
import jax
import pytest
from jax.sharding import AbstractMesh, AxisType, PartitionSpec

from seqjax.parallel import MESH_AXES, make_mesh, shardings_of
from seqjax.parallel.mesh import spec_of


def abstract_mesh(data, fsdp, tensor, sequence=1):
    return AbstractMesh(
        (data, fsdp, tensor, sequence), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES)
    )


def test_make_mesh_fills_the_free_axis_with_the_remaining_devices():
    mesh = make_mesh(data=-1, fsdp=1, tensor=1)
    assert mesh.shape == {"data": jax.device_count(), "fsdp": 1, "tensor": 1, "sequence": 1}
    assert mesh.axis_names == MESH_AXES


@pytest.mark.parametrize(
    ("sizes", "message"),
    [
        ({"data": 2}, "2 devices, but 1 are available"),
        ({"data": -1, "fsdp": -1}, "at most one axis may be -1"),
        ({"tensor": 0}, "mesh.tensor: expected a positive int or -1"),
        ({"data": 1, "sequence": 2}, "data x fsdp x tensor x sequence = 1 x 1 x 1 x 2 = 2"),
    ],
)
def test_make_mesh_rejects_shapes_that_do_not_fit_the_devices(sizes, message):
    with pytest.raises(ValueError, match=message):
        make_mesh(**sizes)


def test_a_dimension_is_split_over_its_rule_axes_when_they_divide_it():
    mesh = abstract_mesh(2, 4, 2)
    assert spec_of(("embed", "heads", "kv"), (64, 4, 16), mesh) == PartitionSpec(
        "fsdp", "tensor", None
    )
    assert spec_of(("batch", "length"), (16, 8), mesh) == PartitionSpec(
        ("data", "fsdp"), "sequence"
    )


def test_the_time_axis_of_activations_is_split_over_the_sequence_axis():
    mesh = abstract_mesh(2, 1, 1, 4)
    assert spec_of(("batch", "length", "embed"), (4, 64, 32), mesh) == PartitionSpec(
        ("data", "fsdp"), "sequence", None
    )


def test_a_dimension_the_axes_do_not_divide_stays_replicated():
    mesh = abstract_mesh(1, 8, 8)
    assert spec_of(("embed", "heads", "kv"), (64, 4, 16), mesh) == PartitionSpec("fsdp", None, None)


def test_a_mesh_axis_is_used_once_per_array():
    mesh = abstract_mesh(1, 1, 2)
    assert spec_of(("heads", "mlp"), (4, 8), mesh) == PartitionSpec("tensor", None)


def test_shardings_follow_boxed_names_and_replicate_unnamed_leaves():
    mesh = make_mesh()
    boxed = {
        "w": nn.Partitioned(jax.ShapeDtypeStruct((4, 2), "float32"), ("embed", "mlp")),
        "count": jax.ShapeDtypeStruct((), "int32"),
    }
    shardings = shardings_of(boxed, mesh)
    assert shardings["w"].spec == PartitionSpec("fsdp", "tensor")
    assert shardings["count"].spec == PartitionSpec()
