"""The shared layers against direct NumPy forms of their definitions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from contract import assert_trees_close

from seqjax.nn.conv import ShortConvolution
from seqjax.nn.layers import (
    GatedRMSNorm,
    LowRankProjection,
    RMSNorm,
    SwiGLU,
    l2_normalize,
    rotary,
)
from seqjax.nn.mixer import default_positions
from seqjax.ops.short_conv import init_conv_cache


def normal(seed, *shape):
    return jax.random.normal(jax.random.key(seed), shape)


def test_rms_norm_per_group_and_gated_norms():
    x, z = normal(0, 2, 5, 12), normal(1, 2, 5, 12)
    xn = np.asarray(x, np.float64).reshape(2, 5, 3, 4)
    grouped = (xn / np.sqrt((xn**2).mean(-1, keepdims=True) + 1e-6)).reshape(2, 5, 12)
    norm = RMSNorm(group_size=4)
    params = norm.init(jax.random.key(0), x)
    assert_trees_close(norm.apply(params, x), jnp.asarray(grouped), 1e-6, "grouped RMSNorm")
    silu = np.asarray(jax.nn.silu(z), np.float64)
    full = np.asarray(x, np.float64)
    full = full / np.sqrt((full**2).mean(-1, keepdims=True) + 1e-6)
    before = GatedRMSNorm(norm_before_gate=True)
    after = GatedRMSNorm(norm_before_gate=False)
    p = before.init(jax.random.key(0), x, z)
    assert_trees_close(before.apply(p, x, z), jnp.asarray(full * silu), 1e-6, "norm, then gate")
    gated = np.asarray(x, np.float64) * silu
    expected = gated / np.sqrt((gated**2).mean(-1, keepdims=True) + 1e-6)
    assert_trees_close(after.apply(p, x, z), jnp.asarray(expected), 1e-6, "gate, then norm")


def test_l2_normalize():
    x = normal(2, 3, 7)
    norms = jnp.linalg.norm(l2_normalize(x), axis=-1)
    assert_trees_close(norms, jnp.ones(3), 1e-5, "unit norm")


def test_rotary_matches_complex_rotation_and_is_relative():
    x = normal(3, 1, 6, 2, 8)
    positions = jnp.arange(6)[None] * 3
    out = np.asarray(rotary(x, positions, base=100.0), np.float64)
    xn = np.asarray(x, np.float64)
    pairs = xn[..., :4] + 1j * xn[..., 4:]
    angle = np.asarray(positions)[..., None, None] * 100.0 ** (-np.arange(4) * 2 / 8)
    rotated = pairs * np.exp(1j * angle)
    expected = np.concatenate([rotated.real, rotated.imag], axis=-1)
    assert_trees_close(jnp.asarray(out), jnp.asarray(expected), 1e-5, "rotary")
    q, k = normal(4, 1, 1, 1, 8), normal(5, 1, 1, 1, 8)

    def score(m, n):
        return float(jnp.sum(rotary(q, jnp.full((1, 1), m)) * rotary(k, jnp.full((1, 1), n))))

    assert abs(score(7, 3) - score(14, 10)) < 1e-4
    partial = rotary(x, positions, fraction=0.5)
    assert_trees_close(partial[..., 4:], x[..., 4:], 1e-7, "channels past the fraction")


def test_swiglu_and_low_rank_projection():
    x = normal(6, 2, 3, 8)
    mlp = SwiGLU(hidden=16)
    p = mlp.init(jax.random.key(0), x)["params"]
    gate, up, down = (np.asarray(p[n]["kernel"].value, np.float64) for n in ("gate", "up", "down"))
    xn = np.asarray(x, np.float64)
    h = xn @ gate
    expected = ((h / (1 + np.exp(-h))) * (xn @ up)) @ down
    assert_trees_close(mlp.apply({"params": p}, x), jnp.asarray(expected), 1e-5, "SwiGLU")
    low = LowRankProjection((2, 4), rank=3, axes=("embed", "heads", "kv"))
    params = low.init(jax.random.key(0), x)
    assert low.apply(params, x).shape == (2, 3, 2, 4)
    assert params["params"]["down"]["kernel"].value.shape == (8, 3)


def direct_conv(x, kernel, segment_ids):
    """y_t = silu(sum_j kernel[W-1-j] x_{t-j}) over the same segment, in float64."""
    x, kernel = np.asarray(x, np.float64), np.asarray(kernel, np.float64)
    width = kernel.shape[0]
    y = np.zeros_like(x)
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            for j in range(width):
                if t - j >= 0 and segment_ids[b, t - j] == segment_ids[b, t]:
                    y[b, t] += kernel[width - 1 - j] * x[b, t - j]
    return y / (1 + np.exp(-y))


def test_short_convolution_segments_and_cache():
    x = normal(7, 2, 11, 6)
    segment_ids = np.asarray([[0] * 4 + [1] * 7, [5] * 11])
    conv = ShortConvolution(width=4)
    params = conv.init(jax.random.key(0), x)
    kernel = params["params"]["kernel"].value
    assert float(jnp.abs(kernel).max()) <= 0.5
    y, _ = conv.apply(params, x, segment_ids=jnp.asarray(segment_ids))
    assert_trees_close(y, jnp.asarray(direct_conv(x, kernel, segment_ids)), 1e-5, "conv")
    # Continuing from the cache of the first 6 tokens equals one call.
    whole, _ = conv.apply(params, x)
    first, cache = conv.apply(params, x[:, :6], cache=init_conv_cache(2, 4, 6))
    rest = [first]
    for t in range(6, 11):
        y_t, cache = conv.apply(params, x[:, t : t + 1], cache=cache)
        rest.append(y_t)
    assert_trees_close(jnp.concatenate(rest, axis=1), whole, 1e-5, "cached continuation")


def test_conv_cache_keeps_only_the_last_segment():
    x = normal(8, 1, 5, 2)
    conv = ShortConvolution(width=4)
    params = conv.init(jax.random.key(0), x)
    _, cache = conv.apply(params, x, segment_ids=jnp.asarray([[0, 0, 0, 1, 1]]))
    np.testing.assert_array_equal(np.asarray(cache[0, 0]), 0.0)
    np.testing.assert_allclose(np.asarray(cache[0, 1:]), np.asarray(x[0, 3:]))


def test_default_positions_restart_per_segment_and_follow_the_cache():
    segment_ids = jnp.asarray([[0, 0, 1, 1, 1], [2, 2, 2, 2, 2]])
    positions = default_positions(2, 5, segment_ids, jnp.asarray([10, 3]))
    np.testing.assert_array_equal(positions, [[10, 11, 0, 1, 2], [3, 4, 5, 6, 7]])


def test_unknown_activation_is_rejected():
    with pytest.raises(ValueError, match="activation"):
        ShortConvolution(activation="gelu").init(jax.random.key(0), jnp.zeros((1, 3, 2)))
