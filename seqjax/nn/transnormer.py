"""TransNormerLLM's lightning attention layer (Qin et al., "TransNormerLLM: A Faster and Better
Large Language Model with Improved TransNormer" and "Various Lengths, Constant Speed: Efficient
Language Modeling with Lightning Attention"; OpenNLPLab/lightning-attention
`examples/module/tnl_attn.py`, `lightning_attn/utils/utils.py`).

    q, k, v = SiLU(x W_q), SiLU(x W_k), SiLU(x W_v)      [B, T, H, d / H]
    S_t = lambda_h S_{t-1} + k_t v_t^T,   o_t = S_t^T q_t            (no query scale)
    lambda_h = exp(-s_h (1 - l / (L - 1) + 1e-5)),  s_h the ALiBi slopes 2^(-8 h / H)
    y = (SRMSNorm(o) * sigmoid(x W_g1 W_g2)) W_o          (W_g1: d x d / H, low rank)

`l` is the layer's index among `L` layers (`layer_idx`, `num_layers`, filled by the model), so
deeper layers decay slower; a single layer (`L = 1`) uses `l / (L - 1) = 0`. SRMSNorm is the
weightless RMSNorm `x / sqrt(mean x^2 + eps)` over the full width (the TransNormerLLM code's
`SimpleRMSNorm`, eps 1e-6). Defaults: 8 heads, no biases, as the reference code.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from seqjax.nn.layers import LowRankProjection, dense, rms_normalize
from seqjax.nn.matrix_state import MatrixStateCache, recur
from seqjax.nn.mixer import divides, frozen, positive, require
from seqjax.ops.gla import GLA_IMPLS, lightning_log_decays, simple_gla_step
from seqjax.parallel.dispatch import simple_gla


@frozen
class TransNormerConfig:
    """`layer_idx` of `num_layers` sets the decays (the model fills both per layer)."""

    width: int
    num_heads: int = 8
    layer_idx: int = 0
    num_layers: int = 1
    norm_eps: float = 1e-6
    impl: str = "auto"
    chunk_size: int = 64

    def __post_init__(self):
        positive(self, "width", "num_heads", "num_layers", "chunk_size")
        divides(self, "num_heads", "width")
        ok = isinstance(self.layer_idx, int) and 0 <= self.layer_idx < self.num_layers
        require(ok, "layer_idx", f"expected 0 <= layer_idx < num_layers = {self.num_layers}")
        require(self.norm_eps > 0, "norm_eps", "must be positive")
        require(self.impl in GLA_IMPLS, "impl", f"expected one of {GLA_IMPLS}")

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads


class TransNormer(nn.Module):
    config: TransNormerConfig

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        *,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
        cache: MatrixStateCache | None = None,
    ) -> tuple[jax.Array, MatrixStateCache]:
        del positions  # the decay is the only position information
        c = self.config
        batch, length, _ = x.shape
        heads, head_dim = c.num_heads, c.head_dim
        q, k, v = (
            jax.nn.silu(dense((heads, head_dim), ("embed", "heads", "kv"), name)(x))
            for name in "qkv"
        )
        log_decays = lightning_log_decays(heads, c.layer_idx, c.num_layers)
        g = jnp.broadcast_to(log_decays, (batch, length, heads))
        o, state = recur(
            simple_gla,
            functools.partial(simple_gla_step, scale=1.0),
            (q, k, v, g),
            cache,
            segment_ids,
            scale=1.0,
            impl=c.impl,
            chunk_size=c.chunk_size,
        )
        o = rms_normalize(o.reshape(batch, length, c.width), c.norm_eps)
        gate = LowRankProjection(c.width, head_dim, ("embed", "heads"), use_bias=False, name="g")
        o = (o * jax.nn.sigmoid(gate(x).astype(jnp.float32))).astype(x.dtype)
        y = dense(c.width, ("heads", "embed"), "o")(o)
        return y, MatrixStateCache(state, None, None, None)

    def init_cache(self, batch_size: int, max_length: int, dtype=jnp.float32) -> MatrixStateCache:
        del max_length, dtype  # the state does not grow; it is float32
        c = self.config
        shape = (batch_size, c.num_heads, c.head_dim, c.head_dim)
        return MatrixStateCache(jnp.zeros(shape, jnp.float32), None, None, None)
