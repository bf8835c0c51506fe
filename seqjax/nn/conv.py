"""Short causal convolution layers (Mamba, DeltaNet, fla's `ShortConvolution`): the depthwise
`causal_conv` of `seqjax.ops.short_conv` (segment-aware, with a decode cache; its halo form
under a sequence mesh) with its kernel as a parameter, then an activation.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from seqjax.nn.layers import dense
from seqjax.ops.short_conv import init_conv_cache
from seqjax.parallel.dispatch import causal_conv

ACTIVATIONS = {"silu": jax.nn.silu, None: lambda x: x}


class ShortConvolution(nn.Module):
    """Depthwise causal convolution over time of `[B, T, D]`, then `activation`.

    Call with `cache` (from `init_conv_cache`, or the previous call) to continue a sequence;
    returns `(y, new_cache)`. Kernel initialized as PyTorch's `Conv1d` (uniform in
    `+-1/sqrt(W)`), the init of the Mamba and fla layers.
    """

    width: int = 4
    activation: str | None = "silu"
    use_bias: bool = False
    axis_name: str | None = "embed"

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        *,
        segment_ids: jax.Array | None = None,
        cache: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"activation: expected one of {list(ACTIVATIONS)}, got {self.activation!r}"
            )
        channels = x.shape[-1]
        bound = self.width**-0.5

        def uniform(key, shape, dtype=jnp.float32):
            return jax.random.uniform(key, shape, dtype, -bound, bound)

        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(uniform, (None, self.axis_name)),
            (self.width, channels),
        )
        bias = None
        if self.use_bias:
            bias = self.param(
                "bias",
                nn.with_logical_partitioning(nn.initializers.zeros, (self.axis_name,)),
                (channels,),
            )
        if cache is None:
            cache = init_conv_cache(x.shape[0], self.width, channels, x.dtype)
        y, cache = causal_conv(x, kernel, bias, cache, segment_ids)
        return ACTIVATIONS[self.activation](y).astype(x.dtype), cache


class ConvolvedProjection(nn.Module):
    """A head projection `x -> [B, T, H, Dh]`, optionally followed by a `ShortConvolution`
    over its flattened channels (the q/k/v path of DeltaNet and of GLA with `use_short_conv`).
    Returns `(y, conv cache or None)`."""

    heads: int
    head_dim: int
    conv: bool
    conv_size: int = 4
    activation: str | None = "silu"

    @nn.compact
    def __call__(
        self, x: jax.Array, segment_ids: jax.Array | None, cache: jax.Array | None
    ) -> tuple[jax.Array, jax.Array | None]:
        y = dense(self.heads * self.head_dim, ("embed", "heads"), "proj")(x)
        if self.conv:
            conv = ShortConvolution(self.conv_size, self.activation, axis_name="heads", name="conv")
            y, cache = conv(y, segment_ids=segment_ids, cache=cache)
        elif self.activation is not None:
            y = ACTIVATIONS[self.activation](y)
        return y.reshape(*y.shape[:2], self.heads, self.head_dim), cache


def project_heads(
    x: jax.Array,
    segment_ids: jax.Array | None,
    heads: int,
    head_dim: int,
    name: str,
    conv_size: int | None,
    activation: str | None,
    tail: jax.Array | None,
) -> tuple[jax.Array, jax.Array | None]:
    """`x W_name: [B, T, heads, head_dim]`: a `dense` submodule `name` of the calling compact
    module (`[D, heads, head_dim]` kernel), or with `conv_size` a `ConvolvedProjection` whose
    short convolution of that width (then `activation`) continues from the cache's `tail`.
    Returns `(y, new tail or None)`."""
    if conv_size is None:
        return dense((heads, head_dim), ("embed", "heads", "kv"), name)(x), None
    projection = ConvolvedProjection(heads, head_dim, True, conv_size, activation, name=name)
    return projection(x, segment_ids, tail)


def init_conv_tails(batch: int, conv_size: int | None, channels: tuple[int, ...], dtype) -> tuple:
    """The empty tails of `project_heads` convolutions, one per projection of `channels`
    (`heads * head_dim`) channels, `[B, conv_size - 1, channels]`; Nones without `conv_size`."""
    if conv_size is None:
        return (None,) * len(channels)
    return tuple(init_conv_cache(batch, conv_size, width, dtype) for width in channels)
