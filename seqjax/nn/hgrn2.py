"""HGRN2's gated linear recurrence with state expansion (Qin et al., "HGRN2: Gated Linear RNNs
with State Expansion"; fla's `layers/hgrn2.py`): HGRN's forget gate and its complement as the
key, i.e. GLA with `k = 1 - f`.

    q = SiLU(x W_q)                    [B, T, H, e],  e = expand_ratio (128), H = d / e default
    f = gamma + (1 - gamma) sigmoid(x W_f)    [B, T, H, e]   (gamma: lower bound, [H e])
    v = x W_i                          [B, T, H, d / H]
    S_t = diag(f_t) S_{t-1} + (1 - f_t) v_t^T,     o_t = S_t^T (q_t e^-1/2)
    y   = RMSNorm(o) W_o               (norm over the full width, no output gate)

The lower bound is HGRN's model-level one (`seqjax.nn.hgrn`), passed as the keyword
`lower_bound` (None or zeros: no bound). Optionally (`use_short_conv`) a short convolution
without activation on q, f and the input, as fla offers.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from seqjax.nn.conv import ConvolvedProjection
from seqjax.nn.hgrn import log_forget_gate
from seqjax.nn.layers import RMSNorm, dense
from seqjax.nn.matrix_state import MatrixStateCache, recur
from seqjax.nn.mixer import frozen, positive, require
from seqjax.ops.gla import GLA_IMPLS, gla_step
from seqjax.ops.short_conv import init_conv_cache
from seqjax.parallel.dispatch import gla


@frozen
class HGRN2Config:
    """fla's defaults: `expand_ratio` (the forget/key dim per head) 128, `num_heads` None
    meaning `width // expand_ratio`; `norm_eps` is the model config's 1e-6."""

    width: int
    num_heads: int | None = None
    expand_ratio: int = 128
    use_short_conv: bool = False
    conv_size: int = 4
    norm_eps: float = 1e-6
    impl: str = "auto"
    chunk_size: int = 64

    def __post_init__(self):
        positive(self, "width", "expand_ratio", "conv_size", "chunk_size")
        if self.num_heads is None:
            message = f"expand_ratio = {self.expand_ratio} exceeds width = {self.width}"
            require(self.expand_ratio <= self.width, "expand_ratio", message)
        else:
            positive(self, "num_heads")
        message = f"the number of heads, {self.heads}, must divide width = {self.width}"
        require(self.width % self.heads == 0, "num_heads", message)
        require(self.norm_eps > 0, "norm_eps", "must be positive")
        require(self.impl in GLA_IMPLS, "impl", f"expected one of {GLA_IMPLS}")

    @property
    def heads(self) -> int:
        return self.num_heads or self.width // self.expand_ratio

    @property
    def key_dim(self) -> int:
        return self.expand_ratio

    @property
    def value_dim(self) -> int:
        return self.width // self.heads

    @property
    def lower_bound_width(self) -> int:
        """The width of the `lower_bound` the layer takes: that of its forget gate."""
        return self.heads * self.key_dim


class HGRN2(nn.Module):
    config: HGRN2Config

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        *,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
        cache: MatrixStateCache | None = None,
        lower_bound: jax.Array | None = None,
    ) -> tuple[jax.Array, MatrixStateCache]:
        del positions  # no position embedding
        c = self.config
        batch, length, _ = x.shape
        heads = c.heads
        tails = (None, None, None) if cache is None else cache[1:]
        dims = (c.key_dim, c.key_dim, c.value_dim)
        projected = [
            ConvolvedProjection(heads, dim, c.use_short_conv, c.conv_size, None, name=name)(
                x, segment_ids, tail
            )
            for name, dim, tail in zip(("q", "f", "i"), dims, tails, strict=True)
        ]
        (q, conv_q), (f, conv_f), (v, conv_i) = projected
        q = jax.nn.silu(q)
        g = log_forget_gate(f.reshape(batch, length, -1), lower_bound).reshape(f.shape)
        k = (-jnp.expm1(g)).astype(x.dtype)
        o, state = recur(
            gla, gla_step, (q, k, v, g), cache, segment_ids, impl=c.impl, chunk_size=c.chunk_size
        )
        o = RMSNorm(c.norm_eps, axis_name="heads", name="norm")(o.reshape(batch, length, c.width))
        y = dense(c.width, ("heads", "embed"), "o")(o)
        return y, MatrixStateCache(state, conv_q, conv_f, conv_i)

    def init_cache(self, batch_size: int, max_length: int, dtype=jnp.float32) -> MatrixStateCache:
        del max_length  # the state does not grow
        c = self.config
        state = jnp.zeros((batch_size, c.heads, c.key_dim, c.value_dim), jnp.float32)
        if not c.use_short_conv:
            return MatrixStateCache(state, None, None, None)
        widths = (c.lower_bound_width, c.lower_bound_width, c.width)
        tails = (init_conv_cache(batch_size, c.conv_size, w, dtype) for w in widths)
        return MatrixStateCache(state, *tails)
