"""The decoding engine: greedy generation against an argmax over the full parallel pass, the
prefill against stepping the prompt, ragged prompts, stop tokens, streaming, bad requests."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from contract import assert_trees_close
from small_mixers import SMALL, VOCAB, WIDTH

from seqjax.generate.engine import generate, right_align, stream
from seqjax.generate.samplers import Sampler
from seqjax.models import MIXERS, LanguageModelConfig, build

GREEDY = Sampler(greedy=True)
HYBRID = ("gla", "attention")


def model_and_params(layers, *, window=None, seed=1):
    options = dict(SMALL)
    if window is not None:
        options["attention"] = {**SMALL["attention"], "window": window}
    model = build(LanguageModelConfig(VOCAB, WIDTH, layers, mixer_options=options))
    params = model.init(jax.random.key(seed), jnp.zeros((1, 8), jnp.int32))["params"]
    return model, params


def prompts(batch=2, length=7, seed=0):
    return jax.random.randint(jax.random.key(seed), (batch, length), 0, VOCAB)


def full_pass_logits(model, params, prompt, prompt_lengths, generated):
    """The logits of one parallel call over each row's prompt (right-aligned, its padding in
    its own segment) followed by the generated tokens."""
    tokens, segment_ids, _ = right_align(prompt, prompt_lengths)
    ones = jnp.ones(generated.shape, jnp.int32)
    sequence = jnp.concatenate([tokens, generated], axis=1)
    logits, _ = model.apply(
        {"params": params}, sequence, segment_ids=jnp.concatenate([segment_ids, ones], axis=1)
    )
    return logits[:, prompt.shape[1] - 1 : -1]


def assert_greedy_matches_full_pass(model, params, prompt, prompt_lengths, new_tokens):
    """Every emitted token is the argmax of the full pass at its position, up to the first
    position whose top two logits are within float noise (a tie may go either way, and the
    continuations then differ legitimately); log-probabilities are the full pass's."""
    out = generate(
        model,
        params,
        prompt,
        max_new_tokens=new_tokens,
        sampler=GREEDY,
        rng=jax.random.key(0),
        prompt_lengths=prompt_lengths,
    )
    logits = full_pass_logits(model, params, prompt, prompt_lengths, out.tokens)
    top2 = jnp.sort(logits, axis=-1)[..., -2:]
    near_tie = np.asarray(top2[..., 1] - top2[..., 0] < 1e-4)
    expected = np.asarray(jnp.argmax(logits, axis=-1))
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    expected_log_probs = np.take_along_axis(np.asarray(log_probs), expected[..., None], -1)[..., 0]
    for row in range(prompt.shape[0]):
        ties = np.flatnonzero(near_tie[row])
        upto = ties[0] + 1 if ties.size else new_tokens
        np.testing.assert_array_equal(out.tokens[row, :upto], expected[row, :upto])
        np.testing.assert_allclose(
            out.log_probs[row, :upto], expected_log_probs[row, :upto], rtol=1e-4, atol=1e-4
        )
    np.testing.assert_array_equal(out.lengths, new_tokens)


def test_greedy_generation_of_a_hybrid_equals_the_argmax_of_the_full_pass():
    model, params = model_and_params(HYBRID, window=5)
    prompt = prompts(batch=3, length=9)
    assert_greedy_matches_full_pass(model, params, prompt, jnp.array([9, 4, 1]), 6)


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(MIXERS))
def test_greedy_generation_equals_the_argmax_of_the_full_pass(kind):
    model, params = model_and_params((kind, kind))
    prompt = prompts(batch=2, length=9)
    # JRT-RNN reads its first `prefix_length` (8) tokens bidirectionally: a full pass is
    # causal only after them, so its prompts must cover the prefix.
    lengths = [9, 8] if kind == "jrt_rnn" else [9, 5]
    assert_greedy_matches_full_pass(model, params, prompt, jnp.array(lengths), 5)


