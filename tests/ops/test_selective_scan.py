import jax
import jax.numpy as jnp
import numpy as np
import pytest
from contract import OpContract, OpSpec, assert_trees_close, cotangents_like, weighted_sum

from seqjax.ops.selective_scan import selective_scan, selective_scan_step

D = 8  # channels
N = 4  # state size
G = 2  # channel groups of the grouped spec
CHUNK = 16


def make_inputs(key, batch, length, dtype, *, groups=None, skip_and_gate=True):
    keys = jax.random.split(key, 8)
    projection = (batch, length, N) if groups is None else (batch, length, groups, N)
    inputs = {
        "x": jax.random.normal(keys[0], (batch, length, D)),
        "dt": jax.random.normal(keys[1], (batch, length, D)) - 1.0,
        "A": -jnp.exp(0.5 * jax.random.normal(keys[2], (D, N))),
        "B": jax.random.normal(keys[3], projection),
        "C": jax.random.normal(keys[4], projection),
        "dt_bias": 0.5 * jax.random.normal(keys[5], (D,)),
    }
    if skip_and_gate:
        inputs["D"] = jax.random.normal(keys[6], (D,))
        inputs["z"] = jax.random.normal(keys[7], (batch, length, D))
    return {name: value.astype(dtype) for name, value in inputs.items()}


def make_state(key, batch):
    return jax.random.normal(key, (batch, D, N))


UNGROUPED = OpSpec(
    make_inputs=make_inputs,
    apply=lambda i, s, ids, impl: selective_scan(
        i["x"],
        i["dt"],
        i["A"],
        i["B"],
        i["C"],
        i["D"],
        i["z"],
        i["dt_bias"],
        s,
        segment_ids=ids,
        impl=impl,
        chunk_size=CHUNK,
    ),
    make_state=make_state,
    step=lambda i, s: selective_scan_step(
        i["x"], i["dt"], i["A"], i["B"], i["C"], i["D"], i["z"], i["dt_bias"], s
    ),
    time_inputs=frozenset({"x", "dt", "B", "C", "z"}),
    impls=("chunked",),
    chunk_size=CHUNK,
)

GROUPED_NEGATIVE_EIGENVALUES = OpSpec(
    make_inputs=lambda key, batch, length, dtype: make_inputs(
        key, batch, length, dtype, groups=G, skip_and_gate=False
    ),
    apply=lambda i, s, ids, impl: selective_scan(
        i["x"],
        i["dt"],
        i["A"],
        i["B"],
        i["C"],
        dt_bias=i["dt_bias"],
        initial_state=s,
        allow_neg_eigval=True,
        segment_ids=ids,
        impl=impl,
        chunk_size=CHUNK,
    ),
    make_state=make_state,
    step=lambda i, s: selective_scan_step(
        i["x"],
        i["dt"],
        i["A"],
        i["B"],
        i["C"],
        dt_bias=i["dt_bias"],
        state=s,
        allow_neg_eigval=True,
    ),
    time_inputs=frozenset({"x", "dt", "B", "C"}),
    impls=("chunked",),
    chunk_size=CHUNK,
)


class TestSelectiveScan(OpContract):
    spec = UNGROUPED


class TestGroupedSelectiveScanWithNegativeEigenvalues(OpContract):
    spec = GROUPED_NEGATIVE_EIGENVALUES


def test_chunked_memory_is_linear_in_length_without_per_token_states():
    batch, width, state_size = 1, 16, 32

    def temp_bytes(impl, length):
        def loss(x, dt, A, B, C):
            y, final = selective_scan(x, dt, A, B, C, impl=impl, chunk_size=64)
            return jnp.sum(y) + jnp.sum(final)

        shapes = [(batch, length, width)] * 2 + [(width, state_size)]
        shapes += [(batch, length, state_size)] * 2
        args = [jax.ShapeDtypeStruct(shape, jnp.float32) for shape in shapes]
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4))).lower(*args).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    per_token_states = batch * 4096 * width * state_size * 4
    short, long = temp_bytes("chunked", 1024), temp_bytes("chunked", 4096)
    assert long < per_token_states / 2
    assert long <= 4.5 * short
    assert temp_bytes("reference", 4096) > per_token_states


