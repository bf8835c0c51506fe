"""Softmax attention layers turned linear: Hedgehog, LoLCATs and Liger.

All three keep the attention layer's projections, with the parameter names and shapes of
`seqjax.nn.attention.Attention` ("q", "k", "v", "o"; grouped-query heads), so an attention
checkpoint loads into them; each adds only what its paper adds. With
`q = x W_q [B, T, H, K]`, `k, v = x W_k, x W_v [B, T, Hkv, K]` (repeated to H heads) and RoPE at
each token's position:

Hedgehog (Zhang et al., "The Hedgehog & the Porcupine: Expressive Linear Attentions with
Softmax Mimicry"; the map in the form of HazyResearch/lolcats `src/model/feature_map.py`,
see `seqjax.nn.feature_map`): normalized linear attention with learned maps
`phi_q`, `phi_k` (untied, `[H, K, F]` each, F = 64) of the rotated q and k,

    y_i = sum_{j <= i} phi_q(q_i) . phi_k(k_j) v_j / (sum_{j <= i} phi_q(q_i) . phi_k(k_j))

`feature_map="elu_plus_one"` puts the fixed map `phi(x) = elu(x) + 1` (Katharopoulos et al.,
"Transformers are RNNs") in place of the learned ones: the naive swap of softmax for linear
attention that the linearization papers compare against, with no new parameters.

LoLCATs (Zhang et al., "LoLCATs: On Low-Rank Linearizing of Large Language Models";
lolcats `src/model/linear_attention/linear_window_attention_tk.py`): the same maps, plus
softmax attention over the last `window` (64) tokens weighed by a learned per-head factor
`gamma = sigmoid(w)` (w initialized to -2.197, gamma ~ 0.1), one normalizer for both,

    a_ij = gamma exp(s_ij - m_i)    for j in win(i),  s_ij = q_i.k_j / sqrt(K),  m_i = max_j s_ij
    b_ij = phi_q(q_i) . phi_k(k_j)             for j in far(i) (before the window)
    y_i  = (sum_{win(i)} a_ij v_j + sum_{far(i)} b_ij v_j) / (sum_{win(i)} a_ij + sum_{far(i)} b_ij)

(`seqjax.ops.hybrid_attention`; the window slides by token where LoLCATs' kernel uses
"terraced" 64-token blocks). `affine_factors` weighs the linear terms by `1 - gamma` as
LoLCATs' option of that name does, which is the same as a window factor `gamma / (1 - gamma)
= exp(w)` against linear terms of weight 1.

Liger (Lan et al., "Liger: Linearizing Large Language Models to Gated Recurrent Structures";
OpenSparseLLMs/Linearization `liger/models/liger_gla/modeling_liger_gla.py`): no new parameters;
the key projection also makes GLA's gate (the reference pools it with an `AdaptiveAvgPool1d` to
its own width, the identity),

    o_gla = gla(softmax(q), softmax(k), v, gk = logsigmoid(k) / 16)     (softmaxes over K; scale 1)
    o_swa = softmax attention of RoPE(q), RoPE(k), v over the last `window` (64) tokens
    y     = (0.5 o_swa + 0.5 o_gla) W_o

The caches hold the recurrent states (and, for the windows, the last `window` keys and values)
and the position of the next token, so decoding continues the rotary positions.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from seqjax.nn.feature_map import HedgehogFeatureMap
from seqjax.nn.layers import dense, rotary
from seqjax.nn.matrix_state import recur
from seqjax.nn.mixer import default_positions, divides, frozen, positive, require
from seqjax.ops.attention import KVCache, init_kv_cache, softmax_attention_step
from seqjax.ops.feature_maps import elu_plus_one
from seqjax.ops.gla import GLA_IMPLS, LinearAttentionState, gla_step, linear_attention_step
from seqjax.ops.hybrid_attention import (
    HYBRID_IMPLS,
    HybridAttentionState,
    init_hybrid_state,
    sliding_window_hybrid_attention,
    sliding_window_hybrid_attention_step,
)
from seqjax.parallel.dispatch import gla, linear_attention, softmax_attention

# LoLCATs' `init_window_factor`: sigmoid(-2.197) = 0.1.
LOLCATS_WINDOW_FACTOR_INIT = -2.1972245773362196
# Hedgehog's maps of q and k: the learned ones, or the fixed `elu(x) + 1`.
HEDGEHOG_FEATURE_MAPS = ("hedgehog", "elu_plus_one")


class AttentionShape:
    """The attention layer's fields shared by the configs below (as `AttentionConfig`):
    `width`, `num_heads`, `num_kv_heads` (None: `num_heads`), `head_dim` (None: width / heads),
    `rope_base`."""

    width: int
    num_heads: int
    num_kv_heads: int | None
    head_dim: int | None

    def check_attention_shape(self) -> None:
        positive(self, "width", "num_heads")
        if self.head_dim is None:
            divides(self, "num_heads", "width")
        else:
            positive(self, "head_dim")
        if self.num_kv_heads is not None:
            positive(self, "num_kv_heads")
            divides(self, "num_kv_heads", "num_heads")

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def key_dim(self) -> int:
        return self.head_dim or self.width // self.num_heads


@frozen
class HedgehogConfig(AttentionShape):
    """Attention's fields, the `feature_map` (`HEDGEHOG_FEATURE_MAPS`), the learned maps'
    `feature_dim` (F; they give 2F features), `feature_bias` and `identity_init`
    (`seqjax.nn.feature_map`; unused by `"elu_plus_one"`), and the linear-attention `impl` and
    `chunk_size`."""

    width: int
    num_heads: int = 8
    num_kv_heads: int | None = None
    head_dim: int | None = None
    rope_base: float = 10000.0
    feature_dim: int = 64
    feature_bias: bool = False
    identity_init: bool = False
    feature_map: str = "hedgehog"
    impl: str = "auto"
    chunk_size: int = 64

    def __post_init__(self):
        self.check_attention_shape()
        positive(self, "feature_dim", "chunk_size")
        require(
            self.feature_map in HEDGEHOG_FEATURE_MAPS,
            "feature_map",
            f"expected one of {HEDGEHOG_FEATURE_MAPS}",
        )
        require(self.impl in GLA_IMPLS, "impl", f"expected one of {GLA_IMPLS}")

    @property
    def features(self) -> int:
        """The width of phi(q) and phi(k): 2F for the learned maps, K for elu + 1."""
        return 2 * self.feature_dim if self.feature_map == "hedgehog" else self.key_dim


@frozen
class LoLCATsConfig(AttentionShape):
    """Hedgehog's fields, the softmax `window`, the window factor's initial logit
    `window_factor_init` and `affine_factors` (module docstring); `impl` and `chunk_size` of
    `sliding_window_hybrid_attention`."""

    width: int
    num_heads: int = 8
    num_kv_heads: int | None = None
    head_dim: int | None = None
    rope_base: float = 10000.0
    feature_dim: int = 64
    feature_bias: bool = False
    identity_init: bool = False
    window: int = 64
    window_factor_init: float = LOLCATS_WINDOW_FACTOR_INIT
    affine_factors: bool = False
    impl: str = "auto"
    chunk_size: int = 64

    def __post_init__(self):
        self.check_attention_shape()
        positive(self, "feature_dim", "window", "chunk_size")
        require(self.impl in HYBRID_IMPLS, "impl", f"expected one of {HYBRID_IMPLS}")


@frozen
class LigerConfig(AttentionShape):
    """Attention's fields, the softmax `window`, GLA's `gate_logit_normalizer` (16), and GLA's
    `impl` and `chunk_size`."""

    width: int
    num_heads: int = 8
    num_kv_heads: int | None = None
    head_dim: int | None = None
    rope_base: float = 10000.0
    window: int = 64
    gate_logit_normalizer: float = 16.0
    impl: str = "auto"
    chunk_size: int = 64

    def __post_init__(self):
        self.check_attention_shape()
        positive(self, "window", "chunk_size")
        require(self.gate_logit_normalizer > 0, "gate_logit_normalizer", "must be positive")
        require(self.impl in GLA_IMPLS, "impl", f"expected one of {GLA_IMPLS}")


class HedgehogCache(NamedTuple):
    """`state`: the normalized linear attention's `(S [B, H, F', K], z [B, H, F'])`, F' the
    config's `features`; `position: [B]` int32, the next token's rotary position."""

    state: LinearAttentionState
    position: jax.Array


class LoLCATsCache(NamedTuple):
    """`state`: the window's ring buffer and the linear state before it; `position` as in
    `HedgehogCache`."""

    state: HybridAttentionState
    position: jax.Array


class LigerCache(NamedTuple):
    """`state`: GLA's `[B, H, K, K]` float32; `window`: a `KVCache` of `window` slots;
    `position` as in `HedgehogCache`."""

    state: jax.Array
    window: KVCache
    position: jax.Array


def project_attention(x: jax.Array, c: AttentionShape) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`q: [B, T, H, K]`, `k, v: [B, T, Hkv, K]`: submodules "q", "k", "v" of the caller, named
    and shaped as `Attention`'s."""
    q = dense((c.num_heads, c.key_dim), ("embed", "heads", "kv"), "q")(x)
    k = dense((c.kv_heads, c.key_dim), ("embed", "heads", "kv"), "k")(x)
    v = dense((c.kv_heads, c.key_dim), ("embed", "heads", "kv"), "v")(x)
    return q, k, v


def project_output(o: jax.Array, width: int) -> jax.Array:
    """`[B, T, H, K] -> [B, T, D]`: submodule "o" of the caller, as `Attention`'s."""
    return dense(width, ("heads", "kv", "embed"), "o", axis=(-2, -1))(o)


def repeat_heads(x: jax.Array, heads: int) -> jax.Array:
    """`[B, T, Hkv, K] -> [B, T, H, K]`: query head h reads key/value head `h // (H / Hkv)`."""
    return jnp.repeat(x, heads // x.shape[2], axis=2)


def token_positions(
    x: jax.Array,
    segment_ids: jax.Array | None,
    positions: jax.Array | None,
    next_position: jax.Array | None,
) -> jax.Array:
    """`[B, T]` positions: as given, else each token's index in its segment, the first segment
    counted on from the cache's `next_position: [B]`."""
    if positions is not None:
        return positions
    return default_positions(x.shape[0], x.shape[1], segment_ids, next_position)


def following(positions: jax.Array) -> jax.Array:
    """`[B]` int32: the position after each row's last token."""
    return (positions[:, -1] + 1).astype(jnp.int32)


def rotated_heads(x, segment_ids, positions, cache, c):
    """The projections with RoPE on q and k, k and v repeated to H heads:
    `(q, k, v [B, T, H, K], positions [B, T])`."""
    q, k, v = project_attention(x, c)
    positions = token_positions(
        x, segment_ids, positions, None if cache is None else cache.position
    )
    q, k = rotary(q, positions, c.rope_base), rotary(k, positions, c.rope_base)
    return q, repeat_heads(k, c.num_heads), repeat_heads(v, c.num_heads), positions


def feature_maps(q: jax.Array, k: jax.Array, c) -> tuple[jax.Array, jax.Array]:
    """The untied Hedgehog maps of q and k (submodules "phi_q", "phi_k")."""
    options = (c.feature_dim, c.feature_bias, c.identity_init)
    return (
        HedgehogFeatureMap(*options, name="phi_q")(q),
        HedgehogFeatureMap(*options, name="phi_k")(k),
    )


class Hedgehog(nn.Module):
    """Normalized linear attention with learned Hedgehog feature maps (module docstring)."""

    config: HedgehogConfig

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        *,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
        cache: HedgehogCache | None = None,
    ) -> tuple[jax.Array, HedgehogCache]:
        c = self.config
        q, k, v, positions = rotated_heads(x, segment_ids, positions, cache, c)
        if c.feature_map == "elu_plus_one":
            phi_q, phi_k = elu_plus_one(q), elu_plus_one(k)
        else:
            phi_q, phi_k = feature_maps(q, k, c)
        # The normalizer cancels the scale.
        op = functools.partial(linear_attention, normalize=True, scale=1.0)
        step = functools.partial(linear_attention_step, normalize=True, scale=1.0)
        o, state = recur(
            op, step, (phi_q, phi_k, v), cache, segment_ids, impl=c.impl, chunk_size=c.chunk_size
        )
        return project_output(o, c.width), HedgehogCache(state, following(positions))

    def init_cache(self, batch_size: int, max_length: int, dtype=jnp.float32) -> HedgehogCache:
        del max_length, dtype  # the state does not grow; it is float32
        c = self.config
        state = LinearAttentionState(
            jnp.zeros((batch_size, c.num_heads, c.features, c.key_dim), jnp.float32),
            jnp.zeros((batch_size, c.num_heads, c.features), jnp.float32),
        )
        return HedgehogCache(state, jnp.zeros((batch_size,), jnp.int32))


class LoLCATs(nn.Module):
    """Sliding-window softmax attention plus Hedgehog linear attention before the window, with
    a learned per-head window factor (module docstring)."""

    config: LoLCATsConfig

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        *,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
        cache: LoLCATsCache | None = None,
    ) -> tuple[jax.Array, LoLCATsCache]:
        c = self.config
        q, k, v, positions = rotated_heads(x, segment_ids, positions, cache, c)
        phi_q, phi_k = feature_maps(q, k, c)
        logit = self.param(
            "window_factor",
            nn.with_logical_partitioning(
                nn.initializers.constant(c.window_factor_init), ("heads",)
            ),
            (c.num_heads,),
        )
        # With affine factors the linear terms weigh 1 - gamma: dividing through by it leaves
        # gamma / (1 - gamma) = exp(logit) on the window.
        factor = jnp.exp(logit) if c.affine_factors else jax.nn.sigmoid(logit)
        if cache is not None and x.shape[1] == 1:
            o, state = sliding_window_hybrid_attention_step(
                *(a[:, 0] for a in (q, k, v, phi_q, phi_k)), cache.state, window_factor=factor
            )
            o = o[:, None]
        else:
            o, state = sliding_window_hybrid_attention(
                q,
                k,
                v,
                phi_q,
                phi_k,
                c.window,
                factor,
                initial_state=None if cache is None else cache.state,
                segment_ids=segment_ids,
                impl=c.impl,
                chunk_size=c.chunk_size,
            )
        return project_output(o, c.width), LoLCATsCache(state, following(positions))

    def init_cache(self, batch_size: int, max_length: int, dtype=jnp.float32) -> LoLCATsCache:
        del max_length  # the window is a ring buffer
        c = self.config
        state = init_hybrid_state(
            batch_size, c.window, c.num_heads, c.key_dim, c.key_dim, 2 * c.feature_dim, dtype
        )
        return LoLCATsCache(state, jnp.zeros((batch_size,), jnp.int32))


