"""The mixers under a mesh with a `sequence` axis, on 8 devices (run by
`test_sequence_parallel.py`): traced under `jax.set_mesh`, a mixer calls the sequence-parallel
forms of its ops (`seqjax.parallel.dispatch`), and its output and the gradients w.r.t. its
parameters and its input equal the call without a mesh, with packed segments."""

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from seqjax.models import MIXERS
from seqjax.parallel import make_mesh

B, T, D = 2, 64, 32
RTOL = 2e-5

# name: the mixer's options (small heads and states; a short convolution where it has one).
SEQUENCE_PARALLEL_MIXERS = {
    "gated_delta_net": pytest.param({"num_heads": 2, "head_dim": 8}),
    "attention": pytest.param({"num_heads": 4, "use_short_conv": True}),
    "attention_ring": pytest.param(
        {"num_heads": 2, "num_kv_heads": 1, "sequence_method": "ring"}, marks=pytest.mark.slow
    ),
    "attention_window": pytest.param({"num_heads": 4, "window": 12}, marks=pytest.mark.slow),
    "mamba": pytest.param({"state_size": 4, "chunk_size": 8}, marks=pytest.mark.slow),
    "gla": pytest.param({"num_heads": 2, "use_short_conv": True}, marks=pytest.mark.slow),
    "delta_net": pytest.param({"num_heads": 2}, marks=pytest.mark.slow),
    "mamba2": pytest.param(
        {"state_size": 8, "head_dim": 16, "chunk_size": 8}, marks=pytest.mark.slow
    ),
    "retnet": pytest.param({"num_heads": 2}, marks=pytest.mark.slow),
    "transnormer": pytest.param({"num_heads": 2}, marks=pytest.mark.slow),
    "hgrn": pytest.param({"use_short_conv": True}, marks=pytest.mark.slow),
    "hgrn2": pytest.param({"expand_ratio": 8}, marks=pytest.mark.slow),
    "lightnet": pytest.param({"expand_ratio": 8, "gate_low_rank": 8}, marks=pytest.mark.slow),
    "rg_lru": pytest.param({"num_heads": 2}, marks=pytest.mark.slow),
    "lru": pytest.param({"state_size": 8}, marks=pytest.mark.slow),
    "diagonal_lrnn": pytest.param({}, marks=pytest.mark.slow),
    "based": pytest.param({"num_heads": 2, "feature_dim": 4}, marks=pytest.mark.slow),
}


def packed_segments() -> np.ndarray:
    """Row 0: a segment starts at shard 1's first token (16), one inside shard 1 and crosses
    into shard 3; row 1: one starts inside shard 2."""
    ids = np.zeros((B, T), np.int32)
    ids[0, 16:] = 1
    ids[0, 21:] = 2
    ids[1, 37:] = 1
    return ids


def build(name: str, options: dict):
    kind = name.split("_ring")[0].split("_window")[0]
    config_class, module_class = MIXERS[kind]
    return module_class(config_class(width=D, **options))


@pytest.mark.parametrize("options", SEQUENCE_PARALLEL_MIXERS.values(), ids=SEQUENCE_PARALLEL_MIXERS)
def test_a_mixer_under_a_sequence_mesh_gives_the_one_device_result(request, options):
    name = request.node.callspec.id
    mixer = build(name, options)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((B, T, D)).astype(np.float32)
    projection = rng.standard_normal((B, T, D)).astype(np.float32)
    segment_ids = packed_segments()
    params = jax.jit(mixer.init)(jax.random.key(0), x, segment_ids=segment_ids)

    def loss(params, x, segment_ids):
        y, _ = mixer.apply(params, x, segment_ids=segment_ids)
        return (y * projection).sum(), y

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    (_, expected), expected_grads = step(params, x, segment_ids)

    mesh = make_mesh(data=2, sequence=4)
    tokens = NamedSharding(mesh, P(("data", "fsdp"), "sequence"))
    x_sharded, ids_sharded = jax.device_put((x, segment_ids), tokens)
    with jax.set_mesh(mesh):
        lowered = step.lower(params, x_sharded, ids_sharded).as_text()
        (_, y), grads = step(params, x_sharded, ids_sharded)
    # The sequence-parallel forms are `shard_map`s: without one, XLA would have gathered the
    # time axis and the comparison below would hold trivially.
    assert "manual_computation" in lowered or "shard_map" in lowered
    np.testing.assert_allclose(y, expected, rtol=RTOL, atol=RTOL)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(expected_grads), strict=True):
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=RTOL * np.abs(want).max())
