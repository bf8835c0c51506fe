import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from contract import OpContract, OpSpec, assert_trees_close
from jax.experimental import checkify

from seqjax import checks
from seqjax.ops.delta_rule import (
    chunk_states,
    chunk_transition,
    delta_rule,
    delta_rule_step,
    gated_delta_rule,
    gated_delta_rule_step,
    states_after,
)

H, K, V = 2, 8, 5
CHUNK = 16


def make_inputs(key, batch, length, dtype, *, beta_max, unit_keys, gated):
    """DeltaNet's inputs: `beta = beta_max * sigmoid(.)`; keys L2-normalized (`unit_keys`),
    as DeltaNet's layer makes them, or of moderate norm (0.3 to 1.2)."""
    kq, kk, kv, kb, kg, kn = jax.random.split(key, 6)
    q = jax.random.normal(kq, (batch, length, H, K))
    k = jax.random.normal(kk, (batch, length, H, K))
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    if not unit_keys:
        k = k * jax.random.uniform(kn, (batch, length, H, 1), minval=0.3, maxval=1.2)
    v = jax.random.normal(kv, (batch, length, H, V))
    beta = beta_max * jax.nn.sigmoid(jax.random.normal(kb, (batch, length, H)))
    inputs = {"q": q, "k": k, "v": v, "beta": beta}
    if gated:
        inputs["g"] = jax.nn.log_sigmoid(3.0 + 2.0 * jax.random.normal(kg, (batch, length, H)))
    return {name: x.astype(dtype) for name, x in inputs.items()}


def random_state(key, batch):
    return jax.random.normal(key, (batch, H, K, V))


def delta_spec(gated: bool, beta_max: float, unit_keys: bool) -> OpSpec:
    """`gated_delta_rule` (gated) or `delta_rule` on `make_inputs`'s inputs."""

    def gates(inputs):  # the op's gate arguments, in its order
        return (inputs["g"], inputs["beta"]) if gated else (inputs["beta"],)

    op, step = (gated_delta_rule, gated_delta_rule_step) if gated else (delta_rule, delta_rule_step)
    return OpSpec(
        make_inputs=functools.partial(
            make_inputs, beta_max=beta_max, unit_keys=unit_keys, gated=gated
        ),
        apply=lambda i, s, ids, impl: op(
            i["q"],
            i["k"],
            i["v"],
            *gates(i),
            initial_state=s,
            segment_ids=ids,
            impl=impl,
            chunk_size=CHUNK,
        ),
        make_state=random_state,
        step=lambda i, s: step(i["q"], i["k"], i["v"], *gates(i), s),
        time_inputs=frozenset({"q", "k", "v", "beta"} | ({"g"} if gated else set())),
        impls=("chunked", "parallel"),
        chunk_size=CHUNK,
    )


class TestDeltaRuleNegativeEigenvalues(OpContract):
    spec = delta_spec(gated=False, beta_max=2.0, unit_keys=True)


class TestGatedDeltaRuleUnnormalizedKeys(OpContract):
    spec = delta_spec(gated=True, beta_max=1.0, unit_keys=False)


@pytest.mark.slow
class TestDeltaRuleUnnormalizedKeys(OpContract):
    spec = delta_spec(gated=False, beta_max=1.0, unit_keys=False)


@pytest.mark.slow
class TestGatedDeltaRuleNegativeEigenvalues(OpContract):
    spec = delta_spec(gated=True, beta_max=2.0, unit_keys=True)


def gated_inputs(seed, batch, length):
    """Float32 gated inputs with unit keys and beta in (0, 2)."""
    key = jax.random.key(seed)
    return make_inputs(key, batch, length, jnp.float32, beta_max=2.0, unit_keys=True, gated=True)


def test_long_sequences_with_negative_eigenvalues_stay_finite_and_exact():
    # T = 8192, beta in (0, 2), unit keys: the transitions have eigenvalues in (-1, 1].
    x = gated_inputs(0, 1, 8192)

    def loss(impl):
        def f(q, k, v, g, beta):
            o, final = gated_delta_rule(q, k, v, g, beta, impl=impl)
            return jnp.sum(o * jnp.cos(o)) + jnp.sum(final)

        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3, 4)))

    args = (x["q"], x["k"], x["v"], x["g"], x["beta"])
    expected = loss("reference")(*args)
    actual = loss("chunked")(*args)
    for leaf in jax.tree.leaves(actual):
        assert np.all(np.isfinite(np.asarray(leaf)))
    assert_trees_close(actual, expected, 1e-4, "chunked (loss, grads) at T = 8192")


def test_a_chunk_transition_is_the_product_of_its_householder_transitions():
    x = gated_inputs(1, 1, CHUNK)
    k, beta = x["k"][0, :, 0], x["beta"][0, :, 0]  # [C, K], [C]
    transition, increment = chunk_transition(x["k"], x["v"], x["beta"], chunk_size=CHUNK)
    product = jnp.eye(K)
    for t in range(CHUNK):
        product = (jnp.eye(K) - beta[t] * jnp.outer(k[t], k[t])) @ product
    assert transition.shape == (1, 1, H, K, K) and increment.shape == (1, 1, H, K, V)
    assert_trees_close(transition[0, 0, 0], product, 1e-5, "M = prod_t (I - beta_t k_t k_t^T)")


