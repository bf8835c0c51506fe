"""Sequence-parallel diagonal scans and short convolution on 8 devices (run by
`test_sequence_parallel.py`): values and gradients equal the single-device ops."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from seqjax.ops.hgrn import hgrn
from seqjax.ops.lru import lru
from seqjax.ops.rg_lru import rg_lru
from seqjax.ops.selective_scan import selective_scan
from seqjax.ops.short_conv import causal_conv
from seqjax.parallel.conv import sequence_parallel_causal_conv
from seqjax.parallel.mesh import SEQUENCE
from seqjax.parallel.scans import (
    sequence_parallel_hgrn,
    sequence_parallel_linear_recurrence,
    sequence_parallel_lru,
    sequence_parallel_rg_lru,
    sequence_parallel_selective_scan,
)
from seqjax.scan import linear_recurrence

TOLERANCE = dict(rtol=1e-5, atol=1e-5)


def sequence_mesh():
    return Mesh(np.asarray(jax.devices()).reshape(8), (SEQUENCE,))


def data_sequence_mesh():
    return Mesh(np.asarray(jax.devices()).reshape(2, 4), ("data", SEQUENCE))


MESHES = {"sequence8": sequence_mesh, "data2_sequence4": data_sequence_mesh}


def packed_segments(length):
    """Row 0: segments start at a shard boundary (8), inside shards (13, 22), one crosses
    shards 2..4, and one starts at shard 5 (40) when the shards hold 8 tokens; row 1: an id
    that comes back after another is a new segment crossing to the end."""
    starts = [s * length // 64 for s in (8, 13, 22, 40)]
    row0 = np.searchsorted(starts, np.arange(length), side="right")
    row1 = np.where(
        (np.arange(length) >= 20 * length // 64) & (np.arange(length) < 23 * length // 64), 1, 0
    )
    return np.stack([row0, row1]).astype(np.int32)


def normal(seed, shape, dtype=np.float32):
    """Standard normal numpy values (made on the host: no compilation per input)."""
    rng = np.random.default_rng(seed)
    values = rng.standard_normal(shape)
    if np.issubdtype(dtype, np.complexfloating):
        values = values + 1j * rng.standard_normal(shape)
    return values.astype(dtype)


def assert_same_values_and_gradients(sharded, single, args):
    """`sharded(*args)` and `single(*args)`, each `(output, final)`, agree, and so do the
    gradients of a random projection of both outputs w.r.t. every float argument."""
    args = [None if a is None else jnp.asarray(a) for a in args]
    float_args = [
        i for i, a in enumerate(args) if a is not None and np.issubdtype(a.dtype, np.inexact)
    ]

    def loss(fn, *floats):
        full = list(args)
        for i, value in zip(float_args, floats, strict=True):
            full[i] = value
        out, final = fn(*full)
        weights = [normal(10 + i, x.shape) for i, x in enumerate((out, final))]
        return sum(jnp.sum(jnp.real(x) * w) for x, w in zip((out, final), weights, strict=True))

    def values_and_gradients(fn):
        grad = jax.grad(functools.partial(loss, fn), argnums=tuple(range(len(float_args))))
        return jax.jit(lambda *f: (fn(*args), grad(*f)))(*(args[i] for i in float_args))

    got, expected = values_and_gradients(sharded), values_and_gradients(single)
    for got_leaf, expected_leaf in zip(
        jax.tree.leaves(got), jax.tree.leaves(expected), strict=True
    ):
        np.testing.assert_allclose(got_leaf, expected_leaf, **TOLERANCE)


def check_linear_recurrence(
    mesh, length, segments, initial, dtype=np.float32, impl="auto", reverse=False
):
    a = np.random.default_rng(0).uniform(-1.0, 1.0, (2, length, 3))
    if np.issubdtype(dtype, np.complexfloating):
        a = a * np.exp(1j * np.random.default_rng(2).uniform(0, 2 * np.pi, a.shape))
    a = a.astype(dtype)
    b = normal(1, (2, length, 3), dtype)
    h0 = normal(3, (2, 3), dtype) if initial else None
    ids = packed_segments(length) if segments else None

    options = dict(segment_ids=ids, impl=impl, reverse=reverse)

    def single(a, b, h0):
        return linear_recurrence(a, b, h0, **options)

    def sharded(a, b, h0):
        return sequence_parallel_linear_recurrence(a, b, h0, mesh=mesh, **options)

    assert_same_values_and_gradients(sharded, single, (a, b, h0))


def check_hgrn(mesh, length, segments, initial):
    x = normal(0, (2, length, 8))
    g = -np.log1p(np.exp(-normal(1, (2, length, 8)) - 2.0))  # log sigmoid(. + 2)
    h0 = normal(2, (2, 8)) if initial else None
    ids = packed_segments(length) if segments else None

    def sharded(x, g, h0):
        return sequence_parallel_hgrn(x, g, h0, segment_ids=ids, mesh=mesh)

    assert_same_values_and_gradients(sharded, functools.partial(hgrn, segment_ids=ids), (x, g, h0))


def check_rg_lru(mesh, length, segments, initial):
    x, gate_x, gate_a = (normal(i, (2, length, 8)) for i in range(3))
    a_param = normal(3, (8,))
    h0 = normal(4, (2, 8)) if initial else None
    ids = packed_segments(length) if segments else None

    def sharded(*args):
        return sequence_parallel_rg_lru(*args, segment_ids=ids, mesh=mesh)

    single = functools.partial(rg_lru, segment_ids=ids)
    assert_same_values_and_gradients(sharded, single, (x, gate_x, gate_a, a_param, h0))


def check_lru(mesh, length, segments, initial):
    n, h = 4, 3
    x = normal(0, (2, length, h))
    nu_log, theta_log = normal(1, (n,)) - 1.0, normal(2, (n,)) - 1.0
    B = normal(3, (n, h), np.complex64)
    C = normal(4, (h, n), np.complex64)
    D = normal(5, (h,))
    h0 = normal(6, (2, n), np.complex64) if initial else None
    ids = packed_segments(length) if segments else None

    def sharded(*args):
        return sequence_parallel_lru(*args, segment_ids=ids, mesh=mesh)

    single = functools.partial(lru, segment_ids=ids)
    assert_same_values_and_gradients(sharded, single, (x, nu_log, theta_log, B, C, D, None, h0))


def check_selective_scan(mesh, length, segments, initial, allow_neg_eigval=False, groups=None):
    d, n = 4, 3
    x, dt, z = (normal(i, (2, length, d)) for i in range(3))
    A = -np.exp(normal(3, (d, n)))
    projection = (2, length, n) if groups is None else (2, length, groups, n)
    B, C = normal(4, projection), normal(5, projection)
    D, dt_bias = normal(6, (d,)), normal(7, (d,))
    h0 = normal(8, (2, d, n)) if initial else None
    ids = packed_segments(length) if segments else None
    options = dict(segment_ids=ids, allow_neg_eigval=allow_neg_eigval)

    def sharded(*args):
        return sequence_parallel_selective_scan(*args, **options, mesh=mesh)

    single = functools.partial(selective_scan, **options)
    assert_same_values_and_gradients(sharded, single, (x, dt, A, B, C, D, z, dt_bias, h0))


def check_causal_conv(mesh, length, segments, initial, width=4, bias=True):
    x = normal(0, (2, length, 8))
    kernel = normal(1, (width, 8))
    b = normal(2, (8,)) if bias else None
    cache = normal(3, (2, width - 1, 8)) if initial else np.zeros((2, width - 1, 8), np.float32)
    ids = packed_segments(length) if segments else None

    def sharded(x, kernel, b, cache):
        return sequence_parallel_causal_conv(x, kernel, b, cache, ids, mesh=mesh)

    def single(x, kernel, b, cache):
        return causal_conv(x, kernel, b, cache, ids)

    assert_same_values_and_gradients(sharded, single, (x, kernel, b, cache))


CHECKS = {
    "linear_recurrence": check_linear_recurrence,
    "hgrn": check_hgrn,
    "rg_lru": check_rg_lru,
    "lru": check_lru,
    "selective_scan": check_selective_scan,
    "causal_conv": check_causal_conv,
}


@pytest.mark.parametrize("op", list(CHECKS))
def test_matches_the_single_device_op_with_segments_and_initial_state(op):
    CHECKS[op](sequence_mesh(), 64, segments=True, initial=True)


@pytest.mark.slow
@pytest.mark.parametrize("op", list(CHECKS))
@pytest.mark.parametrize("mesh", list(MESHES))
@pytest.mark.parametrize("segments", [False, True])
@pytest.mark.parametrize("initial", [False, True])
def test_matches_the_single_device_op_on_every_mesh(op, mesh, segments, initial):
    CHECKS[op](MESHES[mesh](), 64, segments=segments, initial=initial)


@pytest.mark.slow
@pytest.mark.parametrize("op", list(CHECKS))
def test_matches_with_odd_tokens_per_shard(op):
    CHECKS[op](sequence_mesh(), 8 * 5, segments=True, initial=True)


@pytest.mark.slow
@pytest.mark.parametrize(
    "impl",
    ["sequential", "associative", "chunked"],
)
def test_linear_recurrence_complex_with_every_scan_algorithm(impl):
    check_linear_recurrence(
        data_sequence_mesh(), 64, segments=True, initial=True, dtype=np.complex64, impl=impl
    )


@pytest.mark.slow
@pytest.mark.parametrize("groups", [None, 2])
def test_selective_scan_with_negative_eigenvalues_and_groups(groups):
    check_selective_scan(
        sequence_mesh(), 64, segments=True, initial=True, allow_neg_eigval=True, groups=groups
    )


@pytest.mark.slow
@pytest.mark.parametrize("width", [1, 2, 9])
def test_causal_conv_kernel_widths(width):
    check_causal_conv(sequence_mesh(), 64, segments=True, initial=True, width=width, bias=False)


@pytest.mark.slow
def test_causal_conv_halo_spans_a_whole_shard():
    # 8 tokens per shard, width 9: the halo is the previous shard entire.
    check_causal_conv(data_sequence_mesh(), 32, segments=True, initial=True, width=9)


def test_sequence_length_not_divisible_by_the_axis_is_rejected():
    x = np.zeros((2, 100, 8), np.float32)
    with pytest.raises(ValueError, match="x: T = 100 is not divisible by the 8 devices"):
        sequence_parallel_hgrn(x, x, mesh=sequence_mesh())
    with pytest.raises(ValueError, match="x: T = 100 is not divisible by the 8 devices"):
        sequence_parallel_causal_conv(x, np.zeros((4, 8), np.float32), mesh=sequence_mesh())


def test_shards_shorter_than_the_conv_halo_are_rejected():
    x = np.zeros((2, 16, 8), np.float32)
    with pytest.raises(ValueError, match=r"x: each of the 8 shards .* holds 2 tokens"):
        sequence_parallel_causal_conv(x, np.zeros((4, 8), np.float32), mesh=sequence_mesh())


@pytest.mark.parametrize("mesh", MESHES.values(), ids=MESHES)
def test_a_reversed_scan_folds_the_shards_from_the_last(mesh):
    check_linear_recurrence(mesh(), 64, segments=True, initial=True, reverse=True)
