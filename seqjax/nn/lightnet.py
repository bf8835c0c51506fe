"""LightNet's additive linear recurrence (Qin et al., "You Only Scan Once: Efficient
Multi-dimension Sequential Modeling with LightNet"; fla's `layers/lightnet.py`).

    q, k = x W_q, x W_k        [B, T, H, e],  e = expand_ratio (128), H = d / e by default
    v    = x W_v               [B, T, H, d / H]
    log Z_t = logaddexp(log Z_{t-1}, k_t)                  (per key channel; Z_t = sum exp(k_s))
    k~_t = exp(k_t - log Z_t),   log alpha_t = log Z_{t-1} - log Z_t     (0 at a start)
    S_t = diag(alpha_t) S_{t-1} + k~_t v_t^T   <=>   S_t = (sum_{s<=t} exp(k_s) v_s^T) / Z_t
    o_t = S_t^T (SiLU(q_t) e^-1/2)
    y   = (RMSNorm(o) * swish(x W_g1 W_g2)) W_o    (norm over the full width, W_g1 rank 128)

The state is the normalized sum of the additive recurrence, written in GLA form and run by
`seqjax.ops.gla.gla`. `log Z` is part of the cache, so a call with a cache continues the sum;
it restarts at every segment start, as the state does. Optionally (`use_short_conv`) a short
convolution without activation on q, k and v, as fla offers.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

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
from seqjax.nn.mixer import frozen, positive, require
from seqjax.ops.common import token_starts
from seqjax.ops.gla import GLA_IMPLS, gla_step
from seqjax.parallel.dispatch import gla


@frozen
class LightNetConfig:
    """fla's defaults: `expand_ratio` (the key dim per head) 128, `num_heads` None meaning
    `width // expand_ratio`, gate rank 128; `norm_eps` is the model config's 1e-6."""

    width: int
    num_heads: int | None = None
    expand_ratio: int = 128
    gate_low_rank: int = 128
    use_short_conv: bool = False
    conv_size: int = 4
    norm_eps: float = 1e-6
    impl: str = "auto"
    chunk_size: int = 64

    def __post_init__(self):
        positive(self, "width", "expand_ratio", "gate_low_rank", "conv_size", "chunk_size")
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

    def with_heads(self) -> LightNetConfig:
        """This config with `num_heads` resolved (what the matrix-state helpers read)."""
        return dataclasses.replace(self, num_heads=self.heads)

    @property
    def key_dim(self) -> int:
        return self.expand_ratio

    @property
    def value_dim(self) -> int:
        return self.width // self.heads


class LightNetCache(NamedTuple):
    """The GLA state and short-convolution tails (`matrix`), and `log_normalizer: [B, H, K]`
    float32, `log Z` after the last token (-inf before any)."""

    matrix: MatrixStateCache
    log_normalizer: jax.Array


def running_log_normalizer(
    k: jax.Array, initial: jax.Array | None, segment_ids: jax.Array | None
) -> tuple[jax.Array, jax.Array]:
    """`log Z_t = logaddexp(log Z_{t-1}, k_t)` over `k: [B, T, H, K]` (float32), from
    `initial: [B, H, K]` (None or -inf: an empty sum) and restarting at segment starts.
    Returns `(log Z, log alpha)` with `log alpha_t = log Z_{t-1} - log Z_t`, 0 where the sum
    starts."""
    batch, length = k.shape[:2]
    starts = token_starts(segment_ids, batch, length)[..., None, None]
    if initial is not None:
        k = k.at[:, 0].set(jnp.logaddexp(initial, k[:, 0]))

    def combine(left, right):
        left_start, left_z = left
        right_start, right_z = right
        return left_start | right_start, jnp.where(
            right_start, right_z, jnp.logaddexp(left_z, right_z)
        )

    flags = jnp.broadcast_to(starts, k.shape)
    log_z = jax.lax.associative_scan(combine, (flags, k), axis=1)[1]
    first = jnp.full(k[:, :1].shape, -jnp.inf) if initial is None else initial[:, None]
    previous = jnp.concatenate([first, log_z[:, :-1]], axis=1)
    fresh = starts | jnp.isneginf(previous)
    return log_z, jnp.where(fresh, 0.0, previous - log_z)


class LightNet(nn.Module):
    config: LightNetConfig

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        *,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
        cache: LightNetCache | None = None,
    ) -> tuple[jax.Array, LightNetCache]:
        del positions  # LightNet's 1D layer has no position embedding
        c = self.config
        batch, length, _ = x.shape
        matrix = None if cache is None else cache.matrix
        q, k, v, conv = project_qkv(x, segment_ids, matrix, c.with_heads(), None)
        q = jax.nn.silu(q)
        initial = None if cache is None else cache.log_normalizer
        log_z, log_alpha = running_log_normalizer(k.astype(jnp.float32), initial, segment_ids)
        k = jnp.exp(k.astype(jnp.float32) - log_z).astype(x.dtype)
        o, state = recur(
            gla,
            gla_step,
            (q, k, v, log_alpha),
            matrix,
            segment_ids,
            impl=c.impl,
            chunk_size=c.chunk_size,
        )
        gate = LowRankProjection(
            c.width, c.gate_low_rank, ("embed", "heads"), use_bias=False, name="g"
        )(x)
        o = GatedRMSNorm(c.norm_eps, axis_name="heads", name="norm")(
            o.reshape(batch, length, c.width), gate
        )
        y = dense(c.width, ("heads", "embed"), "o")(o)
        return y, LightNetCache(MatrixStateCache(state, *conv), log_z[:, -1])

    def init_cache(self, batch_size: int, max_length: int, dtype=jnp.float32) -> LightNetCache:
        del max_length  # the state does not grow
        c = self.config
        matrix = init_matrix_state_cache(batch_size, c.with_heads(), dtype)
        log_normalizer = jnp.full((batch_size, c.heads, c.key_dim), -jnp.inf, jnp.float32)
        return LightNetCache(matrix, log_normalizer)
