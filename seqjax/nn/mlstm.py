"""The mLSTM layer of xLSTM (Beck et al., "xLSTM: Extended Long Short-Term Memory"; NX-AI/xlstm
`xlstm/blocks/mlstm/layer.py` and `cell.py`): the pre-up-projection block's mixer.

    x_m, z = x W_up                         [B, T, E] each, E = proj_factor * d rounded up to 64
    c      = SiLU(conv(x_m))                (causal depthwise convolution of width 4, with bias)
    q, k   = c W_q, c W_k,   v = x_m W_v    (block-diagonal: blocks of qkv_proj_blocksize = 4)
    i, f   = [q, k, v] W_i + b_i,  [q, k, v] W_f + b_f                      [B, T, H]
    h      = mlstm(q, k, v, i, f)           (`seqjax.ops.mlstm`, heads of E / H)
    y      = ((GroupNorm(h) + s * c) * SiLU(z)) W_down                       (s: learnable skip)

GroupNorm is a LayerNorm per head (xLSTM's `MultiHeadLayerNorm`, eps 1e-5, weight, no bias).
Inits as the reference: `W_up` and `W_q, W_k, W_v` normal with std `sqrt(2 / (5 d))` ("small
init"), `W_down` normal with std `2 / num_blocks / sqrt(d)` ("Wang init"), the gates' weights
zero, the forget-gate bias `linspace(3, 6, H)`, the input-gate bias normal with std 0.1, the
skip ones. The xLSTM mLSTM block is this layer alone: no MLP follows it.

The block-diagonal projection and the per-head LayerNorm are shared with `seqjax.nn.rnn`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from seqjax.nn.conv import ShortConvolution
from seqjax.nn.layers import Dense, Initializer, dense
from seqjax.nn.matrix_state import recur
from seqjax.nn.mixer import frozen, positive, require
from seqjax.ops.mlstm import MLSTM_IMPLS, MLSTMState, mlstm, mlstm_step
from seqjax.ops.short_conv import init_conv_cache


def small_init(width: int) -> Initializer:
    """Normal with std `sqrt(2 / (5 width))` (Nguyen & Salazar, "Transformers without Tears")."""
    return nn.initializers.normal(math.sqrt(2 / (5 * width)))


def wang_init(width: int, num_blocks: int) -> Initializer:
    """Normal with std `2 / num_blocks / sqrt(width)` (GPT-NeoX's output-projection init)."""
    return nn.initializers.normal(2 / num_blocks / math.sqrt(width))


class HeadwiseDense(nn.Module):
    """A block-diagonal projection (xLSTM's `LinearHeadwiseExpand`): the last axis split into
    `blocks` equal blocks, each mapped by its own square matrix. `[..., F] -> [..., F]`.
    `axis_name` names the blocks' axis."""

    blocks: int
    kernel_init: Initializer
    axis_name: str | None
    use_bias: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        size = x.shape[-1] // self.blocks
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(self.kernel_init, (self.axis_name, None, None)),
            (self.blocks, size, size),
        )
        blocks = x.reshape(*x.shape[:-1], self.blocks, size)
        y = jnp.einsum("...bi,bio->...bo", blocks, kernel.astype(x.dtype))
        if self.use_bias:
            bias = self.param(
                "bias",
                nn.with_logical_partitioning(nn.initializers.zeros, (self.axis_name, None)),
                (self.blocks, size),
            )
            y = y + bias.astype(x.dtype)
        return y.reshape(x.shape)


class MultiHeadLayerNorm(nn.Module):
    """LayerNorm of each head of `[..., H, D]` over its `D` channels, in float32, with a weight
    per channel and no bias (xLSTM's `MultiHeadLayerNorm`, a group norm with one group per
    head). Returns float32."""

    eps: float = 1e-5

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        weight = self.param(
            "weight",
            nn.with_logical_partitioning(nn.initializers.ones, ("heads", "kv")),
            x.shape[-2:],
        )
        xf = x.astype(jnp.float32)
        centered = xf - jnp.mean(xf, axis=-1, keepdims=True)
        variance = jnp.mean(centered * centered, axis=-1, keepdims=True)
        return centered * jax.lax.rsqrt(variance + self.eps) * weight


def gate_projection(heads: int, bias_init: Initializer, name: str) -> Dense:
    """xLSTM's input or forget gate: `[q, k, v]` (stacked `[..., 3, E]`) to `[..., H]`, zero
    weights, bias from `bias_init` (its input is float32)."""
    return dense(
        heads,
        (None, "mlp", "heads"),
        name,
        axis=(-2, -1),
        use_bias=True,
        kernel_init=nn.initializers.zeros,
        bias_init=bias_init,
    )


def forget_bias_init(key, shape, dtype=jnp.float32):
    """`linspace(3, 6, H)`: forget gates sigmoid(3) to sigmoid(6) at init."""
    del key
    return jnp.linspace(3.0, 6.0, shape[0], dtype=dtype)


def input_bias_init(key, shape, dtype=jnp.float32):
    return 0.1 * jax.random.normal(key, shape, dtype)


