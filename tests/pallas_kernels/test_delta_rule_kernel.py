"""The delta-rule kernels (`pallas_kernels.delta_rule`) against `seqjax.ops.delta_rule`'s
reference, in Pallas interpret mode for both backends, and lowered for TPU and CUDA.

Inputs are what DeltaNet layers feed the op: L2-normalized keys, `beta` in (0, 2) (negative
eigenvalues included), log-decays in (-0.5, 0). The default suite runs one small case per
check and backend (gated, 2.5 chunks of 16 tokens); the full matrix is `slow`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from contract import GRAD_TOLERANCE, TOLERANCE, assert_trees_close, upcast
from exporting import interpret_mode, kernel_calls

from pallas_kernels.delta_rule import chunk, delta_rule, unsupported
from seqjax.ops import delta_rule as ops

BACKENDS = ("tpu", "gpu")
CHUNK = 16  # the tests' chunk (the tables' is 32-64): lengths below are built around it
RAGGED_LENGTHS = (1, 37, 40)  # one token, odd, 2.5 chunks


def _inputs(key, *, batch=2, length=40, heads=2, key_dim=16, value_dim=32, dtype=jnp.float32):
    """`(q, k, v, beta, g, h0)` as a DeltaNet layer makes them (h0 float32)."""
    kq, kk, kv, kb, kg, kh = jax.random.split(key, 6)
    q = jax.random.normal(kq, (batch, length, heads, key_dim))
    k = jax.random.normal(kk, (batch, length, heads, key_dim))
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    v = jax.random.normal(kv, (batch, length, heads, value_dim))
    beta = jax.random.uniform(kb, (batch, length, heads), minval=0.0, maxval=2.0)
    g = jax.random.uniform(kg, (batch, length, heads), minval=-0.5, maxval=0.0)
    h0 = 0.5 * jax.random.normal(kh, (batch, heads, key_dim, value_dim))
    cast = (x.astype(dtype) for x in (q, k, v, beta, g))
    return (*cast, h0)


def _kernel(gated: bool, backend: str, chunk_size: int | None = CHUNK):
    """`(q, k, v, beta, g, h0) -> (o, final)` through the kernels (g ignored if not gated)."""

    def run(q, k, v, beta, g, h0):
        scale = q.shape[-1] ** -0.5
        return delta_rule(
            q,
            k,
            v,
            beta,
            g if gated else None,
            h0,
            scale=scale,
            backend=backend,
            interpret=interpret_mode(backend),
            chunk_size=chunk_size,
        )

    return run


def _reference(gated: bool):
    def run(q, k, v, beta, g, h0):
        if gated:
            return ops.gated_delta_rule(q, k, v, g, beta, initial_state=h0, impl="reference")
        return ops.delta_rule(q, k, v, beta, initial_state=h0, impl="reference")

    return run


def _check_values(backend, gated, length, with_h0, dtype, chunk_size=CHUNK, **shape):
    q, k, v, beta, g, h0 = _inputs(jax.random.PRNGKey(length), length=length, dtype=dtype, **shape)
    h0 = h0 if with_h0 else None
    o, final = jax.jit(_kernel(gated, backend, chunk_size))(q, k, v, beta, g, h0)
    assert o.dtype == v.dtype and final.dtype == jnp.float32
    expected = jax.jit(_reference(gated))(*upcast((q, k, v, beta, g)), h0)
    assert_trees_close((upcast(o), final), expected, TOLERANCE[jnp.dtype(dtype)], "o, final")


def _weighted_loss(fn, cotangents):
    d_o, d_final = cotangents

    def loss(*args):
        o, final = fn(*args)
        return jnp.sum(o.astype(jnp.float32) * d_o) + jnp.sum(final * d_final)

    return loss


def _check_gradients(backend, gated, length, **shape):
    args = _inputs(jax.random.PRNGKey(length), length=length, **shape)
    out_shapes = jax.eval_shape(_reference(gated), *args)
    keys = jax.random.split(jax.random.PRNGKey(7), 2)
    cotangents = tuple(jax.random.normal(c, x.shape) for c, x in zip(keys, out_shapes, strict=True))
    argnums = (0, 1, 2, 3, 4, 5) if gated else (0, 1, 2, 3, 5)
    grads = jax.jit(jax.grad(_weighted_loss(_kernel(gated, backend), cotangents), argnums))(*args)
    expected = jax.jit(jax.grad(_weighted_loss(_reference(gated), cotangents), argnums))(*args)
    assert_trees_close(grads, expected, GRAD_TOLERANCE[jnp.dtype(jnp.float32)], "gradients")


# ----------------------------------------------------------------------------- values


@pytest.mark.parametrize("backend", BACKENDS)
def test_values_match_reference(backend):
    _check_values(backend, gated=True, length=40, with_h0=True, dtype=jnp.float32)


def test_bfloat16_values_match_reference():
    _check_values("gpu", gated=True, length=40, with_h0=True, dtype=jnp.bfloat16)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("with_h0", [True, False], ids=["h0", "no_h0"])
@pytest.mark.parametrize("length", RAGGED_LENGTHS)
@pytest.mark.parametrize("gated", [False, True], ids=["delta_rule", "gated_delta_rule"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_values_match_reference_full(backend, gated, length, with_h0, dtype):
    _check_values(backend, gated, length, with_h0, dtype)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_values_with_table_chunk_and_value_tiles(backend):
    """The block table's chunk, and `V` over one value tile (partial sums over tiles)."""
    _check_values(
        backend, True, 70, True, jnp.float32, chunk_size=None, heads=1, key_dim=8, value_dim=200
    )


