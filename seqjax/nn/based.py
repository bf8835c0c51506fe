"""Taylor-map linear attention: the Based layer and JRT-RNN's prefix linear attention.

Based (Arora et al., "Simple linear attention language models balance the recall-throughput
tradeoff"; fla `fla/layers/based.py`, HazyResearch/prefix-linear-attention
`based/models/mixers/linear_attention.py`): small projected queries and keys,

    q, k = x W_q, x W_k                  [B, T, H, F]   (feature_dim F = 16)
    v    = x W_v                         [B, T, H, V]   (V = d / H)
    phi(x) = [1, x / F^{1/4}, vec(x x^T) / (sqrt(2) sqrt(F))]     phi(q).phi(k) ~ exp(q.k / sqrt(F))
    y_i  = sum_{j <= i} phi(q_i).phi(k_j) v_j / (sum_{j <= i} phi(q_i).phi(k_j) + eps)
    out  = y W_o

(`seqjax.ops.feature_maps.taylor_exp`; `symmetric_features` keeps the upper triangle of
`x x^T`, as fla's `TaylorFeatureMap` does: the same inner products with 1 + F + F(F+1)/2
instead of 1 + F + F^2 features.) The Based architecture adds short sliding-window softmax
attention; its code makes that separate layers with their own projections (a hybrid
`("based", "attention")` stack with `AttentionConfig(window=64)` here). As an option of this
layer, `window = W` puts softmax attention of the same q and k (scale `F^-1/2`, the exponent
the Taylor map approximates) over the last W tokens and the Taylor terms before them, one
normalizer for both (`seqjax.ops.hybrid_attention`, window factor 1).

JRT-RNN (Arora et al., "Just read twice: closing the recall gap for recurrent language
models"; prefix-linear-attention `based/models/mixers/prefix_linear_attention.py`): Based's
map, plus encoder keys and values `k_e = x W_ke`, `v_e = x W_ve` of the first M =
`prefix_length` tokens (1024), which every token reads, non-causally inside the prefix:

    y_i = phi(q_i)^T (sum_{j < M} phi(k_e_j) v_e_j^T + sum_{j <= i} phi(k_j) v_j^T)
        / (phi(q_i) . (sum_{j < M} phi(k_e_j) + sum_{j <= i} phi(k_j)) + eps)

(`seqjax.ops.prefix_linear_attention`). The prefix is the tokens at positions below M (the
index in the segment, counted on from the cache), so each packed document has its own. The
cache is the state `S_enc + S_dec` and the next position; decoding equals the parallel pass
once the prefill covers the prefix (the reference code requires as much: prefix tokens that
arrive later join the state, but earlier tokens cannot read them).

Both run in float32 state with eps 1e-10 (the reference code's is 1e-12).

Optionally (`use_short_conv`) every token projection (q, k, v, and JRT-RNN's k_e, v_e) is
followed by a short causal convolution of width `conv_size` with SiLU, as fla's GLA and
DeltaNet offer. The Based and JRT-RNN architectures get the same local mixing from separate
gated-convolution layers; without any, a linear attention cannot tie a token to its
neighbour, and associative recall (MQAR) is out of its reach.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from seqjax.nn.conv import init_conv_tails, project_heads
from seqjax.nn.layers import dense
from seqjax.nn.linearized_attention import following, token_positions
from seqjax.nn.matrix_state import conv_size, recur
from seqjax.nn.mixer import divides, frozen, positive, require
from seqjax.ops.feature_maps import taylor_exp
from seqjax.ops.gla import GLA_IMPLS, LinearAttentionState, linear_attention_step
from seqjax.ops.hybrid_attention import (
    HYBRID_IMPLS,
    HybridAttentionState,
    init_hybrid_state,
    sliding_window_hybrid_attention,
    sliding_window_hybrid_attention_step,
)
from seqjax.ops.prefix_linear_attention import prefix_linear_attention
from seqjax.parallel.dispatch import linear_attention


class TaylorShape:
    """The fields Based and JRT-RNN share: `width`, `num_heads`, the projected q/k width
    `feature_dim`, the value head width `head_dim` (None: width / heads),
    `symmetric_features`, and the short convolutions (`use_short_conv`, `conv_size`)."""

    width: int
    num_heads: int
    feature_dim: int
    head_dim: int | None
    symmetric_features: bool
    use_short_conv: bool
    conv_size: int

    def check_taylor_shape(self) -> None:
        positive(self, "width", "num_heads", "feature_dim", "conv_size")
        require(isinstance(self.use_short_conv, bool), "use_short_conv", "expected a bool")
        if self.head_dim is None:
            divides(self, "num_heads", "width")
        else:
            positive(self, "head_dim")

    @property
    def value_dim(self) -> int:
        return self.head_dim or self.width // self.num_heads

    @property
    def token_dims(self) -> dict[str, int]:
        """The token projections `name: head width` (q and k project to `feature_dim`)."""
        return {"q": self.feature_dim, "k": self.feature_dim, "v": self.value_dim}

    @property
    def expanded_dim(self) -> int:
        """The Taylor map's number of features."""
        f = self.feature_dim
        return 1 + f + (f * (f + 1) // 2 if self.symmetric_features else f * f)


@frozen
class BasedConfig(TaylorShape):
    """`TaylorShape`'s fields, the optional softmax `window` (None: linear attention alone),
    `impl` (of `linear_attention`, or of `sliding_window_hybrid_attention` with a window) and
    `chunk_size`."""

    width: int
    num_heads: int = 16
    feature_dim: int = 16
    head_dim: int | None = None
    symmetric_features: bool = False
    use_short_conv: bool = False
    conv_size: int = 4
    window: int | None = None
    impl: str = "auto"
    chunk_size: int = 64

    def __post_init__(self):
        self.check_taylor_shape()
        positive(self, "chunk_size")
        impls = GLA_IMPLS
        if self.window is not None:
            positive(self, "window")
            impls = HYBRID_IMPLS
        require(self.impl in impls, "impl", f"expected one of {impls}")


@frozen
class JRTRNNConfig(TaylorShape):
    """`TaylorShape`'s fields (the short convolutions cover the encoder's projections too),
    the encoder region's `prefix_length` (M), and the linear-attention `impl` and
    `chunk_size`."""

    width: int
    num_heads: int = 16
    feature_dim: int = 16
    head_dim: int | None = None
    symmetric_features: bool = False
    use_short_conv: bool = False
    conv_size: int = 4
    prefix_length: int = 1024
    impl: str = "auto"
    chunk_size: int = 64

    def __post_init__(self):
        self.check_taylor_shape()
        positive(self, "prefix_length", "chunk_size")
        require(self.impl in GLA_IMPLS, "impl", f"expected one of {GLA_IMPLS}")

    @property
    def token_dims(self) -> dict[str, int]:
        """Based's projections and the encoder's keys and values."""
        return {**super().token_dims, "k_enc": self.feature_dim, "v_enc": self.value_dim}


class BasedCache(NamedTuple):
    """`state`: `LinearAttentionState(S [B, H, F', V], z [B, H, F'])` (F' Taylor features),
    or with a window the `HybridAttentionState` of the window and the Taylor terms before it;
    `conv`: the short convolutions' tails of q, k, v (`[B, W - 1, H * dim]` each), or Nones."""

    state: LinearAttentionState | HybridAttentionState
    conv: tuple[jax.Array | None, ...]


class JRTRNNCache(NamedTuple):
    """`state`: `LinearAttentionState` of encoder plus decoder; `position: [B]` int32, the next
    token's position (whether it is in the prefix); `conv`: the short convolutions' tails of
    q, k, v, k_e, v_e, or Nones."""

    state: LinearAttentionState
    position: jax.Array
    conv: tuple[jax.Array | None, ...]


def token_heads(
    x: jax.Array, segment_ids: jax.Array | None, c: TaylorShape, tails: tuple | None
) -> tuple[list[jax.Array], tuple]:
    """`x W_name: [B, T, H, dim]` for each `name: dim` of `c.token_dims` (submodules of the
    calling compact module), each through its short convolution with `use_short_conv`, from
    the cache's `tails` (None: no cache). Returns the projections and the new tails."""
    dims = c.token_dims
    width = conv_size(c)
    outputs = [
        project_heads(x, segment_ids, c.num_heads, dim, name, width, "silu", tail)
        for (name, dim), tail in zip(dims.items(), tails or (None,) * len(dims), strict=True)
    ]
    return [y for y, _ in outputs], tuple(tail for _, tail in outputs)


def init_token_tails(batch: int, c: TaylorShape, dtype) -> tuple:
    """The empty convolution tails of `token_heads`' projections (Nones without them)."""
    channels = tuple(c.num_heads * dim for dim in c.token_dims.values())
    return init_conv_tails(batch, conv_size(c), channels, dtype)


def output(o: jax.Array, width: int) -> jax.Array:
    """`[B, T, H, V] -> [B, T, D]`, submodule "o" of the caller."""
    return dense(width, ("heads", "kv", "embed"), "o", axis=(-2, -1))(o)


def empty_state(batch: int, c: TaylorShape) -> LinearAttentionState:
    features = c.expanded_dim
    return LinearAttentionState(
        jnp.zeros((batch, c.num_heads, features, c.value_dim), jnp.float32),
        jnp.zeros((batch, c.num_heads, features), jnp.float32),
    )


# The Taylor map holds the softmax's 1 / sqrt(F); the normalizer cancels any further scale.
normalized_attention = functools.partial(linear_attention, normalize=True, scale=1.0)
normalized_step = functools.partial(linear_attention_step, normalize=True, scale=1.0)


class Based(nn.Module):
    """Based's Taylor linear attention, optionally with a softmax window (module docstring)."""

    config: BasedConfig

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        *,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
        cache: BasedCache | None = None,
    ) -> tuple[jax.Array, BasedCache]:
        del positions  # no position embedding
        c = self.config
        tails = None if cache is None else cache.conv
        (q, k, v), conv = token_heads(x, segment_ids, c, tails)
        phi_q, phi_k = (taylor_exp(a, symmetric=c.symmetric_features) for a in (q, k))
        if c.window is None:
            o, state = recur(
                normalized_attention,
                normalized_step,
                (phi_q, phi_k, v),
                cache,
                segment_ids,
                impl=c.impl,
                chunk_size=c.chunk_size,
            )
        elif cache is not None and x.shape[1] == 1:
            o, state = sliding_window_hybrid_attention_step(
                *(a[:, 0] for a in (q, k, v, phi_q, phi_k)), cache.state, window_factor=1.0
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
                1.0,
                initial_state=None if cache is None else cache.state,
                segment_ids=segment_ids,
                impl=c.impl,
                chunk_size=c.chunk_size,
            )
        return output(o, c.width), BasedCache(state, conv)

    def init_cache(self, batch_size: int, max_length: int, dtype=jnp.float32) -> BasedCache:
        del max_length  # the state (and the window's ring buffer) does not grow
        c = self.config
        conv = init_token_tails(batch_size, c, dtype)
        if c.window is None:
            return BasedCache(empty_state(batch_size, c), conv)
        state = init_hybrid_state(
            batch_size,
            c.window,
            c.num_heads,
            c.feature_dim,
            c.value_dim,
            c.expanded_dim,
            dtype,
        )
        return BasedCache(state, conv)


