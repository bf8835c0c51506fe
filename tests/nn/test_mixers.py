"""The attention, GLA and delta-rule mixers: the mixer contract (`mixer_checks`), and bad configs
name their field."""

from __future__ import annotations

import pytest
from mixer_checks import WIDTH, check_mixer

from seqjax.nn.attention import Attention, AttentionConfig
from seqjax.nn.delta_net import DeltaNet, DeltaNetConfig
from seqjax.nn.gated_delta_net import GatedDeltaNet, GatedDeltaNetConfig
from seqjax.nn.gla import GLA, GLAConfig

# One representative config per mixer runs by default; the variants are `slow`.
MIXERS = {
    "attention": Attention(
        AttentionConfig(WIDTH, num_heads=4, num_kv_heads=2, window=5, use_short_conv=True)
    ),
    "gla": GLA(GLAConfig(WIDTH, num_heads=2, use_short_conv=True, chunk_size=8)),
    "delta_net": DeltaNet(DeltaNetConfig(WIDTH, num_heads=2, allow_neg_eigval=True, chunk_size=8)),
    "gated_delta_net": GatedDeltaNet(
        GatedDeltaNetConfig(WIDTH, num_heads=2, head_dim=8, allow_neg_eigval=True, chunk_size=8)
    ),
}
VARIANTS = {
    "attention_full": Attention(AttentionConfig(WIDTH, num_heads=4)),
    "gla_no_conv": GLA(GLAConfig(WIDTH, num_heads=2, chunk_size=8)),
    "delta_net_gate": DeltaNet(DeltaNetConfig(WIDTH, num_heads=2, use_gate=True, chunk_size=8)),
}


@pytest.mark.parametrize("name", list(MIXERS))
def test_mixer_contract(name):
    check_mixer(MIXERS[name], name)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(VARIANTS))
def test_mixer_variant_contract(name):
    check_mixer(VARIANTS[name], name)


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: AttentionConfig(WIDTH, num_heads=3), "num_heads"),
        (lambda: AttentionConfig(WIDTH, num_heads=4, num_kv_heads=3), "num_kv_heads"),
        (lambda: AttentionConfig(WIDTH, window=0), "window"),
        (lambda: AttentionConfig(WIDTH, use_short_conv=True, conv_size=0), "conv_size"),
        (lambda: GLAConfig(WIDTH, num_heads=3), "expand_k"),
        (lambda: GLAConfig(WIDTH, impl="fast"), "impl"),
        (lambda: DeltaNetConfig(WIDTH, expand_k=0.3), "expand_k"),
        (lambda: DeltaNetConfig(WIDTH, conv_size=0), "conv_size"),
        (lambda: GatedDeltaNetConfig(WIDTH, head_dim=8, expand_v=0.3), "expand_v"),
    ],
)
def test_bad_config_names_the_field(make, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        make()