def prefix_state(x, g, ids, h0, end, rows=slice(None)):
    """The reference's state after token `end - 1` of `rows`."""
    inputs = {name: x[name][rows, :end] for name in ("q", "k", "v", "beta")}
    kwargs = {"initial_state": h0[rows], "segment_ids": ids[rows, :end], "impl": "reference"}
    if g is None:
        return delta_rule(**inputs, **kwargs)[1]
    return gated_delta_rule(**inputs, g=g[rows, :end], **kwargs)[1]


PACKED = np.array([[0] * 10 + [1] * 20 + [2] * 15, [0] * 45])


@pytest.mark.parametrize("gated", [False, True])
def test_composed_chunk_transitions_give_the_chunk_states_and_the_final_state(gated):
    x = gated_inputs(2, 2, 45)
    g = x["g"] if gated else None
    ids = jnp.asarray(PACKED)
    h0 = random_state(jax.random.key(3), 2)
    transition, increment = chunk_transition(
        x["k"], x["v"], x["beta"], g, segment_ids=ids, chunk_size=CHUNK
    )
    states = chunk_states(
        x["k"], x["v"], x["beta"], g, initial_state=h0, segment_ids=ids, chunk_size=CHUNK
    )
    assert transition.shape == (2, 3, H, K, K) and states.shape == (2, 3, H, K, V)
    expected = [h0] + [prefix_state(x, g, ids, h0, end) for end in (16, 32)]
    assert_trees_close(states, jnp.stack(expected, axis=1), 1e-5, "chunk states")
    composed = h0
    for n in range(3):
        composed = jnp.einsum("bhij,bhjv->bhiv", transition[:, n], composed) + increment[:, n]
    assert_trees_close(composed, prefix_state(x, g, ids, h0, 45), 1e-5, "composed transitions")


@pytest.mark.parametrize("gated", [False, True])
def test_states_after_any_position_equal_the_final_states_of_prefixes(gated):
    x = gated_inputs(4, 2, 45)
    g = x["g"] if gated else None
    ids = jnp.asarray(PACKED)
    h0 = random_state(jax.random.key(5), 2)
    positions = jnp.array([[0, 9, 10, 29, 31, 44], [0, 15, 16, 17, 40, 44]])
    after = states_after(
        x["k"], x["v"], x["beta"], g, positions, initial_state=h0, segment_ids=ids, chunk_size=16
    )
    assert after.shape == (2, 6, H, K, V)
    for b in range(2):
        for p, t in enumerate(np.asarray(positions[b])):
            expected = prefix_state(x, g, ids, h0, t + 1, rows=slice(b, b + 1))
            assert_trees_close(after[b, p], expected[0], 1e-5, f"state after token {t}, row {b}")


def test_chunked_memory_is_linear_in_length_and_holds_no_per_token_states():
    def bytes_per_token(length, value_dim, key_dim=64):
        def loss(q, k, v, g, beta):
            o, final = gated_delta_rule(q, k, v, g, beta, impl="chunked", chunk_size=64)
            return jnp.sum(o) + jnp.sum(final)

        qk = jax.ShapeDtypeStruct((1, length, 1, key_dim), jnp.float32)
        v = jax.ShapeDtypeStruct((1, length, 1, value_dim), jnp.float32)
        gate = jax.ShapeDtypeStruct((1, length, 1), jnp.float32)
        grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))
        compiled = grad.lower(qk, qk, v, gate, gate).compile()
        return compiled.memory_analysis().temp_size_in_bytes / length

    assert bytes_per_token(4096, 32) <= 1.1 * bytes_per_token(1024, 32)
    # Per-token [K, V] states would add K * 4 bytes per token for every value channel.
    # The chunk form keeps about 8 values per token and value channel (v, U, u, o and their
    # cotangents), a fraction of K = 64.
    growth = bytes_per_token(1024, 256) - bytes_per_token(1024, 32)
    assert growth < 64 * (256 - 32) * 4 / 4


def test_rejects_mismatched_head_counts():
    q = jnp.zeros((1, 4, 2, 8))
    with pytest.raises(ValueError, match=r"k: expected shape \[B, T, H, K\] = \[1, 4, 2, 8\]"):
        delta_rule(q, jnp.zeros((1, 4, 3, 8)), q, jnp.zeros((1, 4, 2)))


def test_rejects_a_beta_per_channel():
    q = jnp.zeros((1, 4, 2, 8))
    with pytest.raises(ValueError, match=r"beta: expected shape \[B, T, H\] = \[1, 4, 2\]"):
        delta_rule(q, q, q, jnp.zeros((1, 4, 2, 8)))


def test_rejects_float_segment_ids():
    q = jnp.zeros((1, 4, 2, 8))
    with pytest.raises(TypeError, match="segment_ids: expected an integer array"):
        delta_rule(q, q, q, jnp.zeros((1, 4, 2)), segment_ids=jnp.zeros((1, 4)))


def test_rejects_positive_log_decay_when_concrete_and_under_opt_in_checkify():
    q, beta = jnp.zeros((1, 4, 2, 8)), jnp.zeros((1, 4, 2))
    with pytest.raises(ValueError, match="g: expected log-decays g <= 0"):
        gated_delta_rule(q, q, q, jnp.ones((1, 4, 2)), beta)
    with checks.checkify_values():
        error, _ = checkify.checkify(jax.jit(lambda g: gated_delta_rule(q, q, q, g, beta)[0]))(
            jnp.ones((1, 4, 2))
        )
    with pytest.raises(checkify.JaxRuntimeError, match="g: expected log-decays g <= 0"):
        error.throw()
