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

import flax.linen as nn
import jax
import jax.numpy as jnp

from seqjax.nn.layers import GatedRMSNorm, LowRankProjection, dense
from seqjax.nn.matrix_state import (
    MatrixStateCache,
    init_matrix_state_cache,
    project_qkv,
    recur,
)
from seqjax.nn.mixer import divides, expanded_width, frozen, positive, require
from seqjax.ops.gla import GLA_IMPLS, gla_step
from seqjax.parallel.dispatch import gla


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
            expanded_width(self, field)
        require(self.gate_logit_normalizer > 0, "gate_logit_normalizer", "must be positive")
        require(self.impl in GLA_IMPLS, "impl", f"expected one of {GLA_IMPLS}")
        divides(self, "num_heads", "width")

    @property
    def key_dim(self) -> int:
        return expanded_width(self, "expand_k") // self.num_heads

    @property
    def value_dim(self) -> int:
        return expanded_width(self, "expand_v") // self.num_heads


class GLA(nn.Module):
    config: GLAConfig

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        *,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
        cache: MatrixStateCache | None = None,
    ) -> tuple[jax.Array, MatrixStateCache]:
        del positions  # GLA has no position embedding
        c = self.config
        heads, key_dim, value_dim = c.num_heads, c.key_dim, c.value_dim
        activation = "silu" if c.use_short_conv else None
        q, k, v, conv = project_qkv(x, segment_ids, cache, c, activation)
        gate = LowRankProjection(
            (heads, key_dim), c.gate_low_rank, ("embed", "heads", "kv"), name="gk"
        )(x)
        gk = jax.nn.log_sigmoid(gate.astype(jnp.float32)) / c.gate_logit_normalizer
        o, state = recur(
            gla, gla_step, (q, k, v, gk), cache, segment_ids, impl=c.impl, chunk_size=c.chunk_size
        )
        g = dense((heads, value_dim), ("embed", "heads", "kv"), "g")(x)
        o = GatedRMSNorm(c.norm_eps, axis_name="kv", name="norm")(o, g)
        y = dense(c.width, ("heads", "kv", "embed"), "o", axis=(-2, -1))(o)
        return y, MatrixStateCache(state, *conv)

    def init_cache(self, batch_size: int, max_length: int, dtype=jnp.float32) -> MatrixStateCache:
        del max_length  # the state does not grow
        return init_matrix_state_cache(batch_size, self.config, dtype)
