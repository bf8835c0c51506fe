"""RetNet's multi-scale retention layer (Sun et al., "Retentive Network: A Successor to
Transformer for Large Language Models"; fla's `layers/multiscale_retention.py`).

    q = x W_q, k = x W_k      [B, T, H, d_k / H],  d_k = expand_k * d (1)
    v = x W_v                 [B, T, H, d_v / H],  d_v = expand_v * d (2)
    q, k = RoPE(q), RoPE(k)   (rotary at the token's position, base 10000, as fla does it)
    S_t = gamma_h S_{t-1} + k_t v_t^T,   gamma_h = 1 - 2^(-5 - h),  h = 0 .. H-1
    o_t = S_t^T (q_t (d_k / H)^-1/2)
    y   = (RMSNorm(o) * swish(x W_g)) W_o   (norm per head: the paper's group norm)

The decays are fixed per head (`seqjax.ops.gla.retention_log_decays`). Options as fla offers:
grouped key/value heads (`num_kv_heads`), short convolutions with SiLU on q, k and v
(`use_short_conv`), and no output gate (`use_output_gate=False`: `y = RMSNorm(o) W_o`).
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from seqjax.nn.conv import ConvolvedProjection
from seqjax.nn.layers import GatedRMSNorm, RMSNorm, dense, rotary
from seqjax.nn.matrix_state import MatrixStateCache, recur
from seqjax.nn.mixer import default_positions, divides, expanded_width, frozen, positive, require
from seqjax.ops.gla import GLA_IMPLS, retention_log_decays, simple_gla_step
from seqjax.ops.short_conv import init_conv_cache
from seqjax.parallel.dispatch import simple_gla


@frozen
class RetNetConfig:
    """fla's defaults: 8 heads, `expand_k = 1`, `expand_v = 2`, swish output gate; `norm_eps`
    is the model config's 1e-6 (fla passes it to the layer). `num_kv_heads` None: as many as
    `num_heads`."""

    width: int
    num_heads: int = 8
    num_kv_heads: int | None = None
    expand_k: float = 1.0
    expand_v: float = 2.0
    use_short_conv: bool = False
    conv_size: int = 4
    use_output_gate: bool = True
    rope_base: float = 10000.0
    norm_eps: float = 1e-6
    impl: str = "auto"
    chunk_size: int = 64

    def __post_init__(self):
        positive(self, "width", "num_heads", "conv_size", "chunk_size")
        for field in ("expand_k", "expand_v"):
            expanded_width(self, field)
        if self.num_kv_heads is not None:
            positive(self, "num_kv_heads")
            divides(self, "num_kv_heads", "num_heads")
        require(self.rope_base > 0, "rope_base", "must be positive")
        require(self.norm_eps > 0, "norm_eps", "must be positive")
        require(self.impl in GLA_IMPLS, "impl", f"expected one of {GLA_IMPLS}")

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def key_dim(self) -> int:
        return expanded_width(self, "expand_k") // self.num_heads

    @property
    def value_dim(self) -> int:
        return expanded_width(self, "expand_v") // self.num_heads


class RetNetCache(NamedTuple):
    """The retention state and short-convolution tails (`matrix`; the key and value tails
    have `num_kv_heads` heads), and `length: [B]` int32, the position of the next token."""

    matrix: MatrixStateCache
    length: jax.Array


def project_grouped_qkv(
    x: jax.Array, segment_ids: jax.Array | None, cache: RetNetCache | None, c: RetNetConfig
) -> tuple[jax.Array, jax.Array, jax.Array, tuple]:
    """`q: [B, T, H, K]`, `k: [B, T, H_kv, K]`, `v: [B, T, H_kv, V]` (submodules "q", "k",
    "v" of the calling compact module) and the convolutions' new tails (None without)."""
    tails = (None, None, None) if cache is None else cache.matrix[1:]
    shapes = ((c.num_heads, c.key_dim), (c.kv_heads, c.key_dim), (c.kv_heads, c.value_dim))
    activation = "silu" if c.use_short_conv else None
    outputs = []
    for name, (heads, dim), tail in zip("qkv", shapes, tails, strict=True):
        layer = ConvolvedProjection(
            heads, dim, c.use_short_conv, c.conv_size, activation, name=name
        )
        outputs.append(layer(x, segment_ids, tail))
    (q, conv_q), (k, conv_k), (v, conv_v) = outputs
    return q, k, v, (conv_q, conv_k, conv_v)


class RetNet(nn.Module):
    config: RetNetConfig

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        *,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
        cache: RetNetCache | None = None,
    ) -> tuple[jax.Array, RetNetCache]:
        c = self.config
        batch, length, _ = x.shape
        heads, value_dim = c.num_heads, c.value_dim
        q, k, v, conv = project_grouped_qkv(x, segment_ids, cache, c)
        if positions is None:
            offset = None if cache is None else cache.length
            positions = default_positions(batch, length, segment_ids, offset)
        q, k = rotary(q, positions, c.rope_base), rotary(k, positions, c.rope_base)
        groups = heads // c.kv_heads
        k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
        g = jnp.broadcast_to(retention_log_decays(heads), (batch, length, heads))
        o, state = recur(
            simple_gla,
            simple_gla_step,
            (q, k, v, g),
            None if cache is None else cache.matrix,
            segment_ids,
            impl=c.impl,
            chunk_size=c.chunk_size,
        )
        if c.use_output_gate:
            gate = dense((heads, value_dim), ("embed", "heads", "kv"), "g")(x)
            o = GatedRMSNorm(c.norm_eps, axis_name="kv", name="norm")(o, gate)
        else:
            o = RMSNorm(c.norm_eps, axis_name="kv", name="norm")(o)
        y = dense(c.width, ("heads", "kv", "embed"), "o", axis=(-2, -1))(o)
        next_position = (positions[:, -1] + 1).astype(jnp.int32)
        return y, RetNetCache(MatrixStateCache(state, *conv), next_position)

    def init_cache(self, batch_size: int, max_length: int, dtype=jnp.float32) -> RetNetCache:
        del max_length  # the state does not grow
        c = self.config
        state = jnp.zeros((batch_size, c.num_heads, c.key_dim, c.value_dim), jnp.float32)
        tails = (None, None, None)
        if c.use_short_conv:
            widths = (c.num_heads * c.key_dim, c.kv_heads * c.key_dim, c.kv_heads * c.value_dim)
            tails = tuple(init_conv_cache(batch_size, c.conv_size, w, dtype) for w in widths)
        length = jnp.zeros((batch_size,), jnp.int32)
        return RetNetCache(MatrixStateCache(state, *tails), length)
