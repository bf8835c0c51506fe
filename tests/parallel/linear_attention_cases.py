"""LASP-2 sequence parallelism of the gated linear-attention and delta-rule families on 8
devices (run by `test_sequence_parallel.py`): outputs, final states and gradients w.r.t.
every input and the initial state equal the single-device reference."""

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from seqjax.ops import delta_rule as delta_ops
from seqjax.ops import gla as gla_ops
from seqjax.parallel.linear_attention import (
    sequence_parallel_delta_rule,
    sequence_parallel_gated_delta_rule,
    sequence_parallel_gla,
    sequence_parallel_linear_attention,
    sequence_parallel_simple_gla,
)
from seqjax.parallel.mesh import SEQUENCE

B, H, K, V = 2, 2, 8, 8
RTOL = 1e-5

# name: (sequence-parallel op, single-device op, its `[B, T, ...]` inputs)
OPS = {
    "linear_attention": (
        sequence_parallel_linear_attention,
        gla_ops.linear_attention,
        ("q", "k", "v"),
    ),
    "simple_gla": (sequence_parallel_simple_gla, gla_ops.simple_gla, ("q", "k", "v", "g")),
    "gla": (sequence_parallel_gla, gla_ops.gla, ("q", "k", "v", "gk")),
    "delta_rule": (sequence_parallel_delta_rule, delta_ops.delta_rule, ("q", "k", "v", "beta")),
    "gated_delta_rule": (
        sequence_parallel_gated_delta_rule,
        delta_ops.gated_delta_rule,
        ("q", "k", "v", "g", "beta"),
    ),
}


def sequence_mesh() -> Mesh:
    return Mesh(np.asarray(jax.devices()).reshape(8), (SEQUENCE,))


def data_sequence_mesh() -> Mesh:
    return Mesh(np.asarray(jax.devices()).reshape(2, 4), ("data", SEQUENCE))


def make_inputs(length: int, decay_scale: float = 0.5) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    q = rng.standard_normal((B, length, H, K))
    k = rng.standard_normal((B, length, H, K))
    return {
        "q": q.astype(np.float32),
        "k": (k / np.linalg.norm(k, axis=-1, keepdims=True)).astype(np.float32),
        "v": rng.standard_normal((B, length, H, V)).astype(np.float32),
        "g": -rng.uniform(0.0, decay_scale, (B, length, H)).astype(np.float32),
        "gk": -rng.uniform(0.0, decay_scale, (B, length, H, K)).astype(np.float32),
        "beta": rng.uniform(0.1, 1.9, (B, length, H)).astype(np.float32),
    }


def packed_segments(length: int, shard: int) -> np.ndarray:
    """Row 0: a segment starts exactly at shard 2's first token, the next one inside shard 2
    and crosses the later shards; row 1: one starts inside shard 3, one at shard 5's first
    token (`shard` tokens per shard)."""
    ids = np.zeros((B, length), np.int32)
    ids[0, 2 * shard :] = 1
    ids[0, 2 * shard + shard // 2 + 1 :] = 2
    ids[1, 3 * shard + 1 :] = 1
    ids[1, 5 * shard :] = 2
    return ids


def outputs_and_grads(fn, inputs, initial_state, segment_ids, **options):
    """`(o, final_state)` and the gradients w.r.t. `(inputs, initial_state)` of a fixed
    random projection of both, compiled."""

    def run(inputs, initial_state):
        return fn(**inputs, initial_state=initial_state, segment_ids=segment_ids, **options)

    @jax.jit
    def go(inputs, initial_state):
        out, vjp = jax.vjp(run, inputs, initial_state)
        rng = np.random.default_rng(1)
        cotangent = jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(x.dtype), out)
        return out, vjp(cotangent)

    return go(inputs, initial_state)


def assert_close(actual, expected, what: str) -> None:
    """Every leaf within `RTOL` of the expected one, relative to the leaf's largest value."""
    for path, a, e in zip(
        jax.tree_util.tree_leaves_with_path(expected),
        jax.tree.leaves(actual),
        jax.tree.leaves(expected),
        strict=True,
    ):
        scale = float(np.abs(e).max())
        np.testing.assert_allclose(
            a, e, rtol=RTOL, atol=RTOL * scale, err_msg=f"{what}{jax.tree_util.keystr(path[0])}"
        )


