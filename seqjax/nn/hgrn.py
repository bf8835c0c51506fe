"""HGRN's gated linear recurrence layer (Qin et al., "Hierarchically Gated Recurrent Neural
Network for Sequence Modeling"; fla's `layers/hgrn.py`).

    f_t = gamma + (1 - gamma) sigmoid(x W_f)        (gamma: the layer's lower bound, [D_i])
    i_t = SiLU(x W_i) (1 - f_t)
    h_t = f_t h_{t-1} + i_t                         (elementwise over D_i = expand_ratio * d)
    y   = (RMSNorm(h) * swish(x W_g)) W_o           (norm over the full width D_i)

The lower bound `gamma` is a model-level parameter shared across layers (a softmax over the
layers of an `[L, D_i]` parameter, cumulated, minus the first row: deeper layers forget less,
layer 0 not at all), so the layer takes it as the keyword `lower_bound` (None or zeros: no
bound). The log forget gate is `logaddexp(log gamma, log(1 - gamma) + logsigmoid(x W_f))`, in
float32. Optionally (`use_short_conv`) a short convolution without activation on the input and
forget projections, as fla offers.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from seqjax.nn.conv import ShortConvolution
from seqjax.nn.layers import GatedRMSNorm, dense
from seqjax.nn.mixer import frozen, positive, require
from seqjax.ops.common import SCAN_OP_IMPLS
from seqjax.ops.hgrn import hgrn_step
from seqjax.ops.short_conv import init_conv_cache
from seqjax.parallel.dispatch import hgrn

# Keeps `log gamma` finite where the bound is 0 (the first layer), so its gradient is too.
SMALLEST_BOUND = float(jnp.finfo(jnp.float32).tiny)


@frozen
class HGRNConfig:
    """fla's defaults: `expand_ratio` 1 (the recurrence's width `D_i = expand_ratio * width`);
    `norm_eps` is the model config's 1e-6. `chunk_size` is the scan's (`impl="chunked"`)."""

    width: int
    expand_ratio: float = 1.0
    use_short_conv: bool = False
    conv_size: int = 4
    norm_eps: float = 1e-6
    impl: str = "auto"
    chunk_size: int = 64

    def __post_init__(self):
        positive(self, "width", "conv_size", "chunk_size")
        inner = self.expand_ratio * self.width
        ok = inner == int(inner) and inner > 0
        require(ok, "expand_ratio", f"expand_ratio * width must be a positive integer, got {inner}")
        require(self.norm_eps > 0, "norm_eps", "must be positive")
        require(self.impl in SCAN_OP_IMPLS, "impl", f"expected one of {SCAN_OP_IMPLS}")

    @property
    def inner_width(self) -> int:
        return int(self.expand_ratio * self.width)

    @property
    def lower_bound_width(self) -> int:
        """The width of the `lower_bound` the layer takes: that of its forget gate."""
        return self.inner_width


class HGRNCache(NamedTuple):
    """`state: [B, D_i]` float32 and the short convolutions' tails of the input and forget
    projections (`[B, W - 1, D_i]`; None without short convolutions)."""

    state: jax.Array
    conv_i: jax.Array | None
    conv_f: jax.Array | None


def log_forget_gate(logits: jax.Array, lower_bound: jax.Array | None) -> jax.Array:
    """`log f = log(gamma + (1 - gamma) sigmoid(logits))` in float32, `<= 0`, for `logits:
    [..., D]` and `lower_bound` gamma `[D]` in [0, 1) (None: no bound)."""
    log_f = jax.nn.log_sigmoid(logits.astype(jnp.float32))
    if lower_bound is None:
        return log_f
    if lower_bound.shape != logits.shape[-1:]:
        raise ValueError(
            f"lower_bound: expected shape {logits.shape[-1:]}, got {lower_bound.shape}"
        )
    gamma = lower_bound.astype(jnp.float32)
    log_f = jnp.logaddexp(jnp.log(jnp.maximum(gamma, SMALLEST_BOUND)), jnp.log1p(-gamma) + log_f)
    return jnp.minimum(log_f, 0.0)


def projection(
    x: jax.Array,
    features: int,
    name: str,
    conv_size: int | None,
    segment_ids: jax.Array | None,
    tail: jax.Array | None,
    axis: str = "mlp",
) -> tuple[jax.Array, jax.Array | None]:
    """`x W` (`[B, T, features]`, submodule `name`), then a short convolution without
    activation (submodule `name_conv`) when `conv_size` is set; returns `(y, new tail)`."""
    y = dense(features, ("embed", axis), name)(x)
    if conv_size is None:
        return y, None
    conv = ShortConvolution(conv_size, None, axis_name=axis, name=f"{name}_conv")
    return conv(y, segment_ids=segment_ids, cache=tail)


class HGRN(nn.Module):
    config: HGRNConfig

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        *,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
        cache: HGRNCache | None = None,
        lower_bound: jax.Array | None = None,
    ) -> tuple[jax.Array, HGRNCache]:
        del positions  # no position embedding
        c = self.config
        inner = c.inner_width
        conv_size = c.conv_size if c.use_short_conv else None
        tail_i, tail_f = (None, None) if cache is None else (cache.conv_i, cache.conv_f)
        i, conv_i = projection(x, inner, "i", conv_size, segment_ids, tail_i)
        f, conv_f = projection(x, inner, "f", conv_size, segment_ids, tail_f)
        g = log_forget_gate(f, lower_bound)
        i = (jax.nn.silu(i.astype(jnp.float32)) * -jnp.expm1(g)).astype(x.dtype)
        if cache is not None and x.shape[1] == 1:
            h, state = hgrn_step(i[:, 0], g[:, 0], cache.state)
            h = h[:, None]
        else:
            state = None if cache is None else cache.state
            h, state = hgrn(
                i, g, state, segment_ids=segment_ids, impl=c.impl, chunk_size=c.chunk_size
            )
        gate = dense(inner, ("embed", "mlp"), "g")(x)
        h = GatedRMSNorm(c.norm_eps, axis_name="mlp", name="norm")(h, gate)
        y = dense(c.width, ("mlp", "embed"), "o")(h)
        return y, HGRNCache(state, conv_i, conv_f)

    def init_cache(self, batch_size: int, max_length: int, dtype=jnp.float32) -> HGRNCache:
        del max_length  # the state does not grow
        c = self.config
        state = jnp.zeros((batch_size, c.inner_width), jnp.float32)
        if not c.use_short_conv:
            return HGRNCache(state, None, None)
        tails = (init_conv_cache(batch_size, c.conv_size, c.inner_width, dtype) for _ in "if")
        return HGRNCache(state, *tails)
