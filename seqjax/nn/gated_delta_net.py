"""The Gated DeltaNet layer (Yang et al., "Gated Delta Networks: Improving Mamba2 with Delta
Rule"; fla's `layers/gated_deltanet.py`).

    q, k = L2norm(SiLU(conv(x W_q))), L2norm(SiLU(conv(x W_k)))    [B, T, H, d_h]
    v    = SiLU(conv(x W_v))                                        [B, T, H, expand_v d_h]
    beta = sigmoid(x W_b)              (2 sigmoid with allow_neg_eigval)
    g    = -exp(A_log) softplus(x W_a + dt_bias)                    (Mamba-2's decay, [B, T, H])
    o    = gated_delta_rule(q, k, v, g, beta)
    y    = (RMSNorm(o) * swish(x W_g)) W_o                          (norm per head, output gate)

`A` is initialized uniform in [0, 16] (stored as `A_log`) and `dt_bias` as the inverse softplus
of a step log-uniform in [0.001, 0.1] (floored at 1e-4), as Mamba-2 and fla do.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from seqjax.nn.delta_net import write_strength
from seqjax.nn.layers import GatedRMSNorm, dense, l2_normalize
from seqjax.nn.matrix_state import (
    MatrixStateCache,
    init_matrix_state_cache,
    project_qkv,
    recur,
)
from seqjax.nn.mixer import frozen, positive, require
from seqjax.ops.delta_rule import DELTA_IMPLS, gated_delta_rule_step
from seqjax.parallel.dispatch import gated_delta_rule

DT_MIN, DT_MAX, DT_FLOOR = 0.001, 0.1, 1e-4


@frozen
class GatedDeltaNetConfig:
    width: int
    num_heads: int = 6
    head_dim: int = 256
    expand_v: float = 2.0
    use_short_conv: bool = True
    conv_size: int = 4
    allow_neg_eigval: bool = False
    norm_eps: float = 1e-5
    impl: str = "auto"
    chunk_size: int = 64

    def __post_init__(self):
        positive(self, "width", "num_heads", "head_dim", "conv_size", "chunk_size")
        value = self.expand_v * self.head_dim
        ok = value == int(value) and value > 0
        require(ok, "expand_v", f"expand_v * head_dim must be a positive integer, got {value}")
        require(self.impl in DELTA_IMPLS, "impl", f"expected one of {DELTA_IMPLS}")

    @property
    def key_dim(self) -> int:
        return self.head_dim

    @property
    def value_dim(self) -> int:
        return int(self.expand_v * self.head_dim)


def a_log_init(key, shape, dtype=jnp.float32):
    return jnp.log(jax.random.uniform(key, shape, dtype, 0.0, 16.0))


def dt_bias_init(key, shape, dtype=jnp.float32):
    """The inverse softplus of `dt`, log-uniform in [DT_MIN, DT_MAX], floored at DT_FLOOR."""
    log_dt = jax.random.uniform(key, shape, dtype, math.log(DT_MIN), math.log(DT_MAX))
    dt = jnp.maximum(jnp.exp(log_dt), DT_FLOOR)
    return dt + jnp.log(-jnp.expm1(-dt))


class GatedDeltaNet(nn.Module):
    config: GatedDeltaNetConfig

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
        a_log = self.param("A_log", nn.with_logical_partitioning(a_log_init, ("heads",)), (heads,))
        dt_bias = self.param(
            "dt_bias", nn.with_logical_partitioning(dt_bias_init, ("heads",)), (heads,)
        )
        a = dense(heads, ("embed", "heads"), "a")(x).astype(jnp.float32)
        g = -jnp.exp(a_log) * jax.nn.softplus(a + dt_bias)
        o, state = recur(
            gated_delta_rule,
            gated_delta_rule_step,
            (q, k, v, g, beta),
            cache,
            segment_ids,
            impl=c.impl,
            chunk_size=c.chunk_size,
        )
        gate = dense((heads, value_dim), ("embed", "heads", "kv"), "g")(x)
        o = GatedRMSNorm(c.norm_eps, axis_name="kv", name="norm")(o, gate)
        y = dense(c.width, ("heads", "kv", "embed"), "o", axis=(-2, -1))(o)
        return y, MatrixStateCache(state, *conv)

    def init_cache(self, batch_size: int, max_length: int, dtype=jnp.float32) -> MatrixStateCache:
        del max_length  # the state does not grow
        return init_matrix_state_cache(batch_size, self.config, dtype)
