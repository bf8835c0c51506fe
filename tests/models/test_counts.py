"""Parameter counts of published configs, from shapes alone, and decode-state sizes."""

from __future__ import annotations

import pytest

from seqjax.models import LanguageModelConfig, parameter_count, state_size

# flame's configs/{gla,delta_net}_340M.json (fla's training configs): width 1024, 24 layers,
# vocabulary 32000, tied embeddings, SwiGLU of 4x width * 2/3 rounded up to a multiple of 256.
FLA_340M = dict(vocab_size=32000, width=1024, mlp_multiple_of=256, tie_embeddings=True)
# The Mamba paper's sizes (Gu & Dao, Table 12; state-spaces/mamba-*): vocabulary 50280, tied
# embeddings, blocks without MLP.
MAMBA = dict(vocab_size=50280, tie_embeddings=True)
PUBLISHED = {
    "mamba_130M": (LanguageModelConfig(width=768, layers=("mamba",) * 24, **MAMBA), 130e6),
    "mamba_370M": (LanguageModelConfig(width=1024, layers=("mamba",) * 48, **MAMBA), 370e6),
    "mamba2_130M": (LanguageModelConfig(width=768, layers=("mamba2",) * 24, **MAMBA), 130e6),
    "gla_340M": (LanguageModelConfig(layers=("gla",) * 24, **FLA_340M), 340e6),
    "delta_net_340M": (
        LanguageModelConfig(
            layers=("delta_net",) * 24, mixer_options={"delta_net": {"num_heads": 8}}, **FLA_340M
        ),
        340e6,
    ),
}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_parameter_count_matches_the_published_size(name):
    config, published = PUBLISHED[name]
    count = parameter_count(config)
    assert abs(count / published - 1) < 0.02, f"{name}: {count:,} vs {published:,.0f}"


def test_mamba_130m_has_exactly_mamba_ssm_parameter_count():
    config, _ = PUBLISHED["mamba_130M"]
    assert parameter_count(config) == 129_135_360  # state-spaces/mamba-130m


def test_state_size_grows_only_with_attention():
    recurrent = LanguageModelConfig(37, 32, ("gla", "gla"), mixer_options={"gla": {"num_heads": 2}})
    # GLA: H * K * V = 2 * 8 * 16 per layer, no convolution.
    assert state_size(recurrent, 10) == state_size(recurrent, 1000) == 2 * (2 * 8 * 16)
    hybrid = LanguageModelConfig(
        37, 32, ("gla", "attention"), mixer_options={"gla": {"num_heads": 2}}
    )
    grows = state_size(hybrid, 100) - state_size(hybrid, 10)
    assert grows == 90 * 2 * 32  # keys and values of width 32 per token
