import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqjax.ops.feature_maps import elu_plus_one, hedgehog, relu, taylor_exp

B, T, H, K, F = 2, 3, 2, 4, 5


def normal(seed, shape, scale=1.0):
    return scale * np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def np_softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def np_taylor_exp(x, symmetric):
    d = x.shape[-1]
    if symmetric:
        pairs = [(i, j) for i in range(d) for j in range(i, d)]
        second = np.stack(
            [x[..., i] * x[..., j] * (1.0 if i == j else np.sqrt(2.0)) for i, j in pairs], -1
        )
    else:
        second = np.einsum("...i,...j->...ij", x, x).reshape(*x.shape[:-1], d * d)
    ones = np.ones((*x.shape[:-1], 1))
    return np.concatenate([ones, x / d**0.25, second / np.sqrt(2.0) / np.sqrt(d)], -1)


def np_hedgehog(x, weight, bias):
    z = x @ weight + (0.0 if bias is None else bias)
    return np.concatenate([np_softmax(z), np_softmax(-z)], -1)


def test_elu_plus_one_matches_definition():
    x = normal(0, (B, T, H, K), scale=3.0)
    expected = np.where(x > 0, x + 1.0, np.exp(x))
    np.testing.assert_allclose(elu_plus_one(jnp.asarray(x)), expected, rtol=1e-6, atol=1e-6)


def test_elu_plus_one_stays_positive_in_bfloat16():
    x = jnp.full((K,), -10.0, jnp.bfloat16)
    out = elu_plus_one(x)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(out.astype(np.float32), np.exp(-10.0), rtol=1e-2)


def test_relu_matches_definition():
    x = normal(1, (B, T, H, K))
    np.testing.assert_array_equal(relu(jnp.asarray(x)), np.maximum(x, 0.0))


@pytest.mark.parametrize("symmetric", [False, True])
def test_taylor_exp_matches_definition(symmetric):
    x = normal(2, (B, T, H, K))
    out = taylor_exp(jnp.asarray(x), symmetric=symmetric)
    np.testing.assert_allclose(out, np_taylor_exp(x, symmetric), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("symmetric", "features"), [(False, 1 + K + K * K), (True, 15)])
def test_taylor_exp_inner_product_is_second_order_taylor_of_exp(symmetric, features):
    q, k = normal(3, (B, T, H, K)), normal(4, (B, T, H, K))
    phi_q = taylor_exp(jnp.asarray(q), symmetric=symmetric)
    phi_k = taylor_exp(jnp.asarray(k), symmetric=symmetric)
    assert phi_q.shape == (B, T, H, features)
    s = np.sum(q * k, axis=-1) / np.sqrt(K)
    np.testing.assert_allclose(
        jnp.sum(phi_q * phi_k, axis=-1), 1.0 + s + s**2 / 2.0, rtol=1e-5, atol=1e-5
    )


def test_taylor_exp_is_full_by_default():
    x = jnp.asarray(normal(5, (T, K)))
    np.testing.assert_array_equal(taylor_exp(x), taylor_exp(x, symmetric=False))


@pytest.mark.parametrize("with_bias", [False, True])
def test_hedgehog_with_shared_weight_matches_definition(with_bias):
    x, weight = normal(6, (B, T, H, K)), normal(7, (K, F))
    bias = normal(8, (F,)) if with_bias else None
    out = hedgehog(jnp.asarray(x), jnp.asarray(weight), None if bias is None else jnp.asarray(bias))
    assert out.shape == (B, T, H, 2 * F)
    np.testing.assert_allclose(out, np_hedgehog(x, weight, bias), rtol=1e-5, atol=1e-6)


def test_hedgehog_applies_each_heads_weight_and_bias():
    x, weight, bias = normal(9, (B, T, H, K)), normal(10, (H, K, F)), normal(11, (H, F))
    out = hedgehog(jnp.asarray(x), jnp.asarray(weight), jnp.asarray(bias))
    expected = np.stack([np_hedgehog(x[:, :, h], weight[h], bias[h]) for h in range(H)], axis=2)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


