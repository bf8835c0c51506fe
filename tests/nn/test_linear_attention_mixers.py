"""The linear-time attention mixers: Hedgehog, Based, LoLCATs, Liger, JRT-RNN and Aaren. The
mixer contract (`mixer_checks`), what each adds to it, and bad configs name their field."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from mixer_checks import LENGTH, WIDTH, check_mixer, mixer_setup

from seqjax.nn.aaren import Aaren, AarenConfig
from seqjax.nn.attention import Attention, AttentionConfig
from seqjax.nn.based import JRTRNN, Based, BasedConfig, JRTRNNConfig
from seqjax.nn.feature_map import HedgehogFeatureMap
from seqjax.nn.layers import rotary
from seqjax.nn.linearized_attention import (
    Hedgehog,
    HedgehogConfig,
    Liger,
    LigerConfig,
    LoLCATs,
    LoLCATsConfig,
)
from seqjax.ops.feature_maps import hedgehog
from seqjax.ops.gla import gla

# JRT-RNN reads its prefix non-causally, and decodes like the parallel pass once the prefill
# covers the prefix (4 tokens) of every segment: the third segment starts at 5.
CHECK_OPTIONS = {"jrt": {"causal": False, "prefill_length": 9}}

# One representative config per mixer runs by default; the variants are `slow`.
MIXERS = {
    "hedgehog": Hedgehog(
        HedgehogConfig(WIDTH, num_heads=4, num_kv_heads=2, feature_dim=8, chunk_size=8)
    ),
    "based": Based(
        BasedConfig(WIDTH, num_heads=2, feature_dim=4, use_short_conv=True, chunk_size=8)
    ),
    "lolcats": LoLCATs(
        LoLCATsConfig(WIDTH, num_heads=4, num_kv_heads=2, feature_dim=8, window=4, chunk_size=8)
    ),
    "liger": Liger(LigerConfig(WIDTH, num_heads=4, num_kv_heads=2, window=4, chunk_size=8)),
    "jrt_rnn": JRTRNN(
        JRTRNNConfig(
            WIDTH, num_heads=2, feature_dim=4, use_short_conv=True, prefix_length=4, chunk_size=8
        )
    ),
    "aaren": Aaren(AarenConfig(WIDTH, num_heads=4)),
}
VARIANTS = {
    "hedgehog_bias_identity": Hedgehog(
        HedgehogConfig(
            WIDTH,
            num_heads=4,
            feature_dim=8,
            feature_bias=True,
            identity_init=True,
            impl="parallel",
        )
    ),
    "hedgehog_elu_plus_one": Hedgehog(
        HedgehogConfig(WIDTH, num_heads=4, num_kv_heads=2, feature_map="elu_plus_one", chunk_size=8)
    ),
    "based_window": Based(BasedConfig(WIDTH, num_heads=2, feature_dim=4, window=4, chunk_size=8)),
    "based_symmetric_reference": Based(
        BasedConfig(WIDTH, num_heads=2, feature_dim=4, symmetric_features=True, impl="reference")
    ),
    "lolcats_affine": LoLCATs(
        LoLCATsConfig(
            WIDTH,
            num_heads=2,
            head_dim=8,
            feature_dim=4,
            feature_bias=True,
            window=3,
            affine_factors=True,
            impl="reference",
        )
    ),
    "liger_full_heads": Liger(
        LigerConfig(WIDTH, num_heads=2, head_dim=8, window=3, impl="reference")
    ),
    "jrt_rnn_symmetric": JRTRNN(
        JRTRNNConfig(
            WIDTH, num_heads=2, feature_dim=4, head_dim=8, symmetric_features=True, prefix_length=3
        )
    ),
    "aaren_reference": Aaren(AarenConfig(WIDTH, num_heads=2, head_dim=4, impl="reference")),
}


@pytest.mark.parametrize("name", list(MIXERS))
def test_mixer_contract(name):
    check_mixer(MIXERS[name], name, **CHECK_OPTIONS.get(name[:3], {}))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(VARIANTS))
def test_mixer_variant_contract(name):
    check_mixer(VARIANTS[name], name, **CHECK_OPTIONS.get(name[:3], {}))


def test_hedgehog_feature_map_is_the_op_per_head():
    x = jax.random.normal(jax.random.key(0), (2, 5, 3, 4))
    module = HedgehogFeatureMap(feature_dim=6, use_bias=True)
    params = module.init(jax.random.key(1), x)
    weight = params["params"]["weight"].value
    bias = params["params"]["bias"].value
    assert weight.shape == (3, 4, 6) and bias.shape == (3, 6)
    assert float(jnp.max(jnp.abs(weight))) <= (6 / (4 * 6)) ** 0.5  # LoLCATs' kaiming bound
    np.testing.assert_allclose(module.apply(params, x), hedgehog(x, weight, bias), rtol=1e-6)


def test_hedgehog_feature_map_identity_init():
    x = jnp.zeros((1, 1, 2, 3))
    params = HedgehogFeatureMap(feature_dim=5, identity_init=True).init(jax.random.key(0), x)
    np.testing.assert_array_equal(params["params"]["weight"].value, np.stack([np.eye(3, 5)] * 2))


@pytest.mark.parametrize("name", ["hedgehog", "lolcats", "liger"])
def test_attention_checkpoint_loads(name):
    """The linearized layers keep attention's "q", "k", "v", "o" with attention's shapes."""
    c = MIXERS[name].config
    attention = Attention(AttentionConfig(WIDTH, num_heads=c.num_heads, num_kv_heads=c.kv_heads))
    attention_params, x = mixer_setup(attention)
    params, _ = mixer_setup(MIXERS[name])
    shapes = jax.tree.map(jnp.shape, params["params"])
    for layer, leaves in jax.tree.map(jnp.shape, attention_params["params"]).items():
        assert shapes[layer] == leaves, layer
    loaded = {"params": {**params["params"], **attention_params["params"]}}
    y, _ = MIXERS[name].apply(loaded, x)
    assert bool(jnp.all(jnp.isfinite(y)))


def test_hedgehog_with_elu_plus_one_is_the_naive_swap():
    """No new parameters; normalized causal linear attention of elu(x) + 1 of the rotated q, k
    (as attention rotates them), through W_o."""
    mixer = VARIANTS["hedgehog_elu_plus_one"]
    params, x = mixer_setup(mixer)
    assert sorted(params["params"]) == ["k", "o", "q", "v"]
    y, _ = mixer.apply(params, x)
    p = nn.unbox(params["params"])
    q, k, v = (jnp.einsum("btd,dhk->bthk", x, p[n]["kernel"]) for n in "qkv")
    positions = jnp.broadcast_to(jnp.arange(LENGTH), x.shape[:2])
    q, k = rotary(q, positions), rotary(k, positions)
    k, v = jnp.repeat(k, 2, axis=2), jnp.repeat(v, 2, axis=2)  # 2 query heads per kv head
    scores = jnp.einsum("bthf,bshf->bhts", jax.nn.elu(q) + 1, jax.nn.elu(k) + 1)
    scores = jnp.where(jnp.tril(jnp.ones((LENGTH, LENGTH), bool)), scores, 0.0)
    o = jnp.einsum("bhts,bshv->bthv", scores / scores.sum(-1, keepdims=True), v)
    y_expected = jnp.einsum("bthv,hvd->btd", o, p["o"]["kernel"])
    np.testing.assert_allclose(y, y_expected, rtol=1e-4, atol=1e-5)


def test_liger_adds_no_parameters():
    params, _ = mixer_setup(MIXERS["liger"])
    assert sorted(params["params"]) == ["k", "o", "q", "v"]


def test_liger_is_half_windowed_attention_half_gla():
    """Liger = 0.5 sliding-window attention (the attention layer with the same parameters) +
    0.5 GLA of softmax(q), softmax(k) with the gate logsigmoid(k) / 16, through W_o."""
    liger = MIXERS["liger"]
    c = liger.config
    attention = Attention(
        AttentionConfig(WIDTH, num_heads=c.num_heads, num_kv_heads=c.kv_heads, window=c.window)
    )
    params, x = mixer_setup(liger)
    y, _ = liger.apply(params, x)
    y_attention, _ = attention.apply(params, x)
    p = nn.unbox(params["params"])
    q, k, v = (jnp.einsum("btd,dhk->bthk", x, p[n]["kernel"]) for n in "qkv")
    groups = c.num_heads // c.kv_heads
    k_tilde, v, gk = (
        jnp.repeat(a, groups, axis=2) for a in (jax.nn.softmax(k), v, jax.nn.log_sigmoid(k) / 16)
    )
    o_gla, _ = gla(jax.nn.softmax(q), k_tilde, v, gk, scale=1.0, impl="reference")
    y_gla = jnp.einsum("bthk,hkd->btd", o_gla, p["o"]["kernel"])
    np.testing.assert_allclose(y, 0.5 * y_attention + 0.5 * y_gla, rtol=1e-4, atol=1e-5)


def test_lolcats_window_factor_starts_at_a_tenth():
    params, _ = mixer_setup(MIXERS["lolcats"])
    gamma = jax.nn.sigmoid(params["params"]["window_factor"].value)
    np.testing.assert_allclose(gamma, 0.1, rtol=1e-6)


def test_jrt_rnn_prefix_is_read_non_causally():
    """A token of the prefix sees the prefix tokens after it; no token sees a later token
    outside the prefix."""
    mixer = MIXERS["jrt_rnn"]  # prefix_length 4
    params, x = mixer_setup(mixer)
    y, _ = mixer.apply(params, x)
    in_prefix = x.at[:, 3].add(1.0)
    after = x.at[:, 5].add(1.0)
    y_in, _ = mixer.apply(params, in_prefix)
    y_after, _ = mixer.apply(params, after)
    assert float(jnp.max(jnp.abs(y_in[:, 0] - y[:, 0]))) > 1e-4
    np.testing.assert_allclose(y_after[:, :5], y[:, :5], rtol=1e-5, atol=1e-6)


def test_jrt_rnn_positions_place_the_prefix():
    """Given positions decide the prefix: positions past it make a causal layer."""
    mixer = MIXERS["jrt_rnn"]
    params, x = mixer_setup(mixer)
    late = jnp.broadcast_to(jnp.arange(LENGTH) + 100, x.shape[:2])
    y, _ = mixer.apply(params, x, positions=late)
    y_changed, _ = mixer.apply(params, x.at[:, 3].add(1.0), positions=late)
    np.testing.assert_allclose(y_changed[:, :3], y[:, :3], rtol=1e-5, atol=1e-6)


def test_based_window_covering_the_sequence_is_softmax_attention():
    """With a window as long as the sequence no Taylor term is left: Based's window is causal
    softmax attention of the projected q and k."""
    mixer = Based(BasedConfig(WIDTH, num_heads=2, feature_dim=4, window=LENGTH, chunk_size=8))
    params, x = mixer_setup(mixer)
    y, _ = mixer.apply(params, x)
    p = nn.unbox(params["params"])
    q = jnp.einsum("btd,dhf->bthf", x, p["q"]["kernel"])
    k = jnp.einsum("btd,dhf->bthf", x, p["k"]["kernel"])
    v = jnp.einsum("btd,dhv->bthv", x, p["v"]["kernel"])
    scores = jnp.einsum("bthf,bshf->bhts", q, k) / 2.0  # feature_dim 4: 1 / sqrt(4)
    causal = jnp.tril(jnp.ones((LENGTH, LENGTH), bool))
    weights = jax.nn.softmax(jnp.where(causal, scores, -jnp.inf), axis=-1)
    o = jnp.einsum("bhts,bshv->bthv", weights, v)
    np.testing.assert_allclose(y, jnp.einsum("bthv,hvd->btd", o, p["o"]["kernel"]), atol=1e-5)


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: HedgehogConfig(WIDTH, num_heads=3), "num_heads"),
        (lambda: HedgehogConfig(WIDTH, num_heads=4, num_kv_heads=3), "num_kv_heads"),
        (lambda: HedgehogConfig(WIDTH, feature_dim=0), "feature_dim"),
        (lambda: HedgehogConfig(WIDTH, feature_map="relu"), "feature_map"),
        (lambda: LoLCATsConfig(WIDTH, window=0), "window"),
        (lambda: LoLCATsConfig(WIDTH, impl="parallel"), "impl"),
        (lambda: LigerConfig(WIDTH, gate_logit_normalizer=0.0), "gate_logit_normalizer"),
        (lambda: BasedConfig(WIDTH, feature_dim=0), "feature_dim"),
        (lambda: BasedConfig(WIDTH, window=4, impl="parallel"), "impl"),
        (lambda: BasedConfig(WIDTH, use_short_conv=1), "use_short_conv"),
        (lambda: JRTRNNConfig(WIDTH, use_short_conv=True, conv_size=0), "conv_size"),
        (lambda: JRTRNNConfig(WIDTH, prefix_length=0), "prefix_length"),
        (lambda: JRTRNNConfig(WIDTH, num_heads=5), "num_heads"),
        (lambda: AarenConfig(WIDTH, head_dim=-1), "head_dim"),
        (lambda: AarenConfig(WIDTH, impl="chunked"), "impl"),
    ],
)
def test_bad_config_names_the_field(make, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        make()