def test_negative_eigenvalues_map_decay_to_twice_minus_one():
    # x = 0 and a state of ones: after one token the state is the decay itself.
    batch, width, state_size = 1, 3, 2
    dt = jnp.array([[[-4.0, 0.0, 4.0]]])
    A = -jnp.ones((width, state_size))
    x = jnp.zeros((batch, 1, width))
    B = C = jnp.ones((batch, 1, state_size))
    ones = jnp.ones((batch, width, state_size))
    _, default = selective_scan(x, dt, A, B, C, initial_state=ones)
    _, extended = selective_scan(x, dt, A, B, C, initial_state=ones, allow_neg_eigval=True)
    assert np.all((default > 0) & (default <= 1))
    assert np.all((extended > -1) & (extended < 1))
    assert np.any(extended < 0)
    np.testing.assert_allclose(extended, 2 * default - 1, rtol=1e-6)


def test_rejects_mismatched_channels():
    x = jnp.zeros((2, 5, 4))
    B = jnp.zeros((2, 5, 3))
    with pytest.raises(ValueError, match=r"dt: expected shape \[B, T, D\] = \[2, 5, 4\]"):
        selective_scan(x, jnp.zeros((2, 5, 3)), -jnp.ones((4, 3)), B, B)


def test_rejects_groups_of_b_and_c_that_differ():
    x = jnp.zeros((2, 5, 4))
    with pytest.raises(ValueError, match=r"C: expected shape \[B, T, G, N\] = \[2, 5, 2, 3\]"):
        selective_scan(x, x, -jnp.ones((4, 3)), jnp.zeros((2, 5, 2, 3)), jnp.zeros((2, 5, 4, 3)))


def test_rejects_channels_that_do_not_split_into_groups():
    x = jnp.zeros((2, 5, 6))
    B = jnp.zeros((2, 5, 4, 3))
    with pytest.raises(ValueError, match=r"B, C: the D = 6 channels .* G = 4 .*D % G must be 0"):
        selective_scan(x, x, -jnp.ones((6, 3)), B, B)


def test_rejects_positive_A_when_concrete():
    x = jnp.zeros((1, 3, 2))
    B = jnp.zeros((1, 3, 4))
    with pytest.raises(ValueError, match=r"A: expected Re\(A\) <= 0"):
        selective_scan(x, x, jnp.ones((2, 4)), B, B)


@pytest.mark.slow
def test_complex_A_gives_a_complex_state_and_agrees_across_impls():
    inputs = make_inputs(jax.random.key(3), 2, 2 * CHUNK + 5, jnp.float32)
    inputs["A"] = inputs["A"] + 1j * jax.random.normal(jax.random.key(4), (D, N))

    def run(impl, inputs):
        return selective_scan(**inputs, impl=impl, chunk_size=CHUNK)

    expected = jax.jit(run, static_argnums=0)("reference", inputs)
    assert expected[0].dtype == jnp.float32 and expected[1].dtype == jnp.complex64
    assert_trees_close(jax.jit(run, static_argnums=0)("chunked", inputs), expected, 2e-5, "values")

    weights = cotangents_like(expected, jax.random.key(6))

    def loss(impl, inputs):
        return weighted_sum(run(impl, inputs), weights)

    gradients = jax.jit(jax.grad(loss, argnums=1), static_argnums=0)
    assert_trees_close(gradients("chunked", inputs), gradients("reference", inputs), 5e-5, "grads")


@pytest.mark.slow
def test_without_softplus_dt_plus_bias_is_the_step_size():
    inputs = make_inputs(jax.random.key(5), 2, 7, jnp.float32)
    dt, dt_bias = inputs.pop("dt"), inputs.pop("dt_bias")
    softplus = selective_scan(**inputs, dt=dt, dt_bias=dt_bias)
    linear = selective_scan(**inputs, dt=jax.nn.softplus(dt + dt_bias), dt_softplus=False)
    assert_trees_close(linear, softplus, 1e-6, "dt_softplus=False")
