import jax
import jax.numpy as jnp
import numpy as np
import pytest
from contract import OpContract, OpSpec, assert_trees_close

from seqjax.ops.gla import LinearAttentionState, linear_attention_step
from seqjax.ops.prefix_linear_attention import positions_in_segment, prefix_linear_attention

H, K, V = 2, 4, 3
PREFIX = jnp.array([5, 12], jnp.int32)


def feature_mapped(key, shape):
    return jax.nn.elu(jax.random.normal(key, shape)) + 1.0  # positive, as Based's map


def make_inputs(key, batch, length, dtype):
    keys = jax.random.split(key, 5)
    inputs = {
        "q": feature_mapped(keys[0], (batch, length, H, K)),
        "k": feature_mapped(keys[1], (batch, length, H, K)),
        "v": jax.random.normal(keys[2], (batch, length, H, V)),
        "k_enc": feature_mapped(keys[3], (batch, length, H, K)),
        "v_enc": jax.random.normal(keys[4], (batch, length, H, V)),
    }
    inputs = {name: x.astype(dtype) for name, x in inputs.items()}
    return {**inputs, "prefix_len": jnp.resize(PREFIX, (batch,))}


def make_state(key, batch):
    ks, kz = jax.random.split(key)
    return LinearAttentionState(
        jax.random.normal(ks, (batch, H, K, V)), 1.0 + jax.random.uniform(kz, (batch, H, K))
    )


def apply(inputs, state, segment_ids, impl):
    names = ("q", "k", "v", "k_enc", "v_enc", "prefix_len")
    return prefix_linear_attention(
        *(inputs[n] for n in names),
        initial_state=state,
        segment_ids=segment_ids,
        impl=impl,
        chunk_size=16,
    )


SPEC = OpSpec(
    make_inputs=make_inputs,
    apply=apply,
    make_state=make_state,
    # Every token reads the whole prefix, so there is no step from t = 0: decoding continues
    # after a prefill (test_decoding_continues_from_the_prefilled_state).
    step=None,
    time_inputs=frozenset({"q", "k", "v", "k_enc", "v_enc"}),
    row_inputs=frozenset({"prefix_len"}),
    impls=("chunked", "parallel"),
    chunk_size=16,
)


class TestPrefixLinearAttention(OpContract):
    spec = SPEC


def test_matches_the_definition_term_by_term():
    inputs = make_inputs(jax.random.key(0), 2, 23, jnp.float32)
    state = make_state(jax.random.key(1), 2)
    y, final = apply(inputs, state, None, "chunked")
    q, k, v, k_enc, v_enc = (
        np.asarray(inputs[n], np.float64) for n in ("q", "k", "v", "k_enc", "v_enc")
    )
    q = q * K**-0.5
    for b, prefix in enumerate(np.asarray(PREFIX)):
        S = np.asarray(state.S[b], np.float64) + np.einsum(
            "jhk,jhv->hkv", k_enc[b, :prefix], v_enc[b, :prefix]
        )
        z = np.asarray(state.z[b], np.float64) + k_enc[b, :prefix].sum(0)
        for i in range(23):
            S = S + np.einsum("hk,hv->hkv", k[b, i], v[b, i])
            z = z + k[b, i]
            expected = np.einsum("hk,hkv->hv", q[b, i], S) / (
                np.einsum("hk,hk->h", q[b, i], z)[:, None] + 1e-10
            )
            np.testing.assert_allclose(y[b, i], expected, rtol=2e-5, atol=2e-6)
        np.testing.assert_allclose(final.S[b], S, rtol=2e-5, atol=2e-5)
        np.testing.assert_allclose(final.z[b], z, rtol=2e-5)


def test_decoding_continues_from_the_prefilled_state():
    inputs = make_inputs(jax.random.key(2), 2, 30, jnp.float32)
    y, _ = apply(inputs, None, None, "chunked")
    prefill = {n: x[:, :20] if x.ndim > 1 else x for n, x in inputs.items()}
    _, state = apply(prefill, None, None, "chunked")
    for t in range(20, 30):
        y_t, state = linear_attention_step(
            inputs["q"][:, t], inputs["k"][:, t], inputs["v"][:, t], state, normalize=True
        )
        assert_trees_close(y_t, y[:, t], 1e-5, f"decoded token {t}")


def test_each_segment_has_its_own_prefix():
    ids = jnp.array([[0] * 4 + [1] * 9 + [2] * 7])
    np.testing.assert_array_equal(
        positions_in_segment(ids, 1, 20)[0], [*range(4), *range(9), *range(7)]
    )
    assert positions_in_segment(None, 1, 3).tolist() == [[0, 1, 2]]


def test_prefix_longer_than_the_sequence_reads_every_encoder_token():
    inputs = make_inputs(jax.random.key(3), 1, 9, jnp.float32)
    long = apply({**inputs, "prefix_len": jnp.array([50])}, None, None, "chunked")
    whole = apply({**inputs, "prefix_len": jnp.array([9])}, None, None, "reference")
    assert_trees_close(long, whole, 1e-5, "prefix_len beyond T")


def test_rejects_float_prefix_len_and_mismatched_encoder_values():
    inputs = make_inputs(jax.random.key(4), 1, 6, jnp.float32)
    with pytest.raises(TypeError, match="prefix_len: expected an int"):
        apply({**inputs, "prefix_len": jnp.array([2.0])}, None, None, "chunked")
    bad = {**inputs, "v_enc": inputs["v_enc"][..., :2]}
    with pytest.raises(ValueError, match=r"v_enc: expected shape \[B, T, H, V\] = \[1, 6, 2, 3\]"):
        apply(bad, None, None, "chunked")
    with pytest.raises(ValueError, match="prefix_len: expected prefix_len >= 0"):
        apply({**inputs, "prefix_len": jnp.array([-1])}, None, None, "chunked")