@frozen
class MLSTMConfig:
    """`proj_factor * width`, rounded up to a multiple of `round_up_to`, is the inner width `E`
    (heads of `E / num_heads`); `qkv_proj_blocksize` the block size of the q, k, v projections;
    `conv_size` the causal convolution's width; `use_bias` biases on the projections;
    `num_blocks` the depth of the stack (the down projection's init)."""

    width: int
    num_heads: int = 4
    proj_factor: float = 2.0
    round_up_to: int = 64
    qkv_proj_blocksize: int = 4
    conv_size: int = 4
    use_bias: bool = False
    norm_eps: float = 1e-5
    num_blocks: int = 1
    impl: str = "auto"
    chunk_size: int = 64

    def __post_init__(self):
        positive(self, "width", "num_heads", "round_up_to", "qkv_proj_blocksize", "conv_size")
        positive(self, "num_blocks", "chunk_size")
        require(self.proj_factor > 0, "proj_factor", f"must be positive, got {self.proj_factor}")
        require(self.norm_eps > 0, "norm_eps", f"must be positive, got {self.norm_eps}")
        require(self.impl in MLSTM_IMPLS, "impl", f"expected one of {MLSTM_IMPLS}")
        inner = self.inner_width
        require(
            inner % self.num_heads == 0,
            "num_heads",
            f"num_heads = {self.num_heads} must divide the inner width {inner}",
        )
        require(
            inner % self.qkv_proj_blocksize == 0,
            "qkv_proj_blocksize",
            f"qkv_proj_blocksize = {self.qkv_proj_blocksize} must divide the inner width {inner}",
        )

    @property
    def inner_width(self) -> int:
        return math.ceil(self.proj_factor * self.width / self.round_up_to) * self.round_up_to

    @property
    def head_dim(self) -> int:
        return self.inner_width // self.num_heads


class MLSTMCache(NamedTuple):
    """The mLSTM state (`C: [B, H, D, D]`, `n: [B, H, D]`, `m: [B, H]`, float32) and the
    convolution's tail `[B, W - 1, E]`."""

    state: MLSTMState
    conv: jax.Array


class MLSTM(nn.Module):
    config: MLSTMConfig

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        *,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
        cache: MLSTMCache | None = None,
    ) -> tuple[jax.Array, MLSTMCache]:
        del positions  # no position embedding
        c = self.config
        batch, length, _ = x.shape
        inner, heads, head_dim = c.inner_width, c.num_heads, c.head_dim
        up = dense(
            (2, inner),
            ("embed", None, "mlp"),
            "proj_up",
            use_bias=c.use_bias,
            kernel_init=small_init(c.width),
        )(x)
        x_m, z = up[..., 0, :], up[..., 1, :]
        conv = ShortConvolution(c.conv_size, "silu", use_bias=True, axis_name="mlp", name="conv")
        convolved, conv_cache = conv(
            x_m, segment_ids=segment_ids, cache=None if cache is None else cache.conv
        )
        blocks = inner // c.qkv_proj_blocksize

        def project(name):
            return HeadwiseDense(blocks, small_init(c.width), "mlp", c.use_bias, name=name)

        q, k, v = project("q")(convolved), project("k")(convolved), project("v")(x_m)
        gate_input = jnp.stack([q, k, v], axis=-2).astype(jnp.float32)
        i = gate_projection(heads, input_bias_init, "igate")(gate_input)
        f = gate_projection(heads, forget_bias_init, "fgate")(gate_input)
        q, k, v = (a.reshape(batch, length, heads, head_dim) for a in (q, k, v))
        h, state = recur(
            mlstm,
            mlstm_step,
            (q, k, v, i, f),
            cache,
            segment_ids,
            impl=c.impl,
            chunk_size=c.chunk_size,
        )
        h = MultiHeadLayerNorm(c.norm_eps, name="norm")(h).reshape(batch, length, inner)
        skip = self.param(
            "learnable_skip", nn.with_logical_partitioning(nn.initializers.ones, ("mlp",)), (inner,)
        )
        h = (h + skip * convolved.astype(jnp.float32)) * jax.nn.silu(z.astype(jnp.float32))
        y = dense(
            c.width,
            ("mlp", "embed"),
            "proj_down",
            use_bias=c.use_bias,
            kernel_init=wang_init(c.width, c.num_blocks),
        )(h.astype(x.dtype))
        return y, MLSTMCache(state, conv_cache)

    def init_cache(self, batch_size: int, max_length: int, dtype=jnp.float32) -> MLSTMCache:
        del max_length  # the state does not grow
        c = self.config
        heads, head_dim = c.num_heads, c.head_dim
        state = MLSTMState(
            jnp.zeros((batch_size, heads, head_dim, head_dim), jnp.float32),
            jnp.zeros((batch_size, heads, head_dim), jnp.float32),
            jnp.zeros((batch_size, heads), jnp.float32),
        )
        return MLSTMCache(state, init_conv_cache(batch_size, c.conv_size, c.inner_width, dtype))
