"""A language model's training gradient on a `data x fsdp x tensor x sequence` mesh of 8
devices (run by `test_sequence_parallel.py`): parameters sharded by the logical rules, tokens
split over rows and time; it equals one device's, and the partitioner never falls back to
replicating an operand whole (it did for the token-embedding gather)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from small_mixers import SMALL, VOCAB, WIDTH

from seqjax.models import LanguageModelConfig, build
from seqjax.parallel import LOGICAL_RULES, batch_sharding, make_mesh, shardings_of


def test_a_sharded_gradient_equals_one_device_without_full_rematerialization(capfd):
    model = build(LanguageModelConfig(VOCAB, WIDTH, ("gla", "attention"), mixer_options=SMALL))
    tokens = jax.random.randint(jax.random.key(0), (4, 16), 0, VOCAB)
    boxed = jax.jit(model.init)(jax.random.key(1), tokens)["params"]

    def loss(params, tokens):
        logits, _ = model.apply({"params": params}, tokens)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[..., None], -1))

    step = jax.jit(jax.value_and_grad(loss))
    expected = step(nn.unbox(boxed), tokens)

    mesh = make_mesh(data=1, fsdp=2, tensor=2, sequence=2)
    params = jax.device_put(nn.unbox(boxed), shardings_of(boxed, mesh, LOGICAL_RULES))
    assert not params["backbone"]["embed"]["embedding"].sharding.is_fully_replicated
    capfd.readouterr()
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
        got = step(params, jax.device_put(tokens, batch_sharding(mesh)))
    # XLA's partitioner logs this warning (to the process's stderr) when it gives up on a
    # sharding transition and gathers the operand on every device.
    assert "Involuntary full rematerialization" not in capfd.readouterr().err
    np.testing.assert_allclose(got[0], expected[0], rtol=1e-5)
    for have, want in zip(jax.tree.leaves(got[1]), jax.tree.leaves(expected[1]), strict=True):
        np.testing.assert_allclose(have, want, rtol=2e-4, atol=2e-5)
