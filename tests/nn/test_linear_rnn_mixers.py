"""The fixed- and data-dependent-decay linear RNN mixers: RetNet, TransNormer (lightning
attention), LightNet, HGRN and HGRN2. The mixer contract (`mixer_checks`), what each adds to
it, and bad configs name their field."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from contract import assert_trees_close
from mixer_checks import WIDTH, check_mixer, mixer_setup

from seqjax.nn.hgrn import HGRN, HGRNConfig, log_forget_gate
from seqjax.nn.hgrn2 import HGRN2, HGRN2Config
from seqjax.nn.lightnet import LightNet, LightNetConfig, running_log_normalizer
from seqjax.nn.retnet import RetNet, RetNetConfig
from seqjax.nn.transnormer import TransNormer, TransNormerConfig
from seqjax.ops.gla import gla


class LowerBounded(nn.Module):
    """A mixer called as a model calls its layer `l > 0`: with a fixed forget-gate
    `lower_bound`, spread over `bounds` across the channels."""

    mixer: Any
    bounds: tuple[float, float] = (0.05, 0.9)

    def __call__(self, x, *, segment_ids=None, positions=None, cache=None):
        bound = jnp.linspace(*self.bounds, self.mixer.config.lower_bound_width)
        return self.mixer(
            x, segment_ids=segment_ids, positions=positions, cache=cache, lower_bound=bound
        )

    def init_cache(self, batch_size: int, max_length: int, dtype=jnp.float32):
        return self.mixer.init_cache(batch_size, max_length, dtype)


# One representative config per mixer runs by default; the variants are `slow`.
MIXERS = {
    "retnet": RetNet(RetNetConfig(WIDTH, num_heads=2, num_kv_heads=1, chunk_size=8)),
    "transnormer": TransNormer(
        TransNormerConfig(WIDTH, num_heads=4, layer_idx=1, num_layers=3, chunk_size=8)
    ),
    "lightnet": LightNet(LightNetConfig(WIDTH, expand_ratio=8, gate_low_rank=8, chunk_size=8)),
    "hgrn": LowerBounded(HGRN(HGRNConfig(WIDTH))),
    "hgrn2": LowerBounded(HGRN2(HGRN2Config(WIDTH, expand_ratio=8, chunk_size=8))),
}
VARIANTS = {
    "retnet_conv_no_gate": RetNet(
        RetNetConfig(
            WIDTH,
            num_heads=2,
            expand_v=1.0,
            use_short_conv=True,
            use_output_gate=False,
            rope_base=500.0,
            norm_eps=1e-5,
            impl="reference",
        )
    ),
    "transnormer_one_layer": TransNormer(
        TransNormerConfig(WIDTH, num_heads=2, norm_eps=1e-5, impl="parallel")
    ),
    "lightnet_conv_heads": LightNet(
        LightNetConfig(
            WIDTH,
            num_heads=2,
            expand_ratio=4,
            gate_low_rank=4,
            use_short_conv=True,
            conv_size=3,
            norm_eps=1e-5,
            impl="reference",
        )
    ),
    "hgrn_conv_expanded_unbounded": HGRN(
        HGRNConfig(
            WIDTH,
            expand_ratio=2.0,
            use_short_conv=True,
            norm_eps=1e-5,
            impl="chunked",
            chunk_size=8,
        )
    ),
    "hgrn_zero_bound": LowerBounded(HGRN(HGRNConfig(WIDTH, impl="reference")), (0.0, 0.0)),
    "hgrn2_conv_heads": LowerBounded(
        HGRN2(
            HGRN2Config(WIDTH, num_heads=2, expand_ratio=4, use_short_conv=True, impl="reference")
        )
    ),
    "hgrn2_unbounded": HGRN2(HGRN2Config(WIDTH, expand_ratio=16, impl="chunked", chunk_size=4)),
}


@pytest.mark.parametrize("name", list(MIXERS))
def test_mixer_contract(name):
    check_mixer(MIXERS[name], name)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(VARIANTS))
def test_mixer_variant_contract(name):
    check_mixer(VARIANTS[name], name)


def test_retnet_rotary_sees_relative_positions_within_the_segment():
    mixer = MIXERS["retnet"]
    params, x = mixer_setup(mixer)
    positions = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
    implicit, _ = mixer.apply(params, x)
    shifted, _ = mixer.apply(params, x, positions=positions + 3)
    stretched, _ = mixer.apply(params, x, positions=2 * positions)
    assert_trees_close(shifted, implicit, 1e-5, "retnet shifted positions")
    assert not np.allclose(stretched, implicit, atol=1e-3), "retnet ignores positions"


def test_transnormer_decay_depends_on_the_layer():
    first = TransNormer(TransNormerConfig(WIDTH, num_heads=4, layer_idx=0, num_layers=3))
    last = TransNormer(TransNormerConfig(WIDTH, num_heads=4, layer_idx=2, num_layers=3))
    params, x = mixer_setup(first)
    y_first, _ = first.apply(params, x)
    y_last, _ = last.apply(params, x)
    assert not np.allclose(y_first, y_last, atol=1e-3)


def test_lightnet_normalizer_is_a_logsumexp_restarting_at_segments():
    k = jax.random.normal(jax.random.key(2), (1, 7, 2, 3))
    initial = jax.random.normal(jax.random.key(3), (1, 2, 3))
    segment_ids = jnp.asarray([[0, 0, 0, 1, 1, 2, 2]])
    log_z, log_alpha = running_log_normalizer(k, initial, segment_ids)
    expected = np.concatenate(
        [
            np.logaddexp.accumulate(np.concatenate([initial[:, None], k[:, :3]], 1), 1)[:, 1:],
            np.logaddexp.accumulate(k[:, 3:5], 1),
            np.logaddexp.accumulate(k[:, 5:], 1),
        ],
        axis=1,
    )
    assert_trees_close(log_z, expected, 1e-5, "log Z")
    previous = np.concatenate([initial[:, None], expected[:, :-1]], 1)
    starts = np.asarray([0, 0, 0, 1, 0, 1, 0], bool)[None, :, None, None]
    assert_trees_close(log_alpha, np.where(starts, 0.0, previous - expected), 1e-5, "log alpha")


def test_lightnet_gla_form_is_the_normalized_additive_sum():
    q, k = jax.random.normal(jax.random.key(4), (2, 1, 6, 2, 4))
    v = jax.random.normal(jax.random.key(5), (1, 6, 2, 5))
    log_z, log_alpha = running_log_normalizer(k, None, None)
    o, _ = gla(q, jnp.exp(k - log_z), v, log_alpha, scale=1.0, impl="chunked", chunk_size=4)
    numerator = jnp.cumsum(jnp.exp(k)[..., None] * v[..., None, :], axis=1)  # [B, T, H, K, V]
    state = numerator / jnp.exp(log_z)[..., None]
    assert_trees_close(o, jnp.einsum("bthk,bthkv->bthv", q, state), 1e-5, "additive form")


def test_lower_bound_gate_is_gamma_plus_the_rest_of_a_sigmoid():
    logits = jnp.linspace(-30.0, 30.0, 7)
    gamma = jnp.linspace(0.0, 0.95, 7)
    expected = gamma + (1 - gamma) * jax.nn.sigmoid(logits)
    assert_trees_close(jnp.exp(log_forget_gate(logits, gamma)), expected, 1e-6, "forget gate")
    unbounded = log_forget_gate(logits, None)
    assert_trees_close(log_forget_gate(logits, jnp.zeros(7)), unbounded, 1e-6, "zero bound")
    grad = jax.grad(lambda g: jnp.sum(log_forget_gate(logits, g)))(jnp.zeros(7))
    assert bool(jnp.all(jnp.isfinite(grad)))


def test_lower_bound_of_the_wrong_width_names_the_argument():
    mixer = HGRN(HGRNConfig(WIDTH))
    params, x = mixer_setup(mixer)
    with pytest.raises(ValueError, match=r"^lower_bound:"):
        mixer.apply(params, x, lower_bound=jnp.zeros(WIDTH + 1))


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: RetNetConfig(WIDTH, num_heads=3), "expand_k"),
        (lambda: RetNetConfig(WIDTH, num_heads=4, num_kv_heads=3), "num_kv_heads"),
        (lambda: RetNetConfig(WIDTH, impl="fast"), "impl"),
        (lambda: TransNormerConfig(WIDTH, num_heads=5), "num_heads"),
        (lambda: TransNormerConfig(WIDTH, layer_idx=3, num_layers=3), "layer_idx"),
        (lambda: TransNormerConfig(WIDTH, num_layers=0), "num_layers"),
        (lambda: LightNetConfig(WIDTH), "expand_ratio"),
        (lambda: LightNetConfig(WIDTH, num_heads=3, expand_ratio=8), "num_heads"),
        (lambda: LightNetConfig(WIDTH, expand_ratio=8, gate_low_rank=0), "gate_low_rank"),
        (lambda: HGRNConfig(WIDTH, expand_ratio=0.01), "expand_ratio"),
        (lambda: HGRNConfig(WIDTH, impl="parallel"), "impl"),
        (lambda: HGRN2Config(WIDTH, num_heads=3, expand_ratio=8), "num_heads"),
        (lambda: HGRN2Config(WIDTH, expand_ratio=8, norm_eps=0.0), "norm_eps"),
    ],
)
def test_bad_config_names_the_field(make, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        make()
