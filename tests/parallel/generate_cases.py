"""Generation on a mesh of 8 devices (run by `test_sequence_parallel.py`): parameters sharded
by the logical rules over `data x fsdp x tensor`, prompts split over the data axes, and the
engine, beam search and speculative decoding emit what they emit on one device."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from small_mixers import SMALL, VOCAB, WIDTH

from seqjax.generate import Sampler, beam_search, generate, speculative_generate
from seqjax.models import LanguageModelConfig, build
from seqjax.parallel import LOGICAL_RULES, batch_sharding, make_mesh, shardings_of

GREEDY = Sampler(greedy=True)


def model_and_params(layers, seed=1):
    model = build(LanguageModelConfig(VOCAB, WIDTH, layers, mixer_options=SMALL))
    tokens = jnp.zeros((1, 8), jnp.int32)
    boxed = jax.jit(model.init)(jax.random.key(seed), tokens)["params"]
    return model, boxed


def sharded(boxed, mesh):
    """The parameters placed by the logical rules, as the train state is."""
    return jax.device_put(nn.unbox(boxed), shardings_of(boxed, mesh, LOGICAL_RULES))


@pytest.mark.slow
def test_generation_with_sharded_parameters_and_batches_equals_one_device():
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    model, boxed = model_and_params(("gla", "attention"))
    draft, draft_boxed = model_and_params(("gla",), seed=2)
    prompt = jax.random.randint(jax.random.key(0), (8, 6), 0, VOCAB)
    lengths = jnp.array([6, 3, 5, 6, 1, 2, 4, 6])
    options = dict(max_new_tokens=5, rng=jax.random.key(0), prompt_lengths=lengths)
    params, draft_params = nn.unbox(boxed), nn.unbox(draft_boxed)
    expected = (
        generate(model, params, prompt, sampler=GREEDY, **options),
        beam_search(model, params, prompt[:4], beam_size=3, max_new_tokens=4),
        speculative_generate(model, params, draft, draft_params, prompt, sampler=GREEDY, **options),
    )
    placed = jax.device_put(prompt, batch_sharding(mesh))
    params, draft_params = sharded(boxed, mesh), sharded(draft_boxed, mesh)
    assert not params["backbone"]["embed"]["embedding"].sharding.is_fully_replicated
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
        got = (
            generate(model, params, placed, sampler=GREEDY, **options),
            beam_search(model, params, placed[:4], beam_size=3, max_new_tokens=4),
            speculative_generate(
                model, params, draft, draft_params, placed, sampler=GREEDY, **options
            ),
        )
    for want, have in zip(expected, got, strict=True):
        np.testing.assert_array_equal(have.tokens, want.tokens)
        np.testing.assert_array_equal(have.lengths, want.lengths)
    np.testing.assert_allclose(got[0].log_probs, expected[0].log_probs, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[1].log_probs, expected[1].log_probs, rtol=1e-5, atol=1e-5)
