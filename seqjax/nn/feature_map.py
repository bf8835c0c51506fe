"""Learnable feature maps for linear attention: Hedgehog's map, in the form of the LoLCATs code.

Per head `h`, with a learned `W_h: [K, F]` (and an optional bias `b_h: [F]`),

    z = x W_h + b_h,      phi(x) = [softmax(z), softmax(-z)]       ([..., H, K] -> [..., H, 2F])

each softmax over the F axis: the map of LoLCATs (Zhang et al., "LoLCATs: On Low-Rank
Linearizing of Large Language Models"; HazyResearch/lolcats `src/model/feature_map.py`,
`FeatureMapMLP` with the `softmax_dim` activation), which is what `seqjax.ops.feature_maps.hedgehog`
computes. The Hedgehog paper (Zhang et al., "The Hedgehog & the Porcupine") writes
`[exp(z), exp(-z)]`, fla's `HedgehogFeatureMap` `softmax([2z, -2z])`; those are other maps.

Initialization as LoLCATs' released configs: `W` kaiming-uniform as PyTorch draws it for a
`[H, K, F]` tensor (fan-in `K * F`, bound `sqrt(6 / (K F))`), or the identity `eye(K, F)` per
head with `identity_init` (LoLCATs' `zero_init`, fla's init). The bias is zero-initialized: the
configs use none (LoLCATs' own bias is one scalar per head, which the softmax ignores), so
here it is the paper's per-feature `b`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from seqjax.ops.feature_maps import hedgehog


def kaiming_uniform_3d(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    """PyTorch's `kaiming_uniform_` (a = 0) of a `[H, K, F]` tensor: fan-in `K * F`."""
    _, fan_in, receptive = shape
    bound = (6.0 / (fan_in * receptive)) ** 0.5
    return jax.random.uniform(key, shape, dtype, -bound, bound)


def identity_3d(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    """`eye(K, F)` for every head of a `[H, K, F]` tensor."""
    del key
    heads, rows, cols = shape
    return jnp.broadcast_to(jnp.eye(rows, cols, dtype=dtype), (heads, rows, cols))


class HedgehogFeatureMap(nn.Module):
    """`phi: [B, T, H, K] -> [B, T, H, 2 feature_dim]`, one learned map per head (module
    docstring). Parameters: "weight" `[H, K, F]` and, with `use_bias`, "bias" `[H, F]`."""

    feature_dim: int = 64
    use_bias: bool = False
    identity_init: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        heads, key_dim = x.shape[-2:]
        init = identity_3d if self.identity_init else kaiming_uniform_3d
        weight = self.param(
            "weight",
            nn.with_logical_partitioning(init, ("heads", "kv", None)),
            (heads, key_dim, self.feature_dim),
        )
        bias = None
        if self.use_bias:
            bias = self.param(
                "bias",
                nn.with_logical_partitioning(nn.initializers.zeros, ("heads", None)),
                (heads, self.feature_dim),
            )
        return hedgehog(x, weight, bias)
