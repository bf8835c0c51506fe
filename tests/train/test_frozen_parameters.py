"""Frozen parameters (`optimizer(frozen=...)`, `config.optimizer.frozen`): zero updates, no
weight decay, no share of the clipping norm; patterns that match nothing fail by name."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from seqjax.train.config import default_config, validate
from seqjax.train.loop import make_optimizer
from seqjax.train.optimizer import optimizer, path_name

FROZEN = (r"mixer/(q|k)/", r"^backbone/embed/")
SETTINGS = dict(learning_rate=1e-2, weight_decay=0.1, warmup_steps=0, total_steps=10)


def small_params(boxed: bool = False):
    """A parameter tree shaped like a language model's: embedding, two mixers, a head."""
    keys = iter(jax.random.split(jax.random.key(0), 16))

    def leaf(shape, names):
        value = jax.random.normal(next(keys), shape)
        return nn.Partitioned(value, names) if boxed else value

    def mixer():
        projections = {n: {"kernel": leaf((8, 2, 4), ("embed", "heads", "kv"))} for n in "qkv"}
        return {**projections, "o": {"kernel": leaf((2, 4, 8), ("heads", "kv", "embed"))}}

    groups = {
        f"groups_{i}": {
            "block_0": {"mixer": mixer(), "mixer_norm": {"weight": leaf((8,), ("embed",))}}
        }
        for i in range(2)
    }
    embed = {"embed": {"embedding": leaf((11, 8), ("vocab", "embed"))}}
    return {"backbone": {**embed, **groups}, "head": {"kernel": leaf((8, 11), ("embed", "vocab"))}}


def loss(params):
    """A loss with a gradient for every parameter."""
    return sum(jnp.sum(jnp.sin(leaf) ** 2) for leaf in jax.tree.leaves(params))


def is_frozen(path) -> bool:
    name = path_name(path)
    return "mixer/q/" in name or "mixer/k/" in name or name.startswith("backbone/embed/")


def test_frozen_parameters_do_not_move_and_the_others_do():
    params = small_params()
    tx = optimizer(**SETTINGS, frozen=FROZEN)

    @jax.jit
    def step(params, state):
        updates, state = tx.update(jax.grad(loss)(params), state, params)
        return optax.apply_updates(params, updates), state

    trained, state = params, tx.init(params)
    for _ in range(3):
        trained, state = step(trained, state)
    moved = jax.tree_util.tree_map_with_path(
        lambda path, a, b: (is_frozen(path), bool(jnp.any(a != b))), params, trained
    )
    flags = jax.tree.leaves(moved, is_leaf=lambda x: isinstance(x, tuple))
    assert sum(frozen for frozen, _ in flags) == 2 * 2 + 1  # q and k of two layers, the embedding
    for frozen, changed in flags:
        assert changed != frozen


def test_frozen_gradients_take_no_part_in_the_update_of_the_others():
    """The trained leaves update as if the frozen ones had zero gradient (clipping included:
    the frozen gradients are large enough to dominate the global norm)."""
    params = small_params()
    grads = jax.grad(loss)(params)
    grads = jax.tree_util.tree_map_with_path(
        lambda path, g: 1e3 * jnp.ones_like(g) if is_frozen(path) else g, grads
    )
    zeroed = jax.tree_util.tree_map_with_path(
        lambda path, g: jnp.zeros_like(g) if is_frozen(path) else g, grads
    )
    frozen_tx, plain_tx = optimizer(**SETTINGS, frozen=FROZEN), optimizer(**SETTINGS)
    updates, _ = jax.jit(frozen_tx.update)(grads, frozen_tx.init(params), params)
    expected, _ = jax.jit(plain_tx.update)(zeroed, plain_tx.init(params), params)

    def compare(path, update, reference):
        if is_frozen(path):
            np.testing.assert_array_equal(update, 0.0)
        else:
            np.testing.assert_allclose(update, reference, rtol=1e-6, atol=1e-9)

    jax.tree_util.tree_map_with_path(compare, updates, expected)


def test_the_optimizer_state_of_boxed_parameters_keeps_their_boxes():
    """`abstract_state` initializes the optimizer on boxed parameters, by shapes alone."""
    shapes = jax.eval_shape(optimizer(**SETTINGS, frozen=FROZEN).init, small_params(boxed=True))
    leaves = jax.tree.leaves(shapes, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert any(isinstance(leaf, nn.Partitioned) for leaf in leaves)


@pytest.mark.parametrize(
    "frozen, message",
    [
        ((r"mixer/q/", r"mixer/gate/"), r"^optimizer\.frozen: pattern 'mixer/gate/' matches no"),
        ((r"mixer/(q",), r"^optimizer\.frozen: 'mixer/\(q' is not a regular expression"),
        ("mixer/q/", r"^optimizer\.frozen: expected a tuple of regular expressions"),
    ],
)
def test_bad_patterns_name_optimizer_frozen(frozen, message):
    with pytest.raises(ValueError, match=message):
        optimizer(**SETTINGS, frozen=frozen).init(small_params())


def test_config_validation_names_the_field():
    config = default_config()
    config.optimizer.frozen = ("[",)
    with pytest.raises(ValueError, match=r"^config\.optimizer\.frozen: '\[' is not a regular"):
        validate(config)


def test_the_training_loop_freezes_what_the_config_names():
    config = default_config()
    config.optimizer.frozen = FROZEN
    config.optimizer.warmup_steps = 0  # a first step of learning rate 0 would move nothing
    tx, _ = make_optimizer(config)
    params = small_params()
    updates, _ = jax.jit(tx.update)(jax.grad(loss)(params), tx.init(params), params)
    flags = jax.tree_util.tree_map_with_path(
        lambda path, u: (is_frozen(path), bool(jnp.any(u != 0))), updates
    )
    for frozen, moved in jax.tree.leaves(flags, is_leaf=lambda x: isinstance(x, tuple)):
        assert moved != frozen
