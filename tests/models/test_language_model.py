"""The language model: hybrids by configuration, scanned groups, decoding, training."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from contract import assert_trees_close
from small_mixers import SMALL, VOCAB, WIDTH

from seqjax.models import MIXERS, LanguageModelConfig, SequenceClassifierConfig, build


def hybrid(**changes) -> LanguageModelConfig:
    """Three mixer kinds, the group repeated twice; the attention layer windowed."""
    options = {**SMALL, "attention": {**SMALL["attention"], "window": 5}}
    fields = dict(vocab_size=VOCAB, width=WIDTH, layers=("gla", "delta_net", "attention") * 2)
    return LanguageModelConfig(**{**fields, "mixer_options": options, **changes})


def tokens(batch=2, length=13, seed=0):
    return jax.random.randint(jax.random.key(seed), (batch, length), 0, VOCAB)


# The default suite's decoding check is the generation engine's (tests/generate/test_engine.py).
@pytest.mark.slow
@pytest.mark.parametrize("scan_layers", [True, False])
def test_hybrid_decodes_like_the_parallel_pass(scan_layers):
    model = build(hybrid(scan_layers=scan_layers))
    x = tokens()
    params = model.init(jax.random.key(1), x)
    expected, _ = jax.jit(model.apply)(params, x)
    assert bool(jnp.all(jnp.isfinite(expected)))
    step = jax.jit(lambda p, t, c: model.apply(p, t, cache=c))
    logits, cache = step(params, x[:, :6], model.init_cache(2, 13))
    outputs = [logits]
    for t in range(6, 13):
        logits, cache = step(params, x[:, t : t + 1], cache)
        outputs.append(logits)
    assert_trees_close(jnp.concatenate(outputs, axis=1), expected, 1e-4, "decoded logits")
    np.testing.assert_array_equal(cache.position, [13, 13])


@pytest.mark.slow  # each mixer's check covers packing; this is the whole model's
def test_hybrid_packed_rows_equal_separate_sequences():
    model = build(hybrid())
    x = tokens(batch=1)
    params = model.init(jax.random.key(1), x)
    cuts = [0, 5, 13]
    segment_ids = jnp.asarray(np.repeat(np.arange(len(cuts) - 1), np.diff(cuts))[None])
    packed, _ = model.apply(params, x, segment_ids=segment_ids)
    for start, stop in itertools.pairwise(cuts):
        alone, _ = model.apply(params, x[:, start:stop])
        assert_trees_close(packed[:, start:stop], alone, 1e-4, f"segment [{start}, {stop})")


def loss_fn(model):
    def loss(params, x):
        logits, _ = model.apply(params, x[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, x[:, 1:]).mean()

    return loss


def test_hybrid_trains_and_remat_keeps_the_gradients():
    x = tokens(batch=4, length=9)
    layers = ("gla", "attention")
    model = build(hybrid(layers=layers))
    params = model.init(jax.random.key(1), x)
    value_and_grad = jax.jit(jax.value_and_grad(loss_fn(model)))
    first, grads = value_and_grad(params, x)
    rematted = jax.jit(jax.grad(loss_fn(build(hybrid(layers=layers, remat="full")))))(params, x)
    assert_trees_close(rematted, grads, 1e-5, "remat gradients")
    optimizer = optax.adam(3e-3)
    state = optimizer.init(params)
    for _ in range(3):
        updates, state = optimizer.update(grads, state)
        params = optax.apply_updates(params, updates)
        later, grads = value_and_grad(params, x)
    assert float(later) < float(first)


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(MIXERS))
def test_two_layer_model_overfits_a_tiny_batch(kind):
    config = LanguageModelConfig(VOCAB, WIDTH, (kind, kind), mixer_options={kind: SMALL[kind]})
    model = build(config)
    x = tokens(batch=4, length=24, seed=3)
    params = model.init(jax.random.key(1), x)
    optimizer = optax.adam(1e-2)
    state = optimizer.init(params)
    value_and_grad = jax.value_and_grad(loss_fn(model))

    @jax.jit
    def train_step(params, state):
        value, grads = value_and_grad(params, x)
        updates, state = optimizer.update(grads, state)
        return optax.apply_updates(params, updates), state, value

    first = None
    for _ in range(300):
        params, state, value = train_step(params, state)
        first = float(value) if first is None else first
    assert float(value) < first / 5, f"{kind}: loss {first:.3f} -> {float(value):.3f}"


@pytest.mark.parametrize(
    "change, field",
    [
        (dict(layers=("gla", "mamba3")), "layers"),
        (dict(mixer_options={"gla": {"window": 4}}), "mixer_options.gla.window"),
        (dict(mixer_options={"attention": {"num_heads": 5}}), "mixer_options.attention.num_heads"),
        (dict(mixer_options={"nope": {}}), "mixer_options"),
        (dict(vocab_size=None), "vocab_size"),
        (dict(mlp_hidden=0), "mlp_hidden"),
        (dict(remat="some"), "remat"),
    ],
)
def test_bad_config_names_the_field(change, field):
    fields = dict(vocab_size=VOCAB, width=WIDTH, layers=("gla", "attention"))
    with pytest.raises(ValueError, match=f"^{field}"):
        LanguageModelConfig(**{**fields, **change})


@pytest.mark.parametrize(
    "bad, error, message",
    [
        (jnp.zeros((2, 9), jnp.float32), TypeError, r"^tokens: expected integer token ids"),
        (jnp.zeros((2, 9, 1), jnp.int32), ValueError, r"^tokens: expected token ids \[B, T\]"),
    ],
)
def test_bad_tokens_are_named(bad, error, message):
    model = build(LanguageModelConfig(VOCAB, WIDTH, ("gla",), mixer_options=SMALL))
    params = model.init(jax.random.key(1), tokens())
    with pytest.raises(error, match=message):
        model.apply(params, bad)


def test_blocks_without_mlp_and_the_sequence_classifier():
    config = hybrid(layers=("gla", "attention"), mlp=False)
    params = build(config).init(jax.random.key(1), tokens())
    assert not any(
        "mlp" in jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)
    )
    features = jax.random.normal(jax.random.key(2), (2, 9, 5))
    mask = jnp.arange(9)[None] < jnp.asarray([[4], [9]])
    classifier = build(
        SequenceClassifierConfig(
            None, WIDTH, ("gla",), mixer_options=SMALL, num_classes=3, pooling="last"
        )
    )
    params = classifier.init(jax.random.key(1), features)
    logits = jax.jit(classifier.apply)(params, features, mask=mask)
    assert logits.shape == (2, 3)
    # The last valid token of a right-padded row sees exactly the unpadded sequence.
    alone = classifier.apply(params, features[:1, :4])
    assert_trees_close(logits[:1], alone, 1e-5, "right padding")
    with pytest.raises(ValueError, match=r"^inputs: expected features \[B, T, F\]"):
        classifier.apply(params, tokens())


@pytest.mark.slow
def test_hgrn_lower_bounds_are_one_model_parameter_through_scanned_groups():
    config = LanguageModelConfig(VOCAB, WIDTH, ("hgrn", "gla") * 2, mixer_options=SMALL)
    model = build(config)
    x = tokens()
    params = model.init(jax.random.key(1), x)
    bounds = params["params"]["backbone"]["lower_bounds_hgrn"]
    assert bounds.value.shape == (2, WIDTH)
    expected, _ = jax.jit(model.apply)(params, x)
    step = jax.jit(lambda p, t, c: model.apply(p, t, cache=c))
    logits, cache = step(params, x[:, :6], model.init_cache(2, 13))
    outputs = [logits]
    for t in range(6, 13):
        logits, cache = step(params, x[:, t : t + 1], cache)
        outputs.append(logits)
    assert_trees_close(jnp.concatenate(outputs, axis=1), expected, 1e-4, "decoded logits")
    grads = jax.grad(loss_fn(model))(params, x)
    assert float(jnp.abs(grads["params"]["backbone"]["lower_bounds_hgrn"].value).max()) > 0


def test_transnormer_layers_get_their_depth():
    config = LanguageModelConfig(VOCAB, WIDTH, ("transnormer", "gla") * 2, mixer_options=SMALL)
    depths = [(c.layer_idx, c.num_layers) for n, c in config.layer_specs() if n == "transnormer"]
    assert depths == [(0, 4), (2, 4)]
    with pytest.raises(ValueError, match=r"^mixer_options.transnormer.layer_idx"):
        LanguageModelConfig(
            VOCAB, WIDTH, ("transnormer",), mixer_options={"transnormer": {"layer_idx": 1}}
        )


@pytest.mark.parametrize("scan_layers", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_mom_load_balancing_losses_are_sown_from_every_layer(scan_layers):
    config = LanguageModelConfig(
        VOCAB, WIDTH, ("mom", "mom"), mixer_options=SMALL, scan_layers=scan_layers
    )
    model = build(config)
    x = tokens()
    params = model.init(jax.random.key(1), x)
    _, sown = model.apply(params, x, mutable=["intermediates"])
    losses = jax.tree.leaves(sown)
    assert sum(leaf.size for leaf in losses) == 2
    assert all(bool(jnp.all(leaf > 0)) for leaf in losses)