class JRTRNN(nn.Module):
    """JRT-RNN's prefix linear attention (module docstring)."""

    config: JRTRNNConfig

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        *,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
        cache: JRTRNNCache | None = None,
    ) -> tuple[jax.Array, JRTRNNCache]:
        c = self.config
        length = x.shape[1]
        positions = token_positions(
            x, segment_ids, positions, None if cache is None else cache.position
        )
        tails = None if cache is None else cache.conv
        (q, k, v, k_enc, v_enc), conv = token_heads(x, segment_ids, c, tails)
        phi_q, phi_k, phi_k_enc = (
            taylor_exp(a, symmetric=c.symmetric_features) for a in (q, k, k_enc)
        )
        in_prefix = (positions < c.prefix_length)[..., None, None]
        phi_k_enc = jnp.where(in_prefix, phi_k_enc, 0)
        if cache is not None and length == 1:
            o, state = self.step(phi_q, phi_k, v, phi_k_enc, v_enc, cache.state)
        else:
            # Encoder keys outside the prefix are zero already: the op may read them all.
            o, state = prefix_linear_attention(
                phi_q,
                phi_k,
                v,
                phi_k_enc,
                v_enc,
                length,
                scale=1.0,
                initial_state=None if cache is None else cache.state,
                segment_ids=segment_ids,
                impl=c.impl,
                chunk_size=c.chunk_size,
            )
        return output(o, c.width), JRTRNNCache(state, following(positions), conv)

    @staticmethod
    def step(phi_q, phi_k, v, phi_k_enc, v_enc, state):
        """One token: a prefix token first joins the encoder state (every token reads its own
        encoder key), then the decoder step. `[B, 1, ...]` inputs."""
        k_enc, v_e = phi_k_enc[:, 0].astype(jnp.float32), v_enc[:, 0].astype(jnp.float32)
        state = LinearAttentionState(
            state.S + k_enc[..., :, None] * v_e[..., None, :], state.z + k_enc
        )
        o, state = normalized_step(phi_q[:, 0], phi_k[:, 0], v[:, 0], state)
        return o[:, None], state

    def init_cache(self, batch_size: int, max_length: int, dtype=jnp.float32) -> JRTRNNCache:
        del max_length  # the state does not grow; it is float32
        c = self.config
        return JRTRNNCache(
            empty_state(batch_size, c),
            jnp.zeros((batch_size,), jnp.int32),
            init_token_tails(batch_size, c, dtype),
        )
