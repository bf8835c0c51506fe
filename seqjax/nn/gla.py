"""The GLA layer (Yang et al., "Gated Linear Attention Transformers with Hardware-Efficient
Training"; fla's `layers/gla.py`).

    q, k = x W_q, x W_k            [B, T, H, d_k / H],  d_k = expand_k * d (0.5)
    v    = x W_v                   [B, T, H, d_v / H],  d_v = expand_v * d (1)
    gk   = logsigmoid(x W_a1 W_a2 + b) / 16        (low-rank 16 gate, tau = 16)
    o    = gla(q, k, v, gk)        (scale d_k^-1/2 per head)
    y    = (RMSNorm(o) * swish(x W_g)) W_o         (norm per head, then the swish gate)

Optionally (`use_short_conv`) a short convolution with SiLU on q, k and v, as fla offers.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from seqjax.nn.conv import ConvolvedProjection, init_conv_cache
from seqjax.nn.layers import GatedRMSNorm, LowRankProjection, dense
from seqjax.nn.mixer import divides, frozen, positive, require
from seqjax.ops.gla import GLA_IMPLS, gla, gla_step


@frozen
class GLAConfig:
    width: int
    num_heads: int = 4
    expand_k: float = 0.5
    expand_v: float = 1.0
    gate_low_rank: int = 16
    gate_logit_normalizer: float = 16.0
    use_short_conv: bool = False
    conv_size: int = 4
    norm_eps: float = 1e-6
    impl: str = "auto"
    chunk_size: int = 64

    def __post_init__(self):
        positive(self, "width", "num_heads", "gate_low_rank", "conv_size", "chunk_size")
        for field in ("expand_k", "expand_v"):
            width = getattr(self, field) * self.width
            require(
                width == int(width) and width > 0,
                field,
                f"{field} * width must be a positive integer, got {width}",
            )
            require(
                int(width) % self.num_heads == 0,
                field,
                f"{field} * width = {int(width)} must be divisible by num_heads = {self.num_heads}",
            )
        require(self.gate_logit_normalizer > 0, "gate_logit_normalizer", "must be positive")
        require(self.impl in GLA_IMPLS, "impl", f"expected one of {GLA_IMPLS}")
        divides(self, "num_heads", "width")

    @property
    def key_dim(self) -> int:
        return int(self.expand_k * self.width) // self.num_heads

    @property
    def value_dim(self) -> int:
        return int(self.expand_v * self.width) // self.num_heads


class GLACache(NamedTuple):
    """`state: [B, H, K, V]` float32; the short convolutions' tails (None without them)."""

    state: jax.Array
    conv_q: jax.Array | None
    conv_k: jax.Array | None
    conv_v: jax.Array | None


class GLA(nn.Module):
    config: GLAConfig

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        *,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
        cache: GLACache | None = None,
    ) -> tuple[jax.Array, GLACache]:
        del positions  # GLA has no position embedding
        c = self.config
        conv = (None, None, None) if cache is None else cache[1:]
        heads, key_dim, value_dim = c.num_heads, c.key_dim, c.value_dim

        def project(name, dim, conv_cache):
            layer = ConvolvedProjection(
                heads,
                dim,
                c.use_short_conv,
                c.conv_size,
                "silu" if c.use_short_conv else None,
                name=name,
            )
            return layer(x, segment_ids, conv_cache)

        q, conv_q = project("q", key_dim, conv[0])
        k, conv_k = project("k", key_dim, conv[1])
        v, conv_v = project("v", value_dim, conv[2])
        gate = LowRankProjection(
            (heads, key_dim), c.gate_low_rank, ("embed", "heads", "kv"), name="gk"
        )(x)
        gk = jax.nn.log_sigmoid(gate.astype(jnp.float32)) / c.gate_logit_normalizer
        state = None if cache is None else cache.state
        if cache is not None and x.shape[1] == 1:
            o, state = gla_step(q[:, 0], k[:, 0], v[:, 0], gk[:, 0], state)
            o = o[:, None]
        else:
            o, state = gla(
                q,
                k,
                v,
                gk,
                initial_state=state,
                segment_ids=segment_ids,
                impl=c.impl,
                chunk_size=c.chunk_size,
            )
        g = dense((heads, value_dim), ("embed", "heads", "kv"), "g")(x)
        o = GatedRMSNorm(c.norm_eps, axis_name="kv", name="norm")(o, g)
        y = dense(c.width, ("heads", "kv", "embed"), "o", axis=(-2, -1))(o)
        return y, GLACache(state, conv_q, conv_k, conv_v)

    def init_cache(self, batch_size: int, max_length: int, dtype=jnp.float32) -> GLACache:
        del max_length  # the state does not grow
        c = self.config
        state = jnp.zeros((batch_size, c.num_heads, c.key_dim, c.value_dim), jnp.float32)
        if not c.use_short_conv:
            return GLACache(state, None, None, None)
        k_width, v_width = c.num_heads * c.key_dim, c.num_heads * c.value_dim
        return GLACache(
            state,
            init_conv_cache(batch_size, c.conv_size, k_width, dtype),
            init_conv_cache(batch_size, c.conv_size, k_width, dtype),
            init_conv_cache(batch_size, c.conv_size, v_width, dtype),
        )
