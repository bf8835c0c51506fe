"""The DeltaNet layer (Yang et al., "Parallelizing Linear Transformers with the Delta Rule over
Sequence Length"; fla's `layers/delta_net.py`).

    q, k = L2norm(SiLU(conv(x W_q))), L2norm(SiLU(conv(x W_k)))     [B, T, H, d_k / H]
    v    = SiLU(conv(x W_v))                                         [B, T, H, d_v / H]
    beta = sigmoid(x W_b)            (2 sigmoid with allow_neg_eigval: Grazzi et al.)
    o    = delta_rule(q, k, v, beta) (scale d_k^-1/2 per head)
    y    = RMSNorm(o) W_o            (per head; with use_gate, RMSNorm(o) * swish(x W_g))

`allow_neg_eigval=True` lets `I - beta k k^T` have the eigenvalue `1 - beta` in (-1, 1): the
negative eigenvalues that make parity and other state-tracking tasks learnable ("Unlocking
State-Tracking in Linear RNNs Through Negative Eigenvalues").
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from seqjax.nn.conv import ConvolvedProjection, init_conv_cache
from seqjax.nn.layers import GatedRMSNorm, RMSNorm, dense, l2_normalize
from seqjax.nn.mixer import frozen, positive, require
from seqjax.ops.delta_rule import DELTA_IMPLS, delta_rule, delta_rule_step


@frozen
class DeltaNetConfig:
    width: int
    num_heads: int = 4
    expand_k: float = 1.0
    expand_v: float = 1.0
    use_short_conv: bool = True
    conv_size: int = 4
    use_gate: bool = False
    allow_neg_eigval: bool = False
    norm_eps: float = 1e-5
    impl: str = "auto"
    chunk_size: int = 64

    def __post_init__(self):
        positive(self, "width", "num_heads", "conv_size", "chunk_size")
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
        require(self.impl in DELTA_IMPLS, "impl", f"expected one of {DELTA_IMPLS}")

    @property
    def key_dim(self) -> int:
        return int(self.expand_k * self.width) // self.num_heads

    @property
    def value_dim(self) -> int:
        return int(self.expand_v * self.width) // self.num_heads


class DeltaNetCache(NamedTuple):
    """`state: [B, H, K, V]` float32; the short convolutions' tails (None without them)."""

    state: jax.Array
    conv_q: jax.Array | None
    conv_k: jax.Array | None
    conv_v: jax.Array | None


class DeltaNet(nn.Module):
    config: DeltaNetConfig

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        *,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
        cache: DeltaNetCache | None = None,
    ) -> tuple[jax.Array, DeltaNetCache]:
        del positions  # no position embedding
        c = self.config
        conv = (None, None, None) if cache is None else cache[1:]
        heads, key_dim, value_dim = c.num_heads, c.key_dim, c.value_dim

        def project(name, dim, conv_cache):
            layer = ConvolvedProjection(
                heads, dim, c.use_short_conv, c.conv_size, "silu", name=name
            )
            return layer(x, segment_ids, conv_cache)

        q, conv_q = project("q", key_dim, conv[0])
        k, conv_k = project("k", key_dim, conv[1])
        v, conv_v = project("v", value_dim, conv[2])
        q, k = l2_normalize(q), l2_normalize(k)
        beta = jax.nn.sigmoid(dense(heads, ("embed", "heads"), "beta")(x).astype(jnp.float32))
        if c.allow_neg_eigval:
            beta = 2.0 * beta
        state = None if cache is None else cache.state
        if cache is not None and x.shape[1] == 1:
            o, state = delta_rule_step(q[:, 0], k[:, 0], v[:, 0], beta[:, 0], state)
            o = o[:, None]
        else:
            o, state = delta_rule(
                q,
                k,
                v,
                beta,
                initial_state=state,
                segment_ids=segment_ids,
                impl=c.impl,
                chunk_size=c.chunk_size,
            )
        if c.use_gate:
            g = dense((heads, value_dim), ("embed", "heads", "kv"), "g")(x)
            o = GatedRMSNorm(c.norm_eps, axis_name="kv", name="norm")(o, g)
        else:
            o = RMSNorm(c.norm_eps, axis_name="kv", name="norm")(o)
        y = dense(c.width, ("heads", "kv", "embed"), "o", axis=(-2, -1))(o)
        return y, DeltaNetCache(state, conv_q, conv_k, conv_v)

    def init_cache(self, batch_size: int, max_length: int, dtype=jnp.float32) -> DeltaNetCache:
        del max_length  # the state does not grow
        c = self.config
        state = jnp.zeros((batch_size, c.num_heads, c.key_dim, c.value_dim), jnp.float32)
        if not c.use_short_conv:
            return DeltaNetCache(state, None, None, None)
        k_width, v_width = c.num_heads * c.key_dim, c.num_heads * c.value_dim
        return DeltaNetCache(
            state,
            init_conv_cache(batch_size, c.conv_size, k_width, dtype),
            init_conv_cache(batch_size, c.conv_size, k_width, dtype),
            init_conv_cache(batch_size, c.conv_size, v_width, dtype),
        )
