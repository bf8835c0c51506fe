"""Beam search: greedy at width one, exact against brute force over every continuation of a
tiny vocabulary (which checks the cache reordering), ragged prompts, stop tokens, diverse
beam search, bad arguments."""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from small_mixers import SMALL, VOCAB, WIDTH

from seqjax.generate.beam import beam_search
from seqjax.generate.engine import generate
from seqjax.generate.samplers import Sampler
from seqjax.models import MIXERS, LanguageModelConfig, build

# Repeated, so the layer caches are stacked along a leading axis (the batch axis is second).
HYBRID = ("gated_delta_net", "attention", "mamba") * 2
TINY_VOCAB = 5


@functools.cache
def model_and_params(layers, *, vocab_size=VOCAB, window=None):
    options = dict(SMALL)
    if window is not None:
        options["attention"] = {**SMALL["attention"], "window": window}
    model = build(LanguageModelConfig(vocab_size, WIDTH, layers, mixer_options=options))
    # Jitted: initializing the hybrid op by op takes longer than compiling it.
    params = jax.jit(model.init)(jax.random.key(1), jnp.zeros((1, 8), jnp.int32))["params"]
    return model, params


def prompts(batch, length, *, vocab_size=VOCAB, seed=0):
    return jax.random.randint(jax.random.key(seed), (batch, length), 0, vocab_size)


@functools.partial(jax.jit, static_argnums=0)
def token_log_probs(model, params, prompt, continuations):
    """`[M, N]`: each token's log-probability under one parallel call over `prompt: [P]`
    followed by each of `continuations: [M, N]`."""
    sequences = jnp.concatenate(
        [jnp.broadcast_to(prompt, (continuations.shape[0], prompt.shape[0])), continuations], 1
    )
    logits, _ = model.apply({"params": params}, sequences)
    log_probs = jax.nn.log_softmax(logits[:, prompt.shape[0] - 1 : -1], axis=-1)
    return jnp.take_along_axis(log_probs, continuations[..., None], axis=-1)[..., 0]


def exact_hypotheses(model, params, prompt, new_tokens, stop_tokens):
    """Every hypothesis after `prompt: [P]` (a continuation of `new_tokens` tokens, cut after
    its first stop token) and its log-prob, from the full parallel pass over all V^N
    continuations."""
    every = np.array(list(itertools.product(range(TINY_VOCAB), repeat=new_tokens)))
    per_token = np.asarray(token_log_probs(model, params, prompt, jnp.asarray(every)))
    hypotheses = {}
    for tokens, log_probs in zip(every, per_token, strict=True):
        stops = np.flatnonzero(np.isin(tokens, stop_tokens))
        length = stops[0] + 1 if stops.size else new_tokens
        hypotheses[tuple(tokens[:length].tolist())] = log_probs[:length].sum()
    return hypotheses


def assert_wide_beams_are_exact(layers, *, window=None, stop_tokens=(), length_penalty=0.0):
    """With K >= V^(N - 1) beams no live beam is pruned before the last step, so the beams are
    the K best of all hypotheses by score, each with its brute-force log-prob: this checks the
    cache reordering, and that stopped hypotheses keep their scores, are padded and leave the
    live beams their slots."""
    model, params = model_and_params(layers, vocab_size=TINY_VOCAB, window=window)
    # 9 tokens: enough for JRT-RNN's prefix (8), whose decoding equals the parallel pass only
    # once the prefill covers it.
    prompt = prompts(2, 9, vocab_size=TINY_VOCAB)
    new_tokens, width = 3, TINY_VOCAB**2
    result = beam_search(
        model,
        params,
        prompt,
        beam_size=width,
        max_new_tokens=new_tokens,
        length_penalty=length_penalty,
        stop_tokens=stop_tokens,
        pad_token=-1,
    )
    for row in range(prompt.shape[0]):
        exact = exact_hypotheses(model, params, prompt[row], new_tokens, stop_tokens)
        scores = {h: log_prob / len(h) ** length_penalty for h, log_prob in exact.items()}
        ranked = sorted(scores, key=scores.get, reverse=True)
        np.testing.assert_allclose(
            result.scores[row], [scores[h] for h in ranked[:width]], atol=1e-4
        )
        tokens, lengths = result.tokens[row].tolist(), result.lengths[row].tolist()
        returned = [tuple(t[:n]) for t, n in zip(tokens, lengths, strict=True)]
        assert returned[0] == ranked[0]
        np.testing.assert_allclose(result.log_probs[row], [exact[h] for h in returned], atol=1e-4)
        for t, n in zip(tokens, lengths, strict=True):
            assert t[n:] == [-1] * (new_tokens - n)