def assert_prefill_equals_stepping(layers, window=None):
    """The cache and next-token logits of one prefill call equal stepping the prompt token by
    token from the same empty cache."""
    model, params = model_and_params(layers, window=window)
    prompt = prompts(batch=2, length=9)
    capacity = 12
    apply = jax.jit(lambda tokens, cache: model.apply({"params": params}, tokens, cache=cache))
    empty = model.init_cache(2, capacity)
    prefilled_logits, prefilled = apply(prompt, empty)
    cache = empty
    for t in range(prompt.shape[1]):
        logits, cache = apply(prompt[:, t : t + 1], cache)
    assert_trees_close(prefilled_logits[:, -1], logits[:, -1], 1e-4, "next-token logits")
    assert_trees_close(prefilled, cache, 1e-4, "cache")


def test_prefill_of_a_hybrid_equals_stepping_the_prompt():
    # A window of 4 over 9 prompt tokens: the attention cache is a ring buffer that wrapped.
    assert_prefill_equals_stepping(HYBRID, window=4)


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(MIXERS))
def test_prefill_equals_stepping_the_prompt(kind):
    assert_prefill_equals_stepping((kind,))


def test_ragged_prompts_generate_as_each_row_alone():
    model, params = model_and_params(HYBRID, window=5)
    prompt = prompts(batch=2, length=8, seed=3)
    lengths = [8, 3]
    batched = generate(
        model,
        params,
        prompt,
        max_new_tokens=4,
        sampler=GREEDY,
        rng=jax.random.key(0),
        prompt_lengths=jnp.asarray(lengths),
    )
    for row, length in enumerate(lengths):
        alone = generate(
            model,
            params,
            prompt[row : row + 1, :length],
            max_new_tokens=4,
            sampler=GREEDY,
            rng=jax.random.key(0),
        )
        np.testing.assert_array_equal(batched.tokens[row], alone.tokens[0])
        np.testing.assert_allclose(batched.log_probs[row], alone.log_probs[0], atol=1e-5)


def test_a_stop_token_ends_its_row_and_the_rest_is_padding():
    model, params = model_and_params(("gla",))
    prompt = prompts(batch=2, length=5)
    options = dict(max_new_tokens=6, sampler=GREEDY, rng=jax.random.key(0))
    free = generate(model, params, prompt, **options)
    stop = int(free.tokens[0, 2])
    stopped = generate(model, params, prompt, stop_tokens=(stop,), pad_token=-1, **options)
    for row in range(2):
        hits = np.flatnonzero(np.asarray(free.tokens[row]) == stop)
        end = hits[0] + 1 if hits.size else 6
        assert int(stopped.lengths[row]) == end
        np.testing.assert_array_equal(stopped.tokens[row, :end], free.tokens[row, :end])
        np.testing.assert_array_equal(stopped.tokens[row, end:], -1)
        np.testing.assert_array_equal(stopped.log_probs[row, end:], 0.0)


def test_streaming_yields_the_generated_tokens_step_by_step():
    model, params = model_and_params(("gla", "attention"))
    prompt = prompts(batch=2, length=5)
    options = dict(max_new_tokens=5, sampler=GREEDY, rng=jax.random.key(0))
    steps = list(stream(model, params, prompt, **options))
    assert len(steps) == 5
    np.testing.assert_array_equal(
        jnp.stack(steps, axis=1), generate(model, params, prompt, **options).tokens
    )


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"max_new_tokens": -1}, "max_new_tokens: expected an int >= 0"),
        ({"prompt_lengths": jnp.array([3, 3, 3])}, r"prompt_lengths: expected shape \[B\] = \[2\]"),
        ({"prompt_lengths": jnp.array([0, 3])}, r"prompt_lengths: expected values in \[1, P = 5\]"),
        ({"max_length": 6}, "max_length: the prompt .* need 9 positions, more than max_length = 6"),
    ],
)
def test_a_bad_request_is_named(changes, message):
    model, params = model_and_params(("attention",))
    arguments = {"max_new_tokens": 4, "sampler": GREEDY, "rng": jax.random.key(0), **changes}
    with pytest.raises(ValueError, match=message):
        generate(model, params, prompts(batch=2, length=5), **arguments)
