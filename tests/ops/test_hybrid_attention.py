"""Sliding-window softmax plus linear attention: the chunked form against the token loop and
against the equations computed directly."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from contract import OpContract, OpSpec, assert_trees_close, ring_view

from seqjax.ops.feature_maps import elu_plus_one
from seqjax.ops.hybrid_attention import (
    HybridAttentionState,
    init_hybrid_state,
    sliding_window_hybrid_attention,
    sliding_window_hybrid_attention_step,
)

HEADS, KEY_DIM, VALUE_DIM, FEATURES, WINDOW = 3, 8, 5, 6, 7


def make_inputs(key, batch, length, dtype):
    keys = jax.random.split(key, 6)
    q = jax.random.normal(keys[0], (batch, length, HEADS, KEY_DIM))
    k = jax.random.normal(keys[1], (batch, length, HEADS, KEY_DIM))
    features = (batch, length, HEADS, FEATURES)
    return {
        "q": q.astype(dtype),
        "k": k.astype(dtype),
        "v": jax.random.normal(keys[2], (batch, length, HEADS, VALUE_DIM)).astype(dtype),
        "phi_q": elu_plus_one(jax.random.normal(keys[3], features)).astype(dtype),
        "phi_k": elu_plus_one(jax.random.normal(keys[4], features)).astype(dtype),
        "gamma": jax.nn.sigmoid(jax.random.normal(keys[5], (HEADS,))),
    }


def make_state(key, batch):
    """A window that has wrapped around (row 0: 10 tokens seen) or not (row 1: 4), with a
    linear state of positive key sums."""
    lengths = jnp.asarray((10, 4, 3)[:batch], jnp.int32)
    slots = jnp.arange(WINDOW)
    positions = (lengths[:, None] - 1) - jnp.mod(lengths[:, None] - 1 - slots, WINDOW)
    positions = jnp.where(positions >= 0, positions, -1).astype(jnp.int32)
    filled = (positions >= 0)[..., None, None]
    keys = jax.random.split(key, 5)
    ring = (batch, WINDOW, HEADS)
    return HybridAttentionState(
        jax.random.normal(keys[0], (*ring, KEY_DIM)) * filled,
        jax.random.normal(keys[1], (*ring, VALUE_DIM)) * filled,
        elu_plus_one(jax.random.normal(keys[2], (*ring, FEATURES))) * filled,
        positions,
        lengths,
        jax.random.normal(keys[3], (batch, HEADS, FEATURES, VALUE_DIM)),
        jnp.exp(jax.random.normal(keys[4], (batch, HEADS, FEATURES))),
    )


def apply(inputs, state, segment_ids, impl):
    x = inputs
    return sliding_window_hybrid_attention(
        x["q"],
        x["k"],
        x["v"],
        x["phi_q"],
        x["phi_k"],
        WINDOW,
        x["gamma"],
        initial_state=state,
        segment_ids=segment_ids,
        impl=impl,
        chunk_size=16,
    )


def step(inputs, state):
    x = inputs
    if state is None:
        state = init_hybrid_state(x["q"].shape[0], WINDOW, HEADS, KEY_DIM, VALUE_DIM, FEATURES)
    return sliding_window_hybrid_attention_step(
        x["q"], x["k"], x["v"], x["phi_q"], x["phi_k"], state, window_factor=x["gamma"]
    )


def state_view(state: HybridAttentionState) -> tuple:
    ring = ring_view((state.k, state.v, state.phi_k), state.positions, state.length)
    return ring, state.S, state.z


HYBRID = OpSpec(
    make_inputs=make_inputs,
    apply=apply,
    make_state=make_state,
    step=step,
    time_inputs=frozenset({"q", "k", "v", "phi_q", "phi_k"}),
    impls=("chunked",),
    state_view=state_view,
)


class TestSlidingWindowHybridAttention(OpContract):
    spec = HYBRID


def direct(x, segment_ids, window):
    """The module docstring's equations, query by query, in float64."""
    q, k, v, phi_q, phi_k = (
        np.asarray(x[n], np.float64) for n in ("q", "k", "v", "phi_q", "phi_k")
    )
    gamma = np.asarray(x["gamma"], np.float64)
    batch, length = q.shape[:2]
    y = np.zeros((batch, length, HEADS, VALUE_DIM))
    for b in range(batch):
        for h in range(HEADS):
            for i in range(length):
                seen = [j for j in range(i + 1) if segment_ids[b, j] == segment_ids[b, i]]
                near = [j for j in seen if j > i - window]
                far = [j for j in seen if j <= i - window]
                s = np.array([q[b, i, h] @ k[b, j, h] for j in near]) * KEY_DIM**-0.5
                a = gamma[h] * np.exp(s - s.max())
                lin = np.array([phi_q[b, i, h] @ phi_k[b, j, h] for j in far])
                numerator = a @ v[b, near, h] + (lin @ v[b, far, h] if far else 0.0)
                y[b, i, h] = numerator / (a.sum() + lin.sum())
    return y


@pytest.mark.parametrize("impl", ["reference", "chunked"])
@pytest.mark.parametrize("window", [1, 7, 40])
def test_equals_the_equations(impl, window):
    x = make_inputs(jax.random.key(3), 2, 33, jnp.float32)
    segment_ids = np.asarray([[0] * 12 + [1] * 21, [0] * 33])
    y, _ = sliding_window_hybrid_attention(
        x["q"],
        x["k"],
        x["v"],
        x["phi_q"],
        x["phi_k"],
        window,
        x["gamma"],
        segment_ids=jnp.asarray(segment_ids),
        impl=impl,
        chunk_size=8,
    )
    assert_trees_close(y, jnp.asarray(direct(x, segment_ids, window)), 2e-6, f"{impl} W={window}")


@pytest.mark.slow
def test_continuing_from_a_state_equals_one_call():
    x = make_inputs(jax.random.key(4), 2, 40, jnp.float32)

    def run(part, state=None):
        piece = {n: (a if n == "gamma" else a[:, part]) for n, a in x.items()}
        return apply(piece, state, None, "chunked")

    whole, final = run(slice(None))
    first, state = run(slice(0, 17))
    second, state = run(slice(17, None), state)
    assert_trees_close(jnp.concatenate([first, second], axis=1), whole, 2e-5, "outputs")
    assert_trees_close(state, final, 2e-5, "state")


def test_bad_input_is_rejected_naming_the_argument():
    x = make_inputs(jax.random.key(0), 2, 9, jnp.float32)
    args = [x["q"], x["k"], x["v"], x["phi_q"], x["phi_k"]]
    with pytest.raises(ValueError, match="phi_k"):
        sliding_window_hybrid_attention(*args[:4], args[4][..., :2], WINDOW, 0.5)
    with pytest.raises(ValueError, match="window"):
        sliding_window_hybrid_attention(*args, 0, 0.5)
    with pytest.raises(ValueError, match="window_factor"):
        sliding_window_hybrid_attention(*args, WINDOW, jnp.ones(2))
    with pytest.raises(ValueError, match="window_factor"):
        sliding_window_hybrid_attention(*args, WINDOW, -1.0)
    with pytest.raises(ValueError, match="initial_state"):
        state = init_hybrid_state(2, WINDOW + 1, HEADS, KEY_DIM, VALUE_DIM, FEATURES)
        sliding_window_hybrid_attention(*args, WINDOW, 0.5, initial_state=state)