def test_a_wide_beam_of_a_hybrid_finds_the_best_continuations_exactly():
    # Window 5 over 9 + 3 tokens: the attention cache is a ring buffer that wraps.
    assert_wide_beams_are_exact(HYBRID, window=5)


def test_a_wide_beam_with_stop_tokens_finds_the_best_hypotheses_exactly():
    assert_wide_beams_are_exact(HYBRID, window=5, stop_tokens=(0, 1), length_penalty=1.0)


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(MIXERS))
def test_a_wide_beam_finds_the_best_continuations_exactly(kind):
    assert_wide_beams_are_exact((kind, kind))


def test_a_beam_of_one_is_greedy_decoding():
    model, params = model_and_params(("gla",))
    prompt = prompts(2, 5)
    beams = beam_search(model, params, prompt, beam_size=1, max_new_tokens=4)
    greedy = generate(
        model,
        params,
        prompt,
        max_new_tokens=4,
        sampler=Sampler(greedy=True),
        rng=jax.random.key(0),
    )
    np.testing.assert_array_equal(beams.tokens[:, 0], greedy.tokens)
    np.testing.assert_allclose(beams.log_probs[:, 0], greedy.log_probs.sum(-1), atol=1e-5)
    np.testing.assert_allclose(beams.scores[:, 0], greedy.log_probs.sum(-1) / 4, atol=1e-5)


def test_ragged_prompts_search_as_each_row_alone():
    model, params = model_and_params(("gla",))
    prompt = prompts(2, 5, seed=3)
    lengths = [5, 3]
    options = dict(beam_size=2, max_new_tokens=4)
    batched = beam_search(model, params, prompt, prompt_lengths=jnp.asarray(lengths), **options)
    for row, length in enumerate(lengths):
        alone = beam_search(model, params, prompt[row : row + 1, :length], **options)
        np.testing.assert_array_equal(batched.tokens[row], alone.tokens[0])
        np.testing.assert_allclose(batched.scores[row], alone.scores[0], atol=1e-5)


def test_diverse_beam_search_without_a_penalty_runs_each_group_as_a_plain_search():
    model, params = model_and_params(("gla",))
    prompt = prompts(2, 5)
    options = dict(max_new_tokens=4)
    plain = beam_search(model, params, prompt, beam_size=2, **options)
    diverse = beam_search(model, params, prompt, beam_size=4, num_groups=2, **options)
    for group in (slice(0, 2), slice(2, 4)):
        np.testing.assert_array_equal(diverse.tokens[:, group], plain.tokens)
        np.testing.assert_allclose(diverse.scores[:, group], plain.scores, atol=1e-5)


def test_a_large_diversity_penalty_gives_the_groups_different_first_tokens():
    model, params = model_and_params(("gla",))
    prompt = prompts(2, 5)
    options = dict(beam_size=4, num_groups=2, max_new_tokens=4)
    diverse = beam_search(model, params, prompt, diversity_penalty=100.0, **options)
    for row in range(2):
        first = np.asarray(diverse.tokens[row, :, 0])
        assert not set(first[:2]) & set(first[2:])
    # The penalty selects; the log-probs are still the model's.
    per_token = token_log_probs(model, params, prompt[0], diverse.tokens[0])
    np.testing.assert_allclose(diverse.log_probs[0], per_token.sum(-1), atol=1e-4)


def test_no_new_tokens_give_the_empty_continuation():
    model, params = model_and_params(("gla",))
    result = beam_search(model, params, prompts(2, 5), beam_size=2, max_new_tokens=0)
    assert result.tokens.shape == (2, 2, 0)
    np.testing.assert_array_equal(result.scores, [[0.0, -np.inf]] * 2)
    np.testing.assert_array_equal(result.lengths, 0)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"beam_size": 0}, "beam_size: expected a positive integer"),
        ({"num_groups": 3}, "num_groups: expected a divisor of beam_size = 4, got 3"),
        ({"num_groups": 0}, "num_groups: expected a positive integer"),
        ({"diversity_penalty": -1.0}, "diversity_penalty: expected a finite number >= 0"),
        ({"length_penalty": float("nan")}, "length_penalty: expected a finite number"),
        ({"max_new_tokens": -1}, "max_new_tokens: expected an int >= 0"),
        ({"stop_tokens": (VOCAB,)}, rf"stop_tokens: expected ids in \[0, V = {VOCAB}\)"),
        ({"prompt_lengths": jnp.array([0, 3])}, r"prompt_lengths: expected values in \[1, P"),
        ({"max_length": 6}, "max_length: the prompt .* more than max_length = 6"),
    ],
)
def test_a_bad_argument_is_named(changes, message):
    model, params = model_and_params(("gla",))
    arguments = {"beam_size": 4, "max_new_tokens": 4, **changes}
    with pytest.raises(ValueError, match=message):
        beam_search(model, params, prompts(2, 5), **arguments)
