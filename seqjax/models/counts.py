"""Model sizes computed from shapes alone (`jax.eval_shape`: nothing is allocated)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from seqjax.models.language_model import LanguageModel, LanguageModelConfig


def _floating_size(tree) -> int:
    return sum(
        math.prod(leaf.shape)
        for leaf in jax.tree.leaves(tree)
        if jnp.issubdtype(leaf.dtype, jnp.inexact)
    )


def parameter_count(config: LanguageModelConfig) -> int:
    """The number of parameters of the language model `config` describes."""
    model = LanguageModel(config)
    tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    shapes = jax.eval_shape(lambda t: model.init(jax.random.key(0), t), tokens)
    return _floating_size(shapes)


def state_size(config: LanguageModelConfig, length: int) -> int:
    """The number of values in the decode cache of one sequence of up to `length` tokens:
    recurrent states and convolution tails (constant in `length`) and attention's keys and
    values (`length` slots, or the window's). Integer bookkeeping is not counted."""
    cache = jax.eval_shape(lambda: LanguageModel(config).init_cache(1, length))
    return _floating_size(cache.layers)