# ----------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_match_reference(backend):
    _check_gradients(backend, gated=True, length=40, batch=1)


@pytest.mark.slow
@pytest.mark.parametrize("length", RAGGED_LENGTHS)
@pytest.mark.parametrize("gated", [False, True], ids=["delta_rule", "gated_delta_rule"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_match_reference_full(backend, gated, length):
    _check_gradients(backend, gated, length)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_over_value_tiles(backend):
    """`dq, dk, dbeta, dg` summed over several value tiles."""
    _check_gradients(backend, True, 20, batch=1, heads=1, key_dim=8, value_dim=200)


# ----------------------------------------------------------------------------- inverse


def test_unit_lower_inverse_is_accurate_when_the_power_series_is_not():
    """Aligned keys with beta near 2 make `A = 1.99 * strict_tril(ones)`, whose powers reach
    ~1e18 at C = 64 (a power-series inverse cancels to garbage) while `(I + A)^-1` is bounded:
    the blocked doubling stays exact to float32 rounding."""
    size = 64
    a = 1.99 * jnp.tril(jnp.ones((size, size)), -1)
    exact = np.linalg.inv(np.eye(size) + np.asarray(a, np.float64))
    error = np.max(np.abs(np.asarray(chunk.unit_lower_inverse(a)) - exact)) / np.max(np.abs(exact))
    assert error < TOLERANCE[jnp.dtype(jnp.float32)]


# ----------------------------------------------------------------------------- lowering

# (K, V, dtype): the table's shape classes (head dim up to 64 / 128 / 256), several value
# tiles at V = 256.
SHAPE_CLASSES = [(64, 64, jnp.float32), (128, 128, jnp.bfloat16), (256, 256, jnp.float32)]


def _check_lowering(backend, key_dim, value_dim, dtype):
    shape = dict(batch=1, length=100, heads=2, key_dim=key_dim, value_dim=value_dim, dtype=dtype)
    args = jax.eval_shape(functools.partial(_inputs, **shape), jax.random.PRNGKey(0))
    forward = functools.partial(delta_rule, scale=0.1, backend=backend)

    def loss(*args):
        o, final = forward(*args)
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(final)

    assert kernel_calls(forward, args, backend) >= 1
    assert kernel_calls(jax.grad(loss, argnums=(0, 1, 2, 3, 4, 5)), args, backend) >= 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_lowers_to_kernels(backend):
    _check_lowering(backend, *SHAPE_CLASSES[0])


@pytest.mark.slow
@pytest.mark.parametrize("shape_class", SHAPE_CLASSES[1:], ids=["K128_bf16", "K256_f32"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_lowers_to_kernels_every_shape_class(backend, shape_class):
    _check_lowering(backend, *shape_class)


# ----------------------------------------------------------------------------- unsupported


@pytest.mark.parametrize(
    "change, words",
    [
        (dict(dtype=jnp.float16), "dtype float16"),
        (dict(key_dim=512), "K = 512"),
    ],
    ids=["float16", "key_dim_512"],
)
def test_unsupported_input_is_named(change, words):
    shape = dict(batch=1, length=8, heads=1, key_dim=16, value_dim=16) | change
    args = jax.eval_shape(functools.partial(_inputs, **shape), jax.random.PRNGKey(0))
    for backend in BACKENDS:
        reason = unsupported(*args, backend)
        assert reason is not None and words in reason
        with pytest.raises(ValueError, match=words):
            jax.eval_shape(functools.partial(delta_rule, scale=1.0, backend=backend), *args)


def test_supported_input_has_no_reason():
    args = jax.eval_shape(_inputs, jax.random.PRNGKey(0))
    assert all(unsupported(*args, backend) is None for backend in BACKENDS)


@pytest.mark.parametrize("chunk_size", [12, 4])
def test_bad_chunk_size_is_rejected(chunk_size):
    args = jax.eval_shape(functools.partial(_inputs, length=8), jax.random.PRNGKey(0))
    run = functools.partial(delta_rule, scale=1.0, backend="gpu", chunk_size=chunk_size)
    with pytest.raises(ValueError, match="chunk_size"):
        jax.eval_shape(run, *args)