def test_hedgehog_is_stable_for_large_logits():
    x = jnp.asarray(normal(12, (T, K), scale=100.0))
    out = hedgehog(x, jnp.eye(K))
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(jnp.sum(out, axis=-1), 2.0, rtol=1e-5)


MAPS = {
    "elu_plus_one": elu_plus_one,
    "relu": relu,
    "taylor_exp": taylor_exp,
    "taylor_exp_symmetric": lambda x: taylor_exp(x, symmetric=True),
    "hedgehog": lambda x: hedgehog(x, jnp.asarray(normal(13, (H, K, F))), jnp.ones((H, F))),
}


@pytest.mark.parametrize("name", MAPS)
def test_bfloat16_input_gives_bfloat16_output_close_to_float32(name):
    x = jnp.asarray(normal(14, (B, T, H, K))).astype(jnp.bfloat16)
    out = MAPS[name](x)
    assert out.dtype == jnp.bfloat16
    expected = MAPS[name](x.astype(jnp.float32))
    np.testing.assert_allclose(out.astype(jnp.float32), expected, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("name", MAPS)
def test_gradients_are_finite(name):
    x = jnp.asarray(normal(15, (B, T, H, K), scale=30.0))
    grad = jax.jit(jax.grad(lambda x: jnp.sum(jnp.sin(MAPS[name](x)))))(x)
    assert np.all(np.isfinite(grad)) and np.any(grad != 0)


def test_hedgehog_gradients_reach_weight_and_bias():
    x = jnp.asarray(normal(16, (B, T, H, K), scale=30.0))
    weight, bias = jnp.asarray(normal(17, (H, K, F))), jnp.asarray(normal(18, (H, F)))

    def loss(weight, bias):
        return jnp.sum(jnp.sin(hedgehog(x, weight, bias)))

    grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(weight, bias)
    for g in grads:
        assert np.all(np.isfinite(g)) and np.any(g != 0)


@pytest.mark.parametrize("name", MAPS)
def test_integer_input_is_rejected(name):
    with pytest.raises(TypeError, match="x: expected a float array"):
        MAPS[name](jnp.ones((B, T, H, K), jnp.int32))


def test_taylor_exp_rejects_a_scalar():
    with pytest.raises(ValueError, match=r"x: expected shape \[\.\.\., K\]"):
        taylor_exp(jnp.float32(1.0))


@pytest.mark.parametrize(
    ("weight_shape", "bias_shape", "match"),
    [
        ((H + 1, K, F), None, r"weight: expected shape \[H, K, F\] = \[2, 4, \?\]"),
        ((H, K + 1, F), None, r"weight: expected shape \[H, K, F\]"),
        ((K + 1, F), None, r"weight: expected shape \[K, F\] = \[4, \?\]"),
        ((1, H, K, F), None, r"weight: expected shape \[K, F\] or \[H, K, F\]"),
        ((H, K, F), (F,), r"bias: expected shape \[H, F\] = \[2, 5\]"),
        ((K, F), (F + 1,), r"bias: expected shape \[F\] = \[5\]"),
    ],
)
def test_hedgehog_rejects_mismatched_shapes(weight_shape, bias_shape, match):
    x = jnp.ones((B, T, H, K))
    bias = None if bias_shape is None else jnp.ones(bias_shape)
    with pytest.raises(ValueError, match=match):
        hedgehog(x, jnp.ones(weight_shape), bias)


def test_hedgehog_per_head_weight_needs_a_head_axis():
    with pytest.raises(ValueError, match=r"x: expected shape \[\.\.\., H, K\]"):
        hedgehog(jnp.ones((K,)), jnp.ones((H, K, F)))


@pytest.mark.parametrize("argument", ["weight", "bias"])
def test_hedgehog_rejects_integer_parameters(argument):
    params = {"weight": jnp.ones((K, F)), "bias": jnp.ones((F,))}
    params[argument] = params[argument].astype(jnp.int32)
    with pytest.raises(TypeError, match=f"{argument}: expected a float array"):
        hedgehog(jnp.ones((T, K)), **params)
