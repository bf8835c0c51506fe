"""Aaren: the prefix scan equals masked softmax attention of a broadcast query."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from contract import OpContract, OpSpec, assert_trees_close

from seqjax.ops.aaren import aaren, aaren_step
from seqjax.ops.attention import softmax_attention
from seqjax.scan.online_softmax import SoftmaxPartial, combine, empty_partial, normalize

HEADS, KEY_DIM, VALUE_DIM = 3, 8, 5


def make_inputs(key, batch, length, dtype):
    kq, kk, kv = jax.random.split(key, 3)
    return {
        "q": jax.random.normal(kq, (batch, HEADS, KEY_DIM)).astype(dtype),
        "k": jax.random.normal(kk, (batch, length, HEADS, KEY_DIM)).astype(dtype),
        "v": jax.random.normal(kv, (batch, length, HEADS, VALUE_DIM)).astype(dtype),
    }


def make_state(key, batch):
    km, ku, kw = jax.random.split(key, 3)
    return SoftmaxPartial(
        jax.random.normal(km, (batch, HEADS)),
        jnp.exp(jax.random.normal(ku, (batch, HEADS))),
        jax.random.normal(kw, (batch, HEADS, VALUE_DIM)),
    )


def apply(inputs, state, segment_ids, impl):
    return aaren(
        inputs["q"],
        inputs["k"],
        inputs["v"],
        initial_state=state,
        segment_ids=segment_ids,
        impl=impl,
    )


def step(inputs, state):
    return aaren_step(inputs["q"], inputs["k"], inputs["v"], state)


AAREN = OpSpec(
    make_inputs=make_inputs,
    apply=apply,
    make_state=make_state,
    step=step,
    time_inputs=frozenset({"k", "v"}),
    row_inputs=frozenset({"q"}),
    impls=("associative",),
)


class TestAaren(OpContract):
    spec = AAREN


def broadcast_query_attention(q, k, v, segment_ids=None):
    """Causal softmax attention with the query `q: [B, H, K]` at every position."""
    queries = jnp.broadcast_to(q[:, None], k.shape)
    return softmax_attention(queries, k, v, segment_ids=segment_ids, impl="reference")[0]


@pytest.mark.parametrize("impl", ["reference", pytest.param("associative", marks=pytest.mark.slow)])
def test_equals_masked_softmax_attention_with_a_broadcast_query(impl):
    inputs = make_inputs(jax.random.key(0), 2, 21, jnp.float32)
    segment_ids = jnp.asarray([[0] * 9 + [1] * 12, [0] * 21])
    args = (inputs["q"], inputs["k"], inputs["v"])

    def ours(q, k, v):
        return aaren(q, k, v, segment_ids=segment_ids, impl=impl)[0]

    def theirs(q, k, v):
        return broadcast_query_attention(q, k, v, segment_ids)

    assert_trees_close(ours(*args), theirs(*args), 2e-6, "aaren vs attention")

    def grad(f):
        return jax.grad(lambda *a: jnp.sum(jnp.sin(f(*a))), argnums=(0, 1, 2))(*args)

    assert_trees_close(grad(ours), grad(theirs), 1e-5, "gradients")


def test_large_scores_do_not_overflow():
    """Scores near 1e4 (exp overflows float32 far below that) stay exact: the max shifts."""
    inputs = make_inputs(jax.random.key(1), 1, 30, jnp.float32)
    q = inputs["q"] * 3e3
    out, state = aaren(q, inputs["k"], inputs["v"])
    expected = broadcast_query_attention(q, inputs["k"], inputs["v"])
    assert_trees_close(out, expected, 1e-5, "large scores")
    assert bool(jnp.all(jnp.isfinite(state.denominator)))


def test_combine_is_associative_and_empty_is_its_identity():
    keys = jax.random.split(jax.random.key(2), 3)
    a, b, c = (make_state(key, 2) for key in keys)
    assert_trees_close(combine(combine(a, b), c), combine(a, combine(b, c)), 1e-6, "assoc")
    empty = empty_partial((2, HEADS), VALUE_DIM)
    assert_trees_close(combine(empty, a), a, 1e-7, "left identity")
    assert_trees_close(combine(a, empty), a, 1e-7, "right identity")
    both = combine(empty, empty)
    assert bool(jnp.all(jnp.isneginf(both.max))) and float(jnp.abs(normalize(both)).max()) == 0


def test_bad_input_is_rejected_naming_the_argument():
    inputs = make_inputs(jax.random.key(0), 2, 9, jnp.float32)
    with pytest.raises(ValueError, match="q"):
        aaren(inputs["k"], inputs["k"], inputs["v"])
    with pytest.raises(ValueError, match="v"):
        aaren(inputs["q"], inputs["k"], inputs["v"][:, :, :2])
    with pytest.raises(ValueError, match="initial_state"):
        aaren(*inputs.values(), initial_state=make_state(jax.random.key(0), 3))
    with pytest.raises(ValueError, match="impl"):
        aaren(*inputs.values(), impl="parallel")
