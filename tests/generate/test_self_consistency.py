"""Self-consistency voting over sampled completions."""

from __future__ import annotations

from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
from small_mixers import SMALL, VOCAB, WIDTH

from seqjax.generate import Sampler, generate, make_sampler, self_consistency
from seqjax.models import LanguageModelConfig, build


def test_the_vote_is_the_most_common_extracted_answer():
    model = build(LanguageModelConfig(VOCAB, WIDTH, ("gla",), mixer_options=SMALL))
    params = model.init(jax.random.key(1), jnp.zeros((1, 4), jnp.int32))["params"]
    prompt = jax.random.randint(jax.random.key(0), (2, 5), 0, VOCAB)
    sampler = make_sampler(temperature=2.0)
    options = dict(max_new_tokens=3, sampler=sampler, rng=jax.random.key(4))

    def first_token_mod_3(tokens):
        return tokens[0] % 3

    votes = self_consistency(
        model, params, prompt, num_samples=16, extract_answer=first_token_mod_3, **options
    )
    samples = generate(model, params, jnp.repeat(prompt, 16, axis=0), **options).tokens
    for row, vote in enumerate(votes):
        answers = [int(t) % 3 for t in np.asarray(samples[16 * row : 16 * (row + 1), 0])]
        assert vote.answers == answers
        assert len(set(answers)) > 1  # temperature 2 on a random model: the samples differ
        expected, count = Counter(answers).most_common(1)[0]
        assert (vote.answer, vote.votes) == (expected, count)


def test_completions_without_an_answer_do_not_vote():
    model = build(LanguageModelConfig(VOCAB, WIDTH, ("gla",), mixer_options=SMALL))
    params = model.init(jax.random.key(1), jnp.zeros((1, 4), jnp.int32))["params"]
    votes = self_consistency(
        model,
        params,
        jnp.zeros((1, 3), jnp.int32),
        num_samples=4,
        extract_answer=lambda tokens: None,
        max_new_tokens=2,
        sampler=Sampler(greedy=True),
        rng=jax.random.key(0),
    )
    assert votes[0].answer is None and votes[0].votes == 0 and votes[0].answers == [None] * 4
