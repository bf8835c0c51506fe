import jax
import jax.numpy as jnp
import pytest
from contract import OpContract, OpSpec

from seqjax.ops.rg_lru import rg_lru, rg_lru_step

D = 6


def make_inputs(key, batch, length, dtype):
    kx, ki, ka, kp = jax.random.split(key, 4)
    return {
        "x": jax.random.normal(kx, (batch, length, D)).astype(dtype),
        "gate_x": jax.random.normal(ki, (batch, length, D)).astype(dtype),
        "gate_a": jax.random.normal(ka, (batch, length, D)).astype(dtype),
        "a_param": jax.random.uniform(kp, (D,), minval=-3.0, maxval=1.0).astype(dtype),
    }


def apply(i, state, ids, impl):
    return rg_lru(
        i["x"],
        i["gate_x"],
        i["gate_a"],
        i["a_param"],
        state,
        segment_ids=ids,
        impl=impl,
        chunk_size=16,
    )


def step(i, state):
    return rg_lru_step(i["x"], i["gate_x"], i["gate_a"], i["a_param"], state)


class TestRGLRU(OpContract):
    spec = OpSpec(
        make_inputs=make_inputs,
        apply=apply,
        make_state=lambda key, batch: jax.random.normal(key, (batch, D)),
        step=step,
        time_inputs=frozenset({"x", "gate_x", "gate_a"}),
        impls=("sequential", "chunked"),
        chunk_size=16,
    )


class TestRGLRUFromNoState(OpContract):
    """Without an initial state, position 0 opens a segment (multiplier 1)."""

    spec = OpSpec(
        make_inputs=make_inputs,
        apply=apply,
        make_state=lambda key, batch: None,
        step=step,
        time_inputs=frozenset({"x", "gate_x", "gate_a"}),
        impls=("chunked",),
        chunk_size=16,
    )


def test_first_token_without_state_is_not_normalized():
    inputs = make_inputs(jax.random.key(0), 1, 3, jnp.float32)
    h, _ = rg_lru(inputs["x"], inputs["gate_x"], inputs["gate_a"], inputs["a_param"])
    expected = jax.nn.sigmoid(inputs["gate_x"][:, 0]) * inputs["x"][:, 0]
    assert jnp.allclose(h[:, 0], expected, rtol=1e-6)


def test_zero_state_continues_instead_of_restarting():
    inputs = make_inputs(jax.random.key(0), 1, 3, jnp.float32)
    args = (inputs["x"], inputs["gate_x"], inputs["gate_a"], inputs["a_param"])
    fresh, _ = rg_lru(*args)
    continued, _ = rg_lru(*args, jnp.zeros((1, D)))
    assert not jnp.allclose(fresh[:, 0], continued[:, 0])


def test_gradient_is_finite_when_decay_saturates():
    inputs = make_inputs(jax.random.key(0), 1, 5, jnp.bfloat16)
    a_param = jnp.full((D,), -30.0, jnp.bfloat16)  # softplus -> 0, so a -> 1

    def loss(a_param):
        h, _ = rg_lru(inputs["x"], inputs["gate_x"], inputs["gate_a"], a_param)
        return jnp.sum(h.astype(jnp.float32))

    assert jnp.all(jnp.isfinite(jax.grad(loss)(a_param)))


def test_rejects_wrong_a_param_shape():
    x = jnp.zeros((2, 5, 4))
    with pytest.raises(ValueError, match=r"a_param: expected shape \[D\] = \[4\]"):
        rg_lru(x, x, x, jnp.zeros((3,)))
