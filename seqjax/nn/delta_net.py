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

import flax.linen as nn
import jax
import jax.numpy as jnp

from seqjax.nn.layers import GatedRMSNorm, RMSNorm, dense, l2_normalize
from seqjax.nn.matrix_state import (
    MatrixStateCache,
    init_matrix_state_cache,
    project_qkv,
    recur,
)
from seqjax.nn.mixer import expanded_width, frozen, positive, require
from seqjax.ops.delta_rule import DELTA_IMPLS, delta_rule_step
from seqjax.parallel.dispatch import delta_rule


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
            expanded_width(self, field)
        require(self.impl in DELTA_IMPLS, "impl", f"expected one of {DELTA_IMPLS}")

    @property
    def key_dim(self) -> int:
        return expanded_width(self, "expand_k") // self.num_heads

    @property
    def value_dim(self) -> int:
        return expanded_width(self, "expand_v") // self.num_heads


class DeltaNet(nn.Module):
    config: DeltaNetConfig

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        *,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
        cache: MatrixStateCache | None = None,
    ) -> tuple[jax.Array, MatrixStateCache]:
        del positions  # no position embedding
        c = self.config
        heads, value_dim = c.num_heads, c.value_dim
        q, k, v, conv = project_qkv(x, segment_ids, cache, c, "silu")
        q, k = l2_normalize(q), l2_normalize(k)
        beta = write_strength(x, heads, c.allow_neg_eigval)
        o, state = recur(
            delta_rule,
            delta_rule_step,
            (q, k, v, beta),
            cache,
            segment_ids,
            impl=c.impl,
            chunk_size=c.chunk_size,
        )
        if c.use_gate:
            g = dense((heads, value_dim), ("embed", "heads", "kv"), "g")(x)
            o = GatedRMSNorm(c.norm_eps, axis_name="kv", name="norm")(o, g)
        else:
            o = RMSNorm(c.norm_eps, axis_name="kv", name="norm")(o)
        y = dense(c.width, ("heads", "kv", "embed"), "o", axis=(-2, -1))(o)
        return y, MatrixStateCache(state, *conv)

    def init_cache(self, batch_size: int, max_length: int, dtype=jnp.float32) -> MatrixStateCache:
        del max_length  # the state does not grow
        return init_matrix_state_cache(batch_size, self.config, dtype)


def write_strength(x: jax.Array, heads: int, allow_neg_eigval: bool) -> jax.Array:
    """`beta = sigmoid(x W_b)` `[B, T, H]` float32, doubled with `allow_neg_eigval` so that the
    transition's eigenvalue `1 - beta` ranges over (-1, 1) (submodule "beta" of the caller)."""
    beta = jax.nn.sigmoid(dense(heads, ("embed", "heads"), "beta")(x).astype(jnp.float32))
    return 2.0 * beta if allow_neg_eigval else beta