class Liger(nn.Module):
    """GLA from the attention projections, averaged with sliding-window softmax attention
    (module docstring)."""

    config: LigerConfig

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        *,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
        cache: LigerCache | None = None,
    ) -> tuple[jax.Array, LigerCache]:
        c = self.config
        q, k, v = project_attention(x, c)
        o_gla, state = self.gated_linear_attention(q, k, v, segment_ids, cache)
        positions = token_positions(
            x, segment_ids, positions, None if cache is None else cache.position
        )
        q, k = rotary(q, positions, c.rope_base), rotary(k, positions, c.rope_base)
        if cache is not None and x.shape[1] == 1:
            o_swa, window = softmax_attention_step(
                q[:, 0], k[:, 0], v[:, 0], cache.window, window=c.window
            )
            o_swa = o_swa[:, None]
        else:
            o_swa, window = softmax_attention(
                q,
                k,
                v,
                window=c.window,
                segment_ids=segment_ids,
                initial_state=None if cache is None else cache.window,
            )
        o = 0.5 * o_swa + 0.5 * o_gla
        return project_output(o, c.width), LigerCache(state, window, following(positions))

    def gated_linear_attention(self, q, k, v, segment_ids, cache):
        """GLA of the softmaxed q and k with the gate `logsigmoid(k) / normalizer`."""
        c = self.config
        qf, kf = q.astype(jnp.float32), k.astype(jnp.float32)
        gk = jax.nn.log_sigmoid(kf) / c.gate_logit_normalizer
        q_tilde = jax.nn.softmax(qf, axis=-1).astype(q.dtype)
        k_tilde = jax.nn.softmax(kf, axis=-1).astype(k.dtype)
        args = (q_tilde, *(repeat_heads(a, c.num_heads) for a in (k_tilde, v, gk)))
        return recur(
            functools.partial(gla, scale=1.0),
            functools.partial(gla_step, scale=1.0),
            args,
            cache,
            segment_ids,
            impl=c.impl,
            chunk_size=c.chunk_size,
        )

    def init_cache(self, batch_size: int, max_length: int, dtype=jnp.float32) -> LigerCache:
        del max_length  # the window is a ring buffer
        c = self.config
        state = jnp.zeros((batch_size, c.num_heads, c.key_dim, c.key_dim), jnp.float32)
        window = init_kv_cache(batch_size, c.window, c.kv_heads, c.key_dim, c.key_dim, dtype)
        return LigerCache(state, window, jnp.zeros((batch_size,), jnp.int32))