def assert_matches_single_device(
    name: str,
    mesh: Mesh,
    length: int = 64,
    *,
    segments: bool = True,
    initial: bool = True,
    decay_scale: float = 0.5,
    **options,
) -> None:
    """`OPS[name]` over `mesh` against the single-device reference, with packed segments
    and an initial state unless turned off; `options` go to both (`chunk_size` only to the
    sequence-parallel op)."""
    parallel, op, names = OPS[name]
    everything = make_inputs(length, decay_scale)
    inputs = {n: everything[n] for n in names}
    if options.get("normalize"):  # positive features, as normalized linear attention uses
        inputs["q"], inputs["k"] = np.abs(inputs["q"]), np.abs(inputs["k"])
    shard = length // mesh.shape[SEQUENCE]
    segment_ids = packed_segments(length, shard) if segments else None
    initial_state = None
    if initial:
        initial_state = np.random.default_rng(2).standard_normal((B, H, K, V))
        initial_state = initial_state.astype(np.float32)
        if options.get("normalize"):
            z = np.abs(initial_state[..., 0])
            initial_state = gla_ops.LinearAttentionState(initial_state, z)
    reference_options = {key: value for key, value in options.items() if key != "chunk_size"}
    expected = outputs_and_grads(
        op, inputs, initial_state, segment_ids, impl="reference", **reference_options
    )
    actual = outputs_and_grads(parallel, inputs, initial_state, segment_ids, mesh=mesh, **options)
    assert_close(actual, expected, name)


# Two chunks of 4 per shard of 8 tokens: the delta rule composes its chunk transitions.
@pytest.mark.parametrize("name", OPS)
def test_matches_single_device_with_segments_and_initial_state(name):
    assert_matches_single_device(name, sequence_mesh(), chunk_size=4)


@pytest.mark.slow
@pytest.mark.parametrize("name", OPS)
def test_matches_single_device_on_a_data_by_sequence_mesh(name):
    assert_matches_single_device(name, data_sequence_mesh(), chunk_size=4)


@pytest.mark.slow
@pytest.mark.parametrize("name", OPS)
def test_matches_single_device_with_odd_shard_lengths(name):
    # 5 tokens per shard: chunks of 2 leave a partial chunk on every shard.
    assert_matches_single_device(name, sequence_mesh(), 40, chunk_size=2)


@pytest.mark.slow
@pytest.mark.parametrize("name", OPS)
def test_matches_single_device_without_segments_or_initial_state(name):
    assert_matches_single_device(name, sequence_mesh(), segments=False, initial=False)


@pytest.mark.slow
@pytest.mark.parametrize("mesh", [sequence_mesh, data_sequence_mesh])
def test_normalized_linear_attention_matches_single_device(mesh):
    assert_matches_single_device("linear_attention", mesh(), normalize=True, chunk_size=4)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["simple_gla", "gla", "gated_delta_rule"])
def test_matches_single_device_with_strong_decays(name):
    # Up to exp(-8) per token: whole-shard decays far below float32's range underflow to 0.
    assert_matches_single_device(name, sequence_mesh(), 128, chunk_size=16, decay_scale=8.0)


@pytest.mark.slow
def test_output_is_sharded_like_the_input_and_the_state_replicated():
    mesh = data_sequence_mesh()
    inputs = make_inputs(64)
    o, final = sequence_parallel_simple_gla(
        inputs["q"], inputs["k"], inputs["v"], inputs["g"], mesh=mesh
    )
    assert o.sharding.is_equivalent_to(NamedSharding(mesh, P("data", SEQUENCE)), o.ndim)
    assert final.sharding.is_equivalent_to(NamedSharding(mesh, P("data")), final.ndim)


def test_a_length_the_devices_do_not_divide_is_rejected():
    inputs = make_inputs(60)
    with pytest.raises(ValueError, match="q: T = 60 is not divisible by the 8 devices of mesh"):
        sequence_parallel_gla(
            inputs["q"], inputs["k"], inputs["v"], inputs["gk"], mesh=sequence_mesh()
        )


def test_a_batch_the_data_devices_do_not_divide_is_replicated_over_them():
    inputs = {name: x[:1] for name, x in make_inputs(64).items()}
    args = inputs["q"], inputs["k"], inputs["v"], inputs["beta"]
    o, final = sequence_parallel_delta_rule(*args, mesh=data_sequence_mesh())
    assert o.sharding.is_equivalent_to(NamedSharding(data_sequence_mesh(), P(None, SEQUENCE)), 4)
    assert_close((o, final), delta_ops.delta_rule(*args), "B = 1 on data x sequence = 2 x 4: ")


def test_inputs_of_the_wrong_shape_are_rejected_by_the_op_checks():
    inputs = make_inputs(64)
    with pytest.raises(ValueError, match=r"g: expected shape \[B, T, H\] = \[2, 64, 2\]"):
        sequence_parallel_simple_gla(
            inputs["q"], inputs["k"], inputs["v"], inputs["gk"], mesh=sequence_mesh()
        )
