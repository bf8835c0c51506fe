"""Griffin's recurrent block (De et al., "Griffin: Mixing Gated Linear Recurrences with Local
Attention for Efficient Language Models"; google-deepmind/recurrentgemma `jax/modules.py`
`RecurrentBlock` and `jax/layers.py` `RGLRU`, `Conv1D`, `BlockDiagonalLinear`).

With `E = lru_width` (the width by default):

    y = GELU(x W_y + b_y)                                    [B, T, E]
    u = conv1d(x W_x + b_x)                                  (causal, width 4, with bias)
    gate_x, gate_a = u W_ix + b_ix, u W_ia + b_ia            (block-diagonal, num_heads blocks)
    h = rg_lru(u, gate_x, gate_a, a_param)                   (c = 8; a = sigmoid(-a_param)
                                                              initialized in [0.9, 0.999])
    out = (h * y) W_out + b_out

The projections are initialized normal with variance `1 / fan_in` (`W_out` scaled by
`final_w_init_variance_scale`, which Griffin sets to `2 / num_layers`), the convolution with
variance `0.01 / 4`, biases at zero. Griffin's residual block has an MLP (a gated GeLU MLP)
after this temporal-mixing block.

The state restarts at every segment start and at a row's first token when the cache is empty
(recurrentgemma resets where `segment_pos == 0`): there the RG-LRU's input is not normalized,
so the cache counts the tokens it has seen.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from seqjax.nn.layers import Initializer, dense
from seqjax.nn.mixer import frozen, positive, require
from seqjax.ops.common import SCAN_OP_IMPLS
from seqjax.ops.rg_lru import rg_lru_step
from seqjax.ops.short_conv import init_conv_cache
from seqjax.parallel.dispatch import causal_conv, rg_lru

HEAD_DIM = 128  # Griffin's fixed head dimension: the default number of gate blocks


@frozen
class RGLRUConfig:
    """`lru_width` None means `width`; `num_heads` (the gates' diagonal blocks) None means
    `lru_width // 128`, at least 1; `min_rad`, `max_rad`: the ring of the initial `a`."""

    width: int
    num_heads: int | None = None
    lru_width: int | None = None
    conv_size: int = 4
    min_rad: float = 0.9
    max_rad: float = 0.999
    final_w_init_variance_scale: float = 1.0
    impl: str = "auto"
    chunk_size: int = 64

    def __post_init__(self):
        positive(self, "width", "conv_size", "chunk_size")
        if self.lru_width is not None:
            positive(self, "lru_width")
        if self.num_heads is not None:
            positive(self, "num_heads")
        require(
            self.recurrent_width % self.heads == 0,
            "num_heads",
            f"{self.heads} must divide lru_width = {self.recurrent_width}",
        )
        require(
            0 < self.min_rad < self.max_rad < 1,
            "min_rad",
            f"need 0 < min_rad < max_rad < 1, got {self.min_rad}, {self.max_rad}",
        )
        require(
            self.final_w_init_variance_scale > 0,
            "final_w_init_variance_scale",
            f"must be positive, got {self.final_w_init_variance_scale}",
        )
        require(self.impl in SCAN_OP_IMPLS, "impl", f"expected one of {SCAN_OP_IMPLS}")

    @property
    def recurrent_width(self) -> int:
        return self.lru_width or self.width

    @property
    def heads(self) -> int:
        return self.num_heads or max(1, self.recurrent_width // HEAD_DIM)


class RGLRUCache(NamedTuple):
    """`state: [B, E]` float32, the convolution's tail `[B, W - 1, E]` and the number of tokens
    seen `length: [B]` int32."""

    state: jax.Array
    conv: jax.Array
    length: jax.Array


def fan_in_normal(scale: float = 1.0) -> Initializer:
    return nn.initializers.variance_scaling(scale, "fan_in", "normal")


def ring_a_param_init(min_rad: float, max_rad: float) -> Initializer:
    """`a_param = softplus^-1(-log a)`, `a^2` uniform in `[min_rad^2, max_rad^2]`."""

    def init(key, shape, dtype=jnp.float32):
        u = jax.random.uniform(key, shape, dtype)
        log_a = 0.5 * jnp.log(u * (max_rad**2 - min_rad**2) + min_rad**2 + 1e-8)
        return jnp.log(jnp.expm1(-log_a))

    return init


class BlockDiagonalLinear(nn.Module):
    """`x [..., E] -> [..., E]` by `num_blocks` independent `E/n x E/n` blocks, plus a bias."""

    num_blocks: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        size = x.shape[-1] // self.num_blocks
        w = self.param(
            "w",
            nn.with_logical_partitioning(fan_in_normal(), ("heads", None, None)),
            (self.num_blocks, size, size),
        )
        b = self.param(
            "b",
            nn.with_logical_partitioning(nn.initializers.zeros, ("heads", None)),
            (self.num_blocks, size),
        )
        blocks = x.reshape(*x.shape[:-1], self.num_blocks, size)
        y = jnp.einsum("...hi,hij->...hj", blocks, w.astype(x.dtype)) + b.astype(x.dtype)
        return y.reshape(x.shape)


class RGLRU(nn.Module):
    config: RGLRUConfig

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        *,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
        cache: RGLRUCache | None = None,
    ) -> tuple[jax.Array, RGLRUCache]:
        del positions  # no position embedding
        c = self.config
        batch, length, _ = x.shape
        inner = c.recurrent_width
        projection = dict(use_bias=True, kernel_init=fan_in_normal())
        y = dense(inner, ("embed", "mlp"), "linear_y", **projection)(x)
        y = jax.nn.gelu(y.astype(jnp.float32)).astype(x.dtype)
        u = dense(inner, ("embed", "mlp"), "linear_x", **projection)(x)
        kernel = self.param(
            "conv_kernel",
            nn.with_logical_partitioning(fan_in_normal(0.01), (None, "mlp")),
            (c.conv_size, inner),
        )
        bias = self.param(
            "conv_bias", nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)), (inner,)
        )
        tail = init_conv_cache(batch, c.conv_size, inner, x.dtype) if cache is None else cache.conv
        u, tail = causal_conv(u, kernel, bias, tail, segment_ids)
        u = u.astype(x.dtype)
        gate_x = BlockDiagonalLinear(c.heads, name="input_gate")(u)
        gate_a = BlockDiagonalLinear(c.heads, name="a_gate")(u)
        a_param = self.param(
            "a_param",
            nn.with_logical_partitioning(ring_a_param_init(c.min_rad, c.max_rad), ("mlp",)),
            (inner,),
        )
        h, state = self.recurrence(u, gate_x, gate_a, a_param, cache, segment_ids)
        out_init = fan_in_normal(c.final_w_init_variance_scale)
        out = dense(c.width, ("mlp", "embed"), "linear_out", use_bias=True, kernel_init=out_init)
        seen = jnp.zeros((batch,), jnp.int32) if cache is None else cache.length
        return out(h * y), RGLRUCache(state, tail, seen + length)

    def recurrence(self, u, gate_x, gate_a, a_param, cache, segment_ids):
        """`rg_lru` (its step for one token with a cache). A row whose cache is empty starts a
        segment at its first token, which the op does when it is given no state: both forms
        are computed and each row takes its own."""
        c = self.config
        if cache is None:
            return rg_lru(
                u,
                gate_x,
                gate_a,
                a_param,
                segment_ids=segment_ids,
                impl=c.impl,
                chunk_size=c.chunk_size,
            )
        if u.shape[1] == 1:
            args = (u[:, 0], gate_x[:, 0], gate_a[:, 0], a_param)
            (fresh, fresh_state), (continued, state) = (
                rg_lru_step(*args, initial) for initial in (None, cache.state)
            )
            fresh, continued = fresh[:, None], continued[:, None]
        else:
            options = dict(segment_ids=segment_ids, impl=c.impl, chunk_size=c.chunk_size)
            (fresh, fresh_state), (continued, state) = (
                rg_lru(u, gate_x, gate_a, a_param, initial, **options)
                for initial in (None, cache.state)
            )
        empty = cache.length == 0
        h = jnp.where(empty[:, None, None], fresh, continued)
        return h, jnp.where(empty[:, None], fresh_state, state)

    def init_cache(self, batch_size: int, max_length: int, dtype=jnp.float32) -> RGLRUCache:
        del max_length  # the state does not grow
        c = self.config
        inner = c.recurrent_width
        return RGLRUCache(
            jnp.zeros((batch_size, inner), jnp.float32),
            init_conv_cache(batch_size, c.conv_size, inner, dtype),
            jnp.zeros((batch_size,), jnp.int32),
        )
