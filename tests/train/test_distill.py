"""Attention distillation: the weights against the attention ops they describe and a direct
loop, the two losses against their formulas, the capture of submodule calls, and the transfer
of a softmax model's parameters into its linearized form."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqjax.nn.attention import Attention, AttentionConfig
from seqjax.ops.attention import softmax_attention
from seqjax.ops.gla import linear_attention
from seqjax.train.distill import (
    attention_cross_entropy,
    capture_calls,
    linear_attention_weights,
    output_mse,
    softmax_attention_weights,
    transfer_parameters,
)

B, T, H, K = 2, 7, 3, 4
SEGMENTS = jnp.array([[1, 1, 1, 2, 2, 2, 2], [1, 1, 1, 1, 1, 1, 1]], jnp.int32)


def inputs(seed: int = 0):
    q, k, v = jax.random.normal(jax.random.key(seed), (3, B, T, H, K))
    return q, k, v


def direct_weights(scores: np.ndarray, segment_ids: np.ndarray, softmax: bool) -> np.ndarray:
    """Row by row: the visible keys (j <= i, the same segment), exp-normalized or normalized."""
    weights = np.zeros((B, H, T, T))
    for b in range(B):
        for h in range(H):
            for i in range(T):
                keys = [j for j in range(i + 1) if segment_ids[b, j] == segment_ids[b, i]]
                row = scores[b, h, i, keys]
                row = np.exp(row - row.max()) if softmax else row
                weights[b, h, i, keys] = row / row.sum()
    return weights


def test_softmax_weights_reproduce_the_attention_op():
    q, k, v = inputs()
    a = softmax_attention_weights(q, k, segment_ids=SEGMENTS)
    scores = np.einsum("bihk,bjhk->bhij", q, k) / np.sqrt(K)
    np.testing.assert_allclose(a, direct_weights(scores, np.asarray(SEGMENTS), True), atol=1e-6)
    o, _ = softmax_attention(q, k, v, segment_ids=SEGMENTS, impl="reference")
    np.testing.assert_allclose(jnp.einsum("bhij,bjhv->bihv", a, v), o, rtol=1e-5, atol=1e-5)


def test_linear_weights_reproduce_normalized_linear_attention():
    q, k, v = inputs()
    phi_q, phi_k = jax.nn.elu(q) + 1, jax.nn.elu(k) + 1
    weights = linear_attention_weights(phi_q, phi_k, segment_ids=SEGMENTS)
    products = np.einsum("bihf,bjhf->bhij", phi_q, phi_k)
    expected = direct_weights(products, np.asarray(SEGMENTS), False)
    np.testing.assert_allclose(weights, expected, rtol=1e-5, atol=1e-7)
    o, _ = linear_attention(
        phi_q, phi_k, v, normalize=True, scale=1.0, segment_ids=SEGMENTS, impl="reference"
    )
    np.testing.assert_allclose(jnp.einsum("bhij,bjhv->bihv", weights, v), o, rtol=1e-4, atol=1e-5)


def test_without_segments_the_weights_are_causal():
    q, k, _ = inputs()
    np.testing.assert_allclose(
        softmax_attention_weights(q, k),
        softmax_attention_weights(q, k, segment_ids=jnp.ones((B, T), jnp.int32)),
    )


def test_attention_cross_entropy_is_the_mean_row_cross_entropy():
    q, k, _ = inputs()
    a = softmax_attention_weights(q, k)
    a_hat = linear_attention_weights(jax.nn.elu(q) + 1, jax.nn.elu(k) + 1)
    loss = attention_cross_entropy(a, a_hat)
    rows = -np.sum(np.asarray(a) * np.log(np.maximum(np.asarray(a_hat), 1e-12)), axis=-1)
    np.testing.assert_allclose(loss, rows.mean(), rtol=1e-6)
    # Gibbs: the cross-entropy is smallest (the entropy) when the student is the teacher.
    assert float(attention_cross_entropy(a, a)) < float(loss)


def test_output_mse_is_scaled_by_a_thousand():
    y, y_hat = jax.random.normal(jax.random.key(1), (2, B, T, H, K))
    np.testing.assert_allclose(output_mse(y_hat, y), 1000 * np.mean((y_hat - y) ** 2), rtol=1e-6)
    np.testing.assert_allclose(output_mse(y_hat, y, scale=1.0), np.mean((y_hat - y) ** 2))


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda q: softmax_attention_weights(q, q[:, :, :2]), r"^k: expected shape \[B, T, H, K\]"),
        (lambda q: linear_attention_weights(q[0], q[0]), r"^phi_q: expected shape \[B, T, H, K\]"),
        (
            lambda q: softmax_attention_weights(q, q, segment_ids=SEGMENTS[:, :3]),
            r"^segment_ids: ",
        ),
        (lambda q: output_mse(q, q[:1]), r"^student: expected the teacher's shape"),
        (lambda q: attention_cross_entropy(q, q[:1]), r"^student: expected the teacher's shape"),
    ],
)
def test_bad_inputs_name_the_argument(call, message):
    q, _, _ = inputs()
    with pytest.raises(ValueError, match=message):
        call(q)


def test_captured_calls_hold_inputs_and_outputs_and_carry_gradients():
    layer = Attention(AttentionConfig(8, num_heads=2))
    x = jax.random.normal(jax.random.key(0), (1, 5, 8))
    params = nn.unbox(layer.init(jax.random.key(1), x)["params"])
    (y, _), calls = capture_calls(lambda: layer.apply({"params": params}, x), {"q", "o"})
    assert sorted(calls) == ["o", "q"]
    np.testing.assert_allclose(
        calls["q"].output, jnp.einsum("btd,dhk->bthk", x, params["q"]["kernel"]), rtol=1e-5
    )
    assert calls["o"].inputs[0].shape == (1, 5, 2, 4) and calls["o"].output is not None
    np.testing.assert_array_equal(calls["o"].output, y)

    def captured_sum(params):
        _, calls = capture_calls(lambda: layer.apply({"params": params}, x), {"q"})
        return jnp.sum(calls["q"].output ** 2)

    grads = jax.grad(captured_sum)(params)
    assert float(jnp.abs(grads["q"]["kernel"]).sum()) > 0
    assert float(jnp.abs(grads["v"]["kernel"]).sum()) == 0


def test_transfer_keeps_new_parameters_and_loads_shared_ones():
    source = {"mixer": {"q": {"kernel": jnp.ones((2, 3))}}, "head": {"kernel": jnp.ones(4)}}
    target = {
        "mixer": {"q": {"kernel": jnp.zeros((2, 3))}, "phi_q": {"weight": jnp.zeros(5)}},
        "head": {"kernel": jnp.zeros(4)},
    }
    loaded = transfer_parameters(source, target)
    np.testing.assert_array_equal(loaded["mixer"]["q"]["kernel"], 1.0)
    np.testing.assert_array_equal(loaded["head"]["kernel"], 1.0)
    np.testing.assert_array_equal(loaded["mixer"]["phi_q"]["weight"], 0.0)
    with pytest.raises(ValueError, match=r"^source: 'head/kernel' has shape \(4,\)"):
        transfer_parameters(source, {"head": {"kernel": jnp.zeros(3)}})
