"""Nonlinear RNN mixers over the head-wise cells of `seqjax.ops.rnn_cells`: the xLSTM sLSTM
layer, and LSTM and GRU layers (Pöppel et al., "FlashRNN"; Beck et al., "xLSTM"). Each cell
feeds its previous output back through a block-diagonal (per-head) recurrent matrix, so these
are true nonlinear RNNs: the state-tracking baselines (an LSTM solves parity).

**SLSTM** (NX-AI/xlstm `xlstm/blocks/slstm/layer.py`, `cell.py`), with `H` heads of `d / H`:

    c      = SiLU(conv(x))                       (causal depthwise, width 4, with bias; optional)
    a_i, a_f = c W_i, c W_f,   a_z, a_o = x W_z, x W_o     (block-diagonal per head, no bias)
    h      = slstm([a_i, a_f, a_z, a_o] + b, R)  (R: [H, d/H, 4, d/H], zeros at init)
    y      = GroupNorm(h)                        (a LayerNorm per head; no output projection)

The gate weights are "small init" (normal, std `sqrt(2 / (5 d))`); the biases are zero but the
forget gate's, xLSTM's "powerlaw_blockdependent" init: channel `j` of each head starts at
`5 - 12 (j / (d/H - 1)) ** (0.3 + 1.3 layer_idx / (num_layers - 1))`, so the init depends on
the layer's depth (filled by the model). The xLSTM sLSTM block follows the layer with a gated
MLP (GeLU, proj factor 4/3) in its own pre-norm residual branch: that is the model's MLP
block (`seqjax.models.backbone`), not part of this layer.

**LSTM** and **GRU** (FlashRNN's cells, FlashRNN's head-wise layout):

    a = x W + b        ([B, T, H, G, D'], G = 4 for the LSTM, 3 for the GRU; D' = head_dim)
    h = lstm(a, R)  or  gru(a, R, b_n)
    y = h W_o

with PyTorch's `nn.LSTM` / `nn.GRU` init for `W`, `b`, `R` and `b_n` (uniform in
`+-1 / sqrt(H D')`); FlashRNN itself is a kernel library and fixes no layer or init.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from seqjax.nn.conv import ShortConvolution
from seqjax.nn.layers import Initializer, dense
from seqjax.nn.mixer import divides, frozen, positive, require
from seqjax.nn.mlstm import HeadwiseDense, MultiHeadLayerNorm, small_init
from seqjax.ops.rnn_cells import (
    GRU_GATES,
    LSTM_GATES,
    RNN_IMPLS,
    SLSTM_GATES,
    GRUState,
    LSTMState,
    SLSTMState,
    gru,
    gru_step,
    lstm,
    lstm_step,
    slstm,
    slstm_step,
)
from seqjax.ops.short_conv import init_conv_cache


class RNNCache(NamedTuple):
    """The cell's state (`[B, H, D]` float32 leaves) and the convolution's tail
    (`[B, W - 1, d]`; None for a layer without one)."""

    state: Any
    conv: jax.Array | None


def run_cell(
    op: Callable,
    step: Callable,
    a: jax.Array,
    R: jax.Array,
    cache: RNNCache | None,
    segment_ids: jax.Array | None,
    impl: str,
    *extra: jax.Array,
) -> tuple[jax.Array, Any]:
    """The cell over `a: [B, T, H, G, D]` from the cache's state; one token with a cache runs
    its `*_step`. Returns `(h [B, T, H, D], state)`."""
    state = None if cache is None else cache.state
    if cache is not None and a.shape[1] == 1:
        h, state = step(a[:, 0], R, state, *extra)
        return h[:, None], state
    return op(a, R, *extra, initial_state=state, segment_ids=segment_ids, impl=impl)


def zero_state(state_type: type, batch: int, heads: int, head_dim: int) -> Any:
    return state_type(
        *(jnp.zeros((batch, heads, head_dim), jnp.float32) for _ in state_type._fields)
    )


def symmetric_uniform(bound: float) -> Initializer:
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def recurrent_kernel(module: nn.Module, heads: int, gates: int, head_dim: int, init) -> jax.Array:
    """`R: [H, D, G, D]` (head, input, gate, output), a parameter of `module`."""
    return module.param(
        "R",
        nn.with_logical_partitioning(init, ("heads", None, None, "kv")),
        (heads, head_dim, gates, head_dim),
    )


# ----------------------------------------------------------------------------- sLSTM


def powerlaw_forget_bias(head_dim: int, depth: float) -> jax.Array:
    """xLSTM's "powerlaw_blockdependent" forget-gate bias of one head, `[D]`: from 5 down to -7,
    `depth = layer_idx / (num_layers - 1)` in [0, 1] bending the curve."""
    fraction = jnp.linspace(0.0, 1.0, head_dim)
    return 5.0 - 12.0 * fraction ** (0.3 + 1.3 * depth)


@frozen
class SLSTMConfig:
    """`num_heads` heads of `width / num_heads`; `conv_size` the convolution feeding the input
    and forget gates (0: none); `layer_idx`, `num_layers` the depth (forget-gate init)."""

    width: int
    num_heads: int = 4
    conv_size: int = 4
    norm_eps: float = 1e-5
    layer_idx: int = 0
    num_layers: int = 1
    impl: str = "auto"

    def __post_init__(self):
        positive(self, "width", "num_heads", "num_layers")
        divides(self, "num_heads", "width")
        ok = isinstance(self.conv_size, int) and self.conv_size >= 0
        require(ok, "conv_size", f"expected an int >= 0 (0: no convolution), got {self.conv_size}")
        ok = isinstance(self.layer_idx, int) and 0 <= self.layer_idx < self.num_layers
        require(ok, "layer_idx", f"expected 0 <= layer_idx < num_layers, got {self.layer_idx}")
        require(self.norm_eps > 0, "norm_eps", f"must be positive, got {self.norm_eps}")
        require(self.impl in RNN_IMPLS, "impl", f"expected one of {RNN_IMPLS}")

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads


class SLSTM(nn.Module):
    config: SLSTMConfig

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        *,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
        cache: RNNCache | None = None,
    ) -> tuple[jax.Array, RNNCache]:
        del positions  # no position embedding
        c = self.config
        batch, length, width = x.shape
        heads, head_dim = c.num_heads, c.head_dim
        convolved, conv_cache = x, None
        if c.conv_size:
            conv = ShortConvolution(c.conv_size, "silu", use_bias=True, name="conv")
            convolved, conv_cache = conv(
                x, segment_ids=segment_ids, cache=None if cache is None else cache.conv
            )

        def gate(name, inputs):
            return HeadwiseDense(heads, small_init(width), "heads", name=name)(inputs)

        a = jnp.stack(
            [
                gate("igate", convolved),
                gate("fgate", convolved),
                gate("zgate", x),
                gate("ogate", x),
            ],
            axis=2,
        ).reshape(batch, length, SLSTM_GATES, heads, head_dim)
        a = jnp.swapaxes(a, 2, 3).astype(jnp.float32) + self.bias(heads, head_dim)
        R = recurrent_kernel(self, heads, SLSTM_GATES, head_dim, nn.initializers.zeros)
        h, state = run_cell(slstm, slstm_step, a, R, cache, segment_ids, c.impl)
        y = MultiHeadLayerNorm(c.norm_eps, name="norm")(h).reshape(batch, length, width)
        return y.astype(x.dtype), RNNCache(state, conv_cache)

    def bias(self, heads: int, head_dim: int) -> jax.Array:
        """`[H, 4, D]`: zeros, the forget gate's `powerlaw_forget_bias`."""
        c = self.config
        depth = c.layer_idx / (c.num_layers - 1) if c.num_layers > 1 else 0.0

        def init(key, shape, dtype=jnp.float32):
            del key
            forget = jnp.broadcast_to(powerlaw_forget_bias(head_dim, depth), (heads, head_dim))
            return jnp.zeros(shape, dtype).at[:, 1].set(forget.astype(dtype))

        return self.param(
            "bias",
            nn.with_logical_partitioning(init, ("heads", None, "kv")),
            (heads, SLSTM_GATES, head_dim),
        )

    def init_cache(self, batch_size: int, max_length: int, dtype=jnp.float32) -> RNNCache:
        del max_length  # the state does not grow
        c = self.config
        state = zero_state(SLSTMState, batch_size, c.num_heads, c.head_dim)
        conv = init_conv_cache(batch_size, c.conv_size, c.width, dtype) if c.conv_size else None
        return RNNCache(state, conv)


