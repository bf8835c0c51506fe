"""The shard-summary prefix of `seqjax.parallel.sequence` on 8 devices (run by
`test_sequence_parallel.py`)."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from seqjax.parallel.mesh import SEQUENCE
from seqjax.parallel.sequence import boundary_flags, incoming_state


def mesh():
    return Mesh(np.asarray(jax.devices()).reshape(8), (SEQUENCE,))


def test_incoming_states_are_the_sequential_fold_of_the_earlier_shards():
    rng = np.random.default_rng(0)
    a = rng.uniform(0.5, 1.0, (8, 3)).astype(np.float32)  # one diagonal transition per shard
    m = rng.standard_normal((8, 3)).astype(np.float32)
    h0 = rng.standard_normal(3).astype(np.float32)

    def per_shard(a, m):
        entering, final = incoming_state(a[0], m[0], h0, apply=jnp.multiply, axis_name=SEQUENCE)
        return entering[None], final[None]

    entering, final = jax.shard_map(
        per_shard, mesh=mesh(), in_specs=(P(SEQUENCE), P(SEQUENCE)), out_specs=P(SEQUENCE)
    )(a, m)
    h = h0
    for p in range(8):
        np.testing.assert_allclose(entering[p], h, rtol=1e-6)
        h = a[p] * h + m[p]
    np.testing.assert_allclose(final[0], h, rtol=1e-6)


def test_boundary_flags_see_segments_that_cross_and_start_at_shards():
    # 8 shards of 2 tokens: a segment crosses 0|1, one starts at shard 2's first token, one
    # starts inside shard 5.
    ids = np.asarray([[0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2]])

    def per_shard(ids):
        continues, closed = boundary_flags(ids, SEQUENCE)
        return continues[None], closed[None]

    continues, closed = jax.shard_map(
        per_shard, mesh=mesh(), in_specs=P(None, SEQUENCE), out_specs=P(SEQUENCE)
    )(ids)
    np.testing.assert_array_equal(continues[:, 0], [1, 1, 0, 1, 1, 1, 1, 1])
    np.testing.assert_array_equal(closed[:, 0], [0, 0, 0, 0, 0, 1, 0, 0])
