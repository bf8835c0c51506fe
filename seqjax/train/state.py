"""The train state and its placement on a mesh."""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import Mesh

from seqjax.parallel import shardings_of


class TrainState(struct.PyTreeNode):
    """Everything a step changes: `step` (int32 scalar), `params`, `opt_state`."""

    step: jax.Array
    params: Any
    opt_state: Any


def _boxed_state(model: nn.Module, optimizer: optax.GradientTransformation, rng, tokens):
    params = model.init(rng, tokens)["params"]
    return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params))


def abstract_state(
    model: nn.Module, optimizer: optax.GradientTransformation, length: int, mesh: Mesh
) -> tuple[TrainState, TrainState]:
    """The state's shapes and its shardings on `mesh`, from shapes alone (no parameters are
    made): `(abstract, shardings)`, each a `TrainState`; `abstract` holds
    `jax.ShapeDtypeStruct`s carrying the shardings, ready for a checkpoint restore."""
    tokens = jax.ShapeDtypeStruct((1, length), jnp.int32)
    init = functools.partial(_boxed_state, model, optimizer)
    boxed = jax.eval_shape(init, jax.random.key(0), tokens)
    shardings = shardings_of(boxed, mesh)
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        nn.unbox(boxed),
        shardings,
    )
    return abstract, shardings


def init_state(
    model: nn.Module,
    optimizer: optax.GradientTransformation,
    rng: jax.Array,
    length: int,
    shardings: TrainState,
) -> TrainState:
    """A fresh state, each array made directly in its shard (no host-side full copy)."""

    def init(rng):
        tokens = jnp.zeros((1, length), jnp.int32)
        return nn.unbox(_boxed_state(model, optimizer, rng, tokens))

    return jax.jit(init, out_shardings=shardings)(rng)
