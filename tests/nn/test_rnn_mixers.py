"""The xLSTM (mLSTM, sLSTM) and head-wise LSTM and GRU mixers: the mixer contract
(`mixer_checks`), the reference inits, and bad configs name their field."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from mixer_checks import WIDTH, check_mixer, mixer_setup

from seqjax.nn.mlstm import MLSTM, MLSTMConfig
from seqjax.nn.rnn import GRU, LSTM, SLSTM, GRUConfig, LSTMConfig, SLSTMConfig

# One representative config per mixer runs by default; the variants are `slow`.
MIXERS = {
    "mlstm": MLSTM(MLSTMConfig(WIDTH, num_heads=2, chunk_size=8)),
    "slstm": SLSTM(SLSTMConfig(WIDTH, num_heads=2)),
    "lstm": LSTM(LSTMConfig(WIDTH, num_heads=2)),
    "gru": GRU(GRUConfig(WIDTH, num_heads=2)),
}
VARIANTS = {
    "mlstm_options": MLSTM(
        MLSTMConfig(
            WIDTH,
            num_heads=4,
            proj_factor=1.5,
            round_up_to=16,
            qkv_proj_blocksize=8,
            conv_size=2,
            use_bias=True,
            num_blocks=3,
            impl="parallel",
        )
    ),
    "mlstm_reference": MLSTM(MLSTMConfig(WIDTH, num_heads=2, impl="reference")),
    "slstm_no_conv_deep": SLSTM(
        SLSTMConfig(WIDTH, num_heads=4, conv_size=0, layer_idx=2, num_layers=3, impl="reference")
    ),
    "lstm_one_head": LSTM(LSTMConfig(WIDTH, head_dim=8, impl="reference")),
    "gru_one_head": GRU(GRUConfig(WIDTH, head_dim=8, impl="reference")),
}


@pytest.mark.parametrize("name", list(MIXERS))
def test_mixer_contract(name):
    check_mixer(MIXERS[name], name)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(VARIANTS))
def test_mixer_variant_contract(name):
    check_mixer(VARIANTS[name], name)


def test_mlstm_gates_start_as_the_reference():
    params, _ = mixer_setup(MIXERS["mlstm"])
    p = params["params"]
    np.testing.assert_allclose(p["fgate"]["bias"].value, [3.0, 6.0])
    np.testing.assert_array_equal(p["fgate"]["kernel"].value, 0.0)
    np.testing.assert_array_equal(p["igate"]["kernel"].value, 0.0)
    assert p["proj_up"]["kernel"].value.shape == (WIDTH, 2, 64)  # 2 * 32 rounded up to 64


def test_slstm_forget_bias_is_the_depth_dependent_power_law():
    def forget_bias(layer_idx):
        mixer = SLSTM(SLSTMConfig(WIDTH, num_heads=2, layer_idx=layer_idx, num_layers=3))
        params, _ = mixer_setup(mixer)
        bias = params["params"]["bias"].value  # [H, 4, D]
        assert float(jnp.abs(bias[:, [0, 2, 3]]).max()) == 0.0
        return np.asarray(bias[0, 1])

    first, last = forget_bias(0), forget_bias(2)
    fraction = np.linspace(0, 1, WIDTH // 2)
    np.testing.assert_allclose(first, 5 - 12 * fraction**0.3, rtol=1e-6)
    np.testing.assert_allclose(last, 5 - 12 * fraction**1.6, rtol=1e-6)


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: MLSTMConfig(WIDTH, num_heads=3), "num_heads"),
        (lambda: MLSTMConfig(WIDTH, qkv_proj_blocksize=5), "qkv_proj_blocksize"),
        (lambda: MLSTMConfig(WIDTH, proj_factor=0.0), "proj_factor"),
        (lambda: MLSTMConfig(WIDTH, impl="fast"), "impl"),
        (lambda: SLSTMConfig(WIDTH, num_heads=3), "num_heads"),
        (lambda: SLSTMConfig(WIDTH, conv_size=-1), "conv_size"),
        (lambda: SLSTMConfig(WIDTH, layer_idx=3, num_layers=3), "layer_idx"),
        (lambda: LSTMConfig(WIDTH, num_heads=5), "num_heads"),
        (lambda: GRUConfig(WIDTH, head_dim=0), "head_dim"),
        (lambda: GRUConfig(WIDTH, impl="chunked"), "impl"),
    ],
)
def test_bad_config_names_the_field(make, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        make()