# ----------------------------------------------------------------------------- LSTM, GRU


@frozen
class RNNConfig:
    """`num_heads` cells of `head_dim` (None: `width / num_heads`) with block-diagonal
    recurrence; one head is the classic cell."""

    width: int
    num_heads: int = 1
    head_dim: int | None = None
    impl: str = "auto"

    def __post_init__(self):
        positive(self, "width", "num_heads")
        if self.head_dim is None:
            divides(self, "num_heads", "width")
        else:
            positive(self, "head_dim")
        require(self.impl in RNN_IMPLS, "impl", f"expected one of {RNN_IMPLS}")

    @property
    def cell_dim(self) -> int:
        return self.head_dim or self.width // self.num_heads


@frozen
class LSTMConfig(RNNConfig):
    """The head-wise LSTM layer's config (`RNNConfig`)."""


@frozen
class GRUConfig(RNNConfig):
    """The head-wise GRU layer's config (`RNNConfig`)."""


class HeadwiseRNN(nn.Module):
    """Input projection to the gates, the cell, output projection: the LSTM and GRU layers,
    which set `kind`."""

    config: RNNConfig
    kind: ClassVar[str]

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        *,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
        cache: RNNCache | None = None,
    ) -> tuple[jax.Array, RNNCache]:
        del positions  # no position embedding
        c = self.config
        heads, head_dim = c.num_heads, c.cell_dim
        gates, _, op, step = CELLS[self.kind]
        init = symmetric_uniform((heads * head_dim) ** -0.5)
        a = dense(
            (heads, gates, head_dim),
            ("embed", "heads", None, "kv"),
            "input",
            use_bias=True,
            kernel_init=init,
            bias_init=init,
        )(x)
        R = recurrent_kernel(self, heads, gates, head_dim, init)
        extra = ()
        if self.kind == "gru":
            logical = nn.with_logical_partitioning(init, ("heads", "kv"))
            extra = (self.param("recurrent_bias", logical, (heads, head_dim)),)
        h, state = run_cell(op, step, a.astype(jnp.float32), R, cache, segment_ids, c.impl, *extra)
        y = dense(c.width, ("heads", "kv", "embed"), "o", axis=(-2, -1))(h.astype(x.dtype))
        return y, RNNCache(state, None)

    def init_cache(self, batch_size: int, max_length: int, dtype=jnp.float32) -> RNNCache:
        del max_length, dtype  # the state does not grow; it is float32
        c = self.config
        state_type = CELLS[self.kind][1]
        return RNNCache(zero_state(state_type, batch_size, c.num_heads, c.cell_dim), None)


# kind -> (gates, state type, op, step)
CELLS: dict[str, tuple[int, type, Callable, Callable]] = {
    "lstm": (LSTM_GATES, LSTMState, lstm, lstm_step),
    "gru": (GRU_GATES, GRUState, gru, gru_step),
}


class LSTM(HeadwiseRNN):
    config: LSTMConfig
    kind: ClassVar[str] = "lstm"


class GRU(HeadwiseRNN):
    config: GRUConfig
    kind: ClassVar[str] = "gru"
