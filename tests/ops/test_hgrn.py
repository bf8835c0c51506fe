import jax
import jax.numpy as jnp
import pytest
from contract import OpContract, OpSpec
from jax.experimental import checkify

from seqjax import checks
from seqjax.ops.hgrn import hgrn, hgrn_step

D = 6


def make_inputs(key, batch, length, dtype):
    kx, kg = jax.random.split(key)
    x = jax.random.normal(kx, (batch, length, D)).astype(dtype)
    g = jax.nn.log_sigmoid(2.0 + jax.random.normal(kg, (batch, length, D))).astype(dtype)
    return {"x": x, "g": g}


SPEC = OpSpec(
    make_inputs=make_inputs,
    apply=lambda i, s, ids, impl: hgrn(
        i["x"], i["g"], s, segment_ids=ids, impl=impl, chunk_size=16
    ),
    make_state=lambda key, batch: jax.random.normal(key, (batch, D)),
    step=lambda i, s: hgrn_step(i["x"], i["g"], s),
    time_inputs=frozenset({"x", "g"}),
    impls=("sequential", "chunked"),
    chunk_size=16,
)


class TestHGRN(OpContract):
    spec = SPEC


def test_rejects_mismatched_gate_shape():
    x = jnp.zeros((2, 5, 4))
    with pytest.raises(ValueError, match=r"g: expected shape \[B, T, D\] = \[2, 5, 4\]"):
        hgrn(x, jnp.zeros((2, 5, 3)))


def test_rejects_positive_log_gate_when_concrete():
    x = jnp.zeros((1, 3, 2))
    with pytest.raises(ValueError, match="g: expected log forget gates g <= 0"):
        hgrn(x, jnp.ones((1, 3, 2)))


def test_rejects_float_segment_ids():
    x = jnp.zeros((1, 3, 2))
    with pytest.raises(TypeError, match="segment_ids: expected an integer array"):
        hgrn(x, x, segment_ids=jnp.zeros((1, 3)))


def test_positive_log_gate_under_jit_is_caught_by_opt_in_checkify():
    x = jnp.zeros((1, 3, 2))

    def run(g):
        return hgrn(x, g)[0]

    with checks.checkify_values():
        error, _ = checkify.checkify(jax.jit(run))(jnp.ones((1, 3, 2)))
    with pytest.raises(checkify.JaxRuntimeError, match="g: expected log forget gates g <= 0"):
        error.throw()
    # The opt-in is read at trace time, so a fresh function is traced without it.
    error, _ = checkify.checkify(jax.jit(lambda g: hgrn(x, g)[0]))(jnp.ones((1, 3, 2)))
    assert error.get() is None
