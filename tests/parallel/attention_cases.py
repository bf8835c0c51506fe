"""Sequence-parallel softmax attention (`seqjax.parallel.attention`) on 8 devices (run by
`test_sequence_parallel.py`): Ulysses and ring, with and without zig-zag, equal the
single-device `softmax_attention` in values, gradients and final cache."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from seqjax.ops.attention import softmax_attention
from seqjax.parallel import attention
from seqjax.parallel.attention import sequence_parallel_attention, zigzag_order, zigzag_restore
from seqjax.parallel.mesh import SEQUENCE

BATCH, LENGTH, DIM = 2, 64, 8
TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}


def sequence_mesh():
    return Mesh(np.asarray(jax.devices()).reshape(8), (SEQUENCE,))


def data_sequence_mesh():
    return Mesh(np.asarray(jax.devices()).reshape(2, 4), ("data", SEQUENCE))


def packed_segments():
    """Row 0: a segment inside shard 0, one starting exactly at shard boundary 16, one crossing
    shards 3|4, and an id that comes back (a new segment). Row 1: one segment."""
    row = np.repeat([0, 1, 2, 1, 3], [5, 11, 14, 20, 14])
    return jnp.asarray(np.stack([row, np.zeros(LENGTH, int)]), jnp.int32)


def inputs(heads, kv_heads, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], (BATCH, LENGTH, heads, DIM))
    k = jax.random.normal(keys[1], (BATCH, LENGTH, kv_heads, DIM))
    v = jax.random.normal(keys[2], (BATCH, LENGTH, kv_heads, DIM))
    cotangent = jax.random.normal(keys[3], (BATCH, LENGTH, heads, DIM))
    return (q, k, v), cotangent


@functools.partial(jax.jit, static_argnums=0)
def output_and_gradients(attention, arrays, cotangent):
    (o, cache), pullback = jax.vjp(attention, *arrays)
    return o, cache, pullback((cotangent, jax.tree.map(jnp.zeros_like, cache)))


def assert_matches_single_device(
    mesh, method, *, zigzag=False, heads=2, kv_heads=2, segments=False, impl="auto", **options
):
    """Values, gradients w.r.t. q, k, v, and the final cache, against `impl="reference"`
    (`impl`: the one Ulysses runs)."""
    arrays, cotangent = inputs(heads, kv_heads)
    ids = packed_segments() if segments else None
    axis_size = mesh.shape[SEQUENCE]

    def reference(q, k, v):
        return softmax_attention(q, k, v, segment_ids=ids, impl="reference", **options)

    def parallel(q, k, v):
        order = functools.partial(zigzag_order, axis_size=axis_size) if zigzag else lambda x: x
        o, cache = sequence_parallel_attention(
            *map(order, (q, k, v)),
            mesh=mesh,
            method=method,
            zigzag=zigzag,
            segment_ids=None if ids is None else order(ids),
            impl=impl,
            **options,
        )
        return (zigzag_restore(o, axis_size) if zigzag else o), cache

    expected = output_and_gradients(reference, arrays, cotangent)
    actual = output_and_gradients(parallel, arrays, cotangent)
    jax.tree.map(functools.partial(np.testing.assert_allclose, **TOLERANCE), actual, expected)


# ----------------------------------------------------------------------------- default subset


def test_ulysses_equals_single_device_with_packed_segments_and_grouped_heads():
    assert_matches_single_device(
        sequence_mesh(), "ulysses", heads=16, kv_heads=8, segments=True, impl="xla"
    )


def test_zigzag_ring_equals_single_device_with_packed_segments_and_grouped_heads():
    assert_matches_single_device(
        sequence_mesh(), "ring", zigzag=True, heads=4, kv_heads=2, segments=True
    )


def test_ring_over_key_tiles_smaller_than_a_shard_equals_single_device(monkeypatch):
    # 16-token shards in tiles of 4 keys: the online-softmax merge across tiles, forward and
    # backward.
    monkeypatch.setattr(attention, "KEY_TILE", 4)
    assert_matches_single_device(
        data_sequence_mesh(), "ring", heads=4, kv_heads=2, segments=True, window=21
    )


def test_zigzag_restore_inverts_zigzag_order_and_balances_shards():
    x = jnp.arange(32)[None]
    ordered = zigzag_order(x, 4)
    # Shard p of 4 holds chunks p and 7 - p (4 tokens each).
    np.testing.assert_array_equal(ordered[0, 4:8], [28, 29, 30, 31])
    np.testing.assert_array_equal(ordered[0, 8:12], [4, 5, 6, 7])
    np.testing.assert_array_equal(zigzag_restore(ordered, 4), x)


def test_heads_not_divisible_by_the_axis_fail_for_ulysses():
    q = jnp.zeros((BATCH, LENGTH, 6, DIM))
    kv = jnp.zeros((BATCH, LENGTH, 2, DIM))
    with pytest.raises(ValueError, match="q: 6 heads are not divisible by the 8 devices"):
        sequence_parallel_attention(q, kv, kv, mesh=sequence_mesh(), method="ulysses")
    q = jnp.zeros((BATCH, LENGTH, 16, DIM))
    with pytest.raises(ValueError, match="k, v: 2 heads are not divisible by the 8 devices"):
        sequence_parallel_attention(q, kv, kv, mesh=sequence_mesh(), method="ulysses")


def test_length_not_divisible_by_the_axis_fails():
    x = jnp.zeros((BATCH, 100, 2, DIM))
    message = "q: T = 100 is not divisible by the 8 devices of mesh axis 'sequence'"
    with pytest.raises(ValueError, match=message):
        sequence_parallel_attention(x, x, x, mesh=sequence_mesh(), method="ring")
    x = jnp.zeros((BATCH, 72, 2, DIM))
    with pytest.raises(ValueError, match="q: T = 72 is not divisible by the 2 x 8 = 16 zig-zag"):
        sequence_parallel_attention(x, x, x, mesh=sequence_mesh(), method="ring", zigzag=True)


def test_the_ops_own_checks_apply():
    x = jnp.zeros((BATCH, LENGTH, 2, DIM))
    with pytest.raises(ValueError, match="window: a sliding window needs causal=True"):
        sequence_parallel_attention(x, x, x, mesh=sequence_mesh(), causal=False, window=4)
    with pytest.raises(ValueError, match="method: expected one of"):
        sequence_parallel_attention(x, x, x, mesh=sequence_mesh(), method="tree")


# ----------------------------------------------------------------------------- full matrix

CASES = {
    "causal": {},
    "non-causal": {"causal": False},
    "window-9": {"window": 9},  # exactly one shard back: 2 ring steps
    "window-11": {"window": 11},  # crosses into a third shard: 3 ring steps
    "segments": {"segments": True},
    "window-and-segments": {"window": 11, "segments": True},
    "grouped-heads": {"heads": 16, "kv_heads": 8},
    "multi-query": {"heads": 8, "kv_heads": 1},
    "scale": {"scale": 0.3},
}
ULYSSES_OK = {name: case for name, case in CASES.items() if name != "multi-query"}
FOR_ULYSSES = {"heads": 8, "kv_heads": 8}


@pytest.mark.slow
@pytest.mark.parametrize("zigzag", [False, True])
@pytest.mark.parametrize("case", CASES)
def test_ring_equals_single_device(case, zigzag):
    assert_matches_single_device(sequence_mesh(), "ring", zigzag=zigzag, **CASES[case])


@pytest.mark.slow
@pytest.mark.parametrize("zigzag", [False, True])
@pytest.mark.parametrize("case", ULYSSES_OK)
def test_ulysses_equals_single_device(case, zigzag):
    options = {**FOR_ULYSSES, **ULYSSES_OK[case]}
    assert_matches_single_device(sequence_mesh(), "ulysses", zigzag=zigzag, **options)


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["reference", "blockwise"])
def test_ulysses_runs_any_single_device_impl(impl):
    assert_matches_single_device(
        sequence_mesh(), "ulysses", segments=True, window=11, impl=impl, **FOR_ULYSSES
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "zigzag"), [("ring", False), ("ring", True), ("ulysses", False)]
)
def test_data_and_sequence_mesh_equals_single_device(method, zigzag):
    assert_matches_single_device(
        data_sequence_mesh(), method, zigzag=zigzag, heads=8, kv_heads=4, segments=True
    )
