"""Every mixer layer: finite at init, decoding equals the parallel pass, packed segments equal
separate sequences, and bad configs name their field."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from contract import assert_trees_close

from seqjax.nn.attention import Attention, AttentionConfig
from seqjax.nn.delta_net import DeltaNet, DeltaNetConfig
from seqjax.nn.gated_delta_net import GatedDeltaNet, GatedDeltaNetConfig
from seqjax.nn.gla import GLA, GLAConfig

WIDTH, LENGTH = 32, 13

MIXERS = {
    "attention": Attention(AttentionConfig(WIDTH, num_heads=4, num_kv_heads=2)),
    "attention_window": Attention(AttentionConfig(WIDTH, num_heads=4, window=5)),
    "gla": GLA(GLAConfig(WIDTH, num_heads=2, chunk_size=8)),
    "gla_conv": GLA(GLAConfig(WIDTH, num_heads=2, use_short_conv=True, chunk_size=8)),
    "delta_net": DeltaNet(DeltaNetConfig(WIDTH, num_heads=2, allow_neg_eigval=True, chunk_size=8)),
    "delta_net_gate": DeltaNet(DeltaNetConfig(WIDTH, num_heads=2, use_gate=True, chunk_size=8)),
    "gated_delta_net": GatedDeltaNet(
        GatedDeltaNetConfig(WIDTH, num_heads=2, head_dim=8, allow_neg_eigval=True, chunk_size=8)
    ),
}


def setup(name, batch=2, length=LENGTH):
    mixer = MIXERS[name]
    x = jax.random.normal(jax.random.key(0), (batch, length, WIDTH))
    params = mixer.init(jax.random.key(1), x)
    return mixer, params, x


@pytest.mark.parametrize("name", list(MIXERS))
def test_forward_and_gradient_are_finite_at_init(name):
    mixer, params, x = setup(name)

    def loss(params, x):
        y, _ = mixer.apply(params, x)
        return jnp.sum(y**2)

    y, _ = jax.jit(mixer.apply)(params, x)
    assert y.shape == x.shape and bool(jnp.all(jnp.isfinite(y)))
    grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)
    for leaf in jax.tree.leaves(grads):
        assert bool(jnp.all(jnp.isfinite(leaf)))
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads[0]))


@pytest.mark.parametrize("name", list(MIXERS))
def test_prefill_then_decoding_equals_the_parallel_pass(name):
    mixer, params, x = setup(name)
    expected, _ = jax.jit(mixer.apply)(params, x)
    apply = jax.jit(lambda p, x, c: mixer.apply(p, x, cache=c))
    cache = mixer.init_cache(x.shape[0], LENGTH)
    prefill, cache = apply(params, x[:, :6], cache)
    outputs = [prefill]
    for t in range(6, LENGTH):
        y, cache = apply(params, x[:, t : t + 1], cache)
        outputs.append(y)
    assert_trees_close(jnp.concatenate(outputs, axis=1), expected, 1e-4, f"{name} decode")


@pytest.mark.parametrize("name", list(MIXERS))
def test_packed_segments_equal_separate_sequences(name):
    mixer, params, x = setup(name, batch=1)
    cuts = [0, 4, 5, LENGTH]
    segment_ids = jnp.asarray(np.repeat(np.arange(3), np.diff(cuts))[None])
    packed, _ = jax.jit(lambda p, x, s: mixer.apply(p, x, segment_ids=s))(params, x, segment_ids)
    for start, stop in itertools.pairwise(cuts):
        alone, _ = mixer.apply(params, x[:, start:stop])
        assert_trees_close(packed[:, start:stop], alone, 1e-4, f"{name} [{start}, {stop})")


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: AttentionConfig(WIDTH, num_heads=3), "num_heads"),
        (lambda: AttentionConfig(WIDTH, num_heads=4, num_kv_heads=3), "num_kv_heads"),
        (lambda: AttentionConfig(WIDTH, window=0), "window"),
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
