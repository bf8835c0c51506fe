"""LoRA as a transformation of the parameter tree: the merged model at initialization is the base
model, the adapters' gradient is the merged kernel's through the chain rule (and finite
differences), and bad ranks and patterns fail by name."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from seqjax.nn.attention import Attention, AttentionConfig
from seqjax.train.lora import LoRAAdapter, init_lora, merge_lora

TARGETS = {r"^(q|k|v)/kernel$": 1, r"^o/kernel$": 2}
RANK, ALPHA = 3, 6.0


def attention_setup():
    """An attention layer (width 8, 2 heads of 4), its plain parameters and an input."""
    layer = Attention(AttentionConfig(8, num_heads=2))
    x = jax.random.normal(jax.random.key(0), (2, 5, 8))
    params = nn.unbox(layer.init(jax.random.key(1), x)["params"])
    return layer, params, x


def test_adapters_shape_the_targeted_kernels_only():
    _, params, _ = attention_setup()
    adapters = init_lora(jax.random.key(2), params, targets={r"^q/kernel$": 1}, rank=RANK)
    assert sorted(adapters) == ["q/kernel"]
    assert adapters["q/kernel"].lora_a.shape == (8, RANK)  # q: [D, H, K]
    assert adapters["q/kernel"].lora_b.shape == (RANK, 2, 4)
    adapters = init_lora(jax.random.key(2), params, targets=TARGETS, rank=RANK)
    assert sorted(adapters) == ["k/kernel", "o/kernel", "q/kernel", "v/kernel"]
    assert adapters["o/kernel"].lora_a.shape == (2, 4, RANK)  # o: [H, K, D], two input axes
    assert adapters["o/kernel"].lora_b.shape == (RANK, 8)
    assert all(not jnp.any(a.lora_b) and jnp.any(a.lora_a) for a in adapters.values())


def test_the_merged_model_at_initialization_is_the_base_model():
    layer, params, x = attention_setup()
    adapters = init_lora(jax.random.key(2), params, targets=TARGETS, rank=RANK)
    merged = merge_lora(params, adapters, alpha=ALPHA)
    jax.tree.map(np.testing.assert_array_equal, merged, params)
    y, _ = layer.apply({"params": params}, x)
    y_merged, _ = layer.apply({"params": merged}, x)
    np.testing.assert_array_equal(y_merged, y)


def trained_adapters(params):
    """Adapters with a non-zero B, as after some training (at init dL/dA is zero)."""
    adapters = init_lora(jax.random.key(2), params, targets=TARGETS, rank=RANK)
    keys = iter(jax.random.split(jax.random.key(3), len(adapters)))
    return {
        name: LoRAAdapter(a.lora_a, 0.3 * jax.random.normal(next(keys), a.lora_b.shape))
        for name, a in adapters.items()
    }


def test_merging_adds_alpha_over_rank_times_a_b():
    _, params, _ = attention_setup()
    adapters = trained_adapters(params)
    merged = merge_lora(params, adapters, alpha=ALPHA)
    a, b = adapters["o/kernel"]
    expected = params["o"]["kernel"] + ALPHA / RANK * np.einsum("hkr,rd->hkd", a, b)
    np.testing.assert_allclose(merged["o"]["kernel"], expected, rtol=1e-6, atol=1e-7)


def test_gradients_flow_to_the_adapters_through_the_merged_kernels():
    """dL/dA = (alpha / r) G B^T and dL/dB = (alpha / r) A^T G, with G = dL/dW' of the merged
    kernel; and the adapters' gradient agrees with finite differences."""
    layer, params, x = attention_setup()
    adapters = trained_adapters(params)

    def loss_of_params(p):
        y, _ = layer.apply({"params": p}, x)
        return jnp.sum(jnp.tanh(y))

    def loss_of_adapters(adapters):
        return loss_of_params(merge_lora(params, adapters, alpha=ALPHA))

    grads = jax.grad(loss_of_adapters)(adapters)
    kernel_grads = jax.grad(loss_of_params)(merge_lora(params, adapters, alpha=ALPHA))
    for name, axes in (("q/kernel", 1), ("o/kernel", 2)):
        g = kernel_grads[name.split("/")[0]]["kernel"]
        g = g.reshape(int(np.prod(g.shape[:axes])), -1)
        a = np.asarray(adapters[name].lora_a).reshape(g.shape[0], RANK)
        b = np.asarray(adapters[name].lora_b).reshape(RANK, g.shape[1])
        da = np.asarray(grads[name].lora_a).reshape(a.shape)
        db = np.asarray(grads[name].lora_b).reshape(b.shape)
        np.testing.assert_allclose(da, ALPHA / RANK * g @ b.T, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(db, ALPHA / RANK * a.T @ g, rtol=1e-4, atol=1e-6)
    check_grads(loss_of_adapters, (adapters,), order=1, modes=("rev",), atol=5e-2, rtol=5e-2)


def test_base_parameters_get_no_gradient_from_the_adapters_loss():
    """Only the adapters are arguments: the base kernels are constants of the loss."""
    layer, params, x = attention_setup()
    adapters = trained_adapters(params)

    def loss(adapters, params):
        y, _ = layer.apply({"params": merge_lora(params, adapters, alpha=ALPHA)}, x)
        return jnp.sum(y**2)

    grads = jax.grad(loss)(adapters, params)
    assert jax.tree.structure(grads) == jax.tree.structure(adapters)


@pytest.mark.parametrize(
    "targets, rank, message",
    [
        (TARGETS, 0, r"^rank: expected a positive int"),
        (TARGETS, 9, r"^rank: expected at most min\(in, out\) = 8 for 'k/kernel'"),
        ({r"^o/kernel$": 1}, RANK, r"^rank: expected at most min\(in, out\) = 2 for 'o/kernel'"),
        ({}, RANK, r"^targets: expected at least one pattern"),
        ({**TARGETS, r"mlp/": 1}, RANK, r"^targets: pattern 'mlp/' matches no parameter"),
        ({r"^q/kernel$": 3}, RANK, r"^targets: 'q/kernel' has shape \(8, 2, 4\); expected 1 to 2"),
        ({r"^q/": 1, r"kernel": 2}, RANK, r"^targets: patterns give 'q/kernel' different"),
        ({r"^q/(": 1}, RANK, r"^targets: '\^q/\(' is not a regular expression"),
    ],
)
def test_bad_rank_or_targets_name_the_argument(targets, rank, message):
    _, params, _ = attention_setup()
    with pytest.raises(ValueError, match=message):
        init_lora(jax.random.key(0), params, targets=targets, rank=rank)


def test_merging_checks_its_arguments():
    _, params, _ = attention_setup()
    adapters = init_lora(jax.random.key(0), params, targets=TARGETS, rank=RANK)
    with pytest.raises(ValueError, match=r"^alpha: expected a positive scale"):
        merge_lora(params, adapters, alpha=0.0)
    with pytest.raises(ValueError, match=r"^adapters: no parameter at \['head/kernel'\]"):
        merge_lora(params, {**adapters, "head/kernel": adapters["q/kernel"]}, alpha=ALPHA)
    with pytest.raises(ValueError, match=r"^adapters: 'k/kernel' gives an update of shape"):
        merge_lora(params, {**adapters, "k/kernel": adapters["o/kernel"]}, alpha=ALPHA)
