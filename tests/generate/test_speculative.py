"""Speculative decoding: the target's greedy output at temperature 0, the target's distribution
when sampling (a chi-squared test), stop tokens, and bad requests."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from small_mixers import SMALL, VOCAB, WIDTH

from seqjax.generate.engine import generate
from seqjax.generate.samplers import RepetitionPenalty, Sampler
from seqjax.generate.speculative import speculative_generate
from seqjax.models import LanguageModelConfig, build

GREEDY = Sampler(greedy=True)


def model_and_params(layers, vocab=VOCAB, seed=1):
    model = build(LanguageModelConfig(vocab, WIDTH, layers, mixer_options=SMALL))
    params = model.init(jax.random.key(seed), jnp.zeros((1, 8), jnp.int32))["params"]
    return model, params


def test_greedy_speculative_decoding_is_the_targets_greedy_output():
    target, target_params = model_and_params(("gla", "attention"), seed=1)
    draft, draft_params = model_and_params(("gla",), seed=2)
    prompt = jax.random.randint(jax.random.key(0), (2, 6), 0, VOCAB)
    lengths = jnp.array([6, 2])
    options = dict(max_new_tokens=9, sampler=GREEDY, rng=jax.random.key(0), prompt_lengths=lengths)
    expected = generate(target, target_params, prompt, **options)
    out = speculative_generate(
        target, target_params, draft, draft_params, prompt, gamma=3, **options
    )
    np.testing.assert_array_equal(out.tokens, expected.tokens)
    np.testing.assert_array_equal(out.lengths, 9)
    assert np.all(out.accepted <= out.proposed)


@pytest.mark.slow
def test_the_draft_itself_as_draft_accepts_every_greedy_proposal():
    target, params = model_and_params(("gla",))
    prompt = jax.random.randint(jax.random.key(0), (2, 5), 0, VOCAB)
    out = speculative_generate(
        target,
        params,
        target,
        params,
        prompt,
        max_new_tokens=8,
        sampler=GREEDY,
        rng=jax.random.key(0),
        gamma=3,
    )
    np.testing.assert_array_equal(out.accepted, out.proposed)


def test_sampled_tokens_follow_the_targets_distribution():
    """The first two tokens of 8000 independent rows against the target's joint
    distribution `p(x1) p(x2 | x1)` over a 5-token vocabulary, with a draft that disagrees
    with it: a chi-squared test at significance 0.001 over the 25 cells."""
    vocab, rows = 5, 8000
    target, target_params = model_and_params(("gla",), vocab=vocab, seed=1)
    draft, draft_params = model_and_params(("gla",), vocab=vocab, seed=7)
    prompt = jnp.array([[1, 3, 0, 2]])
    out = speculative_generate(
        target,
        target_params,
        draft,
        draft_params,
        jnp.repeat(prompt, rows, axis=0),
        max_new_tokens=2,
        sampler=Sampler(),
        rng=jax.random.key(3),
        gamma=3,
    )
    acceptance = float(jnp.sum(out.accepted) / jnp.sum(out.proposed))
    assert 0.0 < acceptance < 1.0, acceptance

    def next_probs(tokens):
        logits, _ = target.apply({"params": target_params}, tokens)
        return np.asarray(jax.nn.softmax(logits[:, -1]), np.float64)

    first = next_probs(prompt)[0]
    continued = jnp.concatenate([jnp.repeat(prompt, vocab, 0), jnp.arange(vocab)[:, None]], 1)
    expected = (first[:, None] * next_probs(continued)).ravel() * rows
    observed = np.bincount(np.asarray(out.tokens[:, 0] * vocab + out.tokens[:, 1]), minlength=25)
    statistic = float(np.sum((observed - expected) ** 2 / expected))
    critical = 51.18  # chi-squared, 24 degrees of freedom, upper 0.001 quantile
    assert statistic < critical, (statistic, observed, expected.round())


@pytest.mark.slow
def test_a_stop_token_ends_the_row():
    target, target_params = model_and_params(("gla",), seed=1)
    draft, draft_params = model_and_params(("gla",), seed=2)
    prompt = jax.random.randint(jax.random.key(0), (2, 5), 0, VOCAB)
    options = dict(max_new_tokens=8, sampler=GREEDY, rng=jax.random.key(0))
    free = generate(target, target_params, prompt, **options)
    stop = int(free.tokens[0, 3])
    expected = generate(target, target_params, prompt, stop_tokens=(stop,), pad_token=-1, **options)
    out = speculative_generate(
        target,
        target_params,
        draft,
        draft_params,
        prompt,
        stop_tokens=(stop,),
        pad_token=-1,
        gamma=3,
        **options,
    )
    np.testing.assert_array_equal(out.tokens, expected.tokens)
    np.testing.assert_array_equal(out.lengths, expected.lengths)


@pytest.mark.parametrize(
    ("draft_vocab", "changes", "message"),
    [
        (VOCAB + 1, {}, r"draft: its vocabulary \(38 tokens\) differs"),
        (VOCAB, {"gamma": 0}, "gamma: expected a positive"),
        (VOCAB, {"max_new_tokens": -2}, "max_new_tokens: expected an int >= 0"),
        (
            VOCAB,
            {"sampler": Sampler(processors=(RepetitionPenalty(1.3),))},
            "sampler: speculative decoding needs stateless processors",
        ),
    ],
)
def test_a_bad_request_is_named(draft_vocab, changes, message):
    target, params = model_and_params(("gla",))
    draft, draft_params = model_and_params(("gla",), vocab=draft_vocab)
    arguments = {"max_new_tokens": 4, "sampler": GREEDY, "rng": jax.random.key(0), **changes}
    prompt = jnp.zeros((1, 3), jnp.int32)
    with pytest.raises(ValueError, match=message):
        speculative_generate(target, params, draft, draft_params, prompt, **arguments)
