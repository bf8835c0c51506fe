"""Softmax attention as a mixer: RoPE, grouped-query heads, optional sliding window (the
attention layer of Llama-style Transformers and of the hybrids; fla's `layers/attn.py`).

Optionally (`use_short_conv`) q, k and v each go through a depthwise causal convolution of
width `conv_size` after their projections, without an activation: Primer's multi-dconv-head
attention (So et al., "Primer: Searching for Efficient Transformers for Language Modeling",
2021, which uses width 3), the "attention with short convolution" baseline of recall studies.
The convolutions see the packed segments and keep their tails in the cache for decoding."""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from seqjax.nn.conv import init_conv_tails, project_heads
from seqjax.nn.layers import dense, rotary
from seqjax.nn.matrix_state import conv_size
from seqjax.nn.mixer import default_positions, divides, frozen, positive, require
from seqjax.ops.attention import ATTENTION_IMPLS, KVCache, init_kv_cache, softmax_attention_step
from seqjax.parallel.dispatch import SEQUENCE_METHODS, softmax_attention


@frozen
class AttentionConfig:
    """`width` (d_model), heads, key/value heads (GQA), `head_dim` (None: width / heads),
    `window` (None: full causal), RoPE base `rope_base`, short convolutions on q, k, v
    (`use_short_conv`, `conv_size`); `sequence_method` is the
    sequence-parallel form under a mesh with a `sequence` axis (`"ulysses"`, `"ring"`, or
    `"auto"`: Ulysses when the axis size divides the head counts)."""

    width: int
    num_heads: int = 8
    num_kv_heads: int | None = None
    head_dim: int | None = None
    window: int | None = None
    rope_base: float = 10000.0
    use_short_conv: bool = False
    conv_size: int = 3
    impl: str = "auto"
    sequence_method: str = "auto"

    def __post_init__(self):
        positive(self, "width", "num_heads", "conv_size")
        require(isinstance(self.use_short_conv, bool), "use_short_conv", "expected a bool")
        if self.head_dim is None:
            divides(self, "num_heads", "width")
        else:
            positive(self, "head_dim")
        if self.num_kv_heads is not None:
            positive(self, "num_kv_heads")
            divides(self, "num_kv_heads", "num_heads")
        if self.window is not None:
            positive(self, "window")
        require(self.impl in ATTENTION_IMPLS, "impl", f"expected one of {ATTENTION_IMPLS}")
        require(
            self.sequence_method in SEQUENCE_METHODS,
            "sequence_method",
            f"expected one of {SEQUENCE_METHODS}",
        )

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def key_dim(self) -> int:
        return self.head_dim or self.width // self.num_heads

    @property
    def head_counts(self) -> tuple[int, int, int]:
        """The heads of q, k and v."""
        return self.num_heads, self.kv_heads, self.kv_heads


class AttentionCache(NamedTuple):
    """The keys and values seen (`KVCache`: a ring buffer of `window` slots when windowed, so
    decoding memory is O(window)) and the next token's position in its segment `[B]` (what
    RoPE continues from; the cache's own positions count every token of the row); `conv`:
    the short convolutions' tails of q, k, v (`[B, W - 1, heads * head_dim]`), or Nones."""

    kv: KVCache
    position: jax.Array
    conv: tuple[jax.Array | None, ...]


class Attention(nn.Module):
    """Causal softmax attention with RoPE.

    A call without a cache returns the cache of exactly its tokens (capacity T, or the
    window): to decode on, start from `init_cache(batch, max_length)` instead, whose capacity
    bounds the tokens a full-attention layer can hold.
    """

    config: AttentionConfig

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        *,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
        cache: AttentionCache | None = None,
    ) -> tuple[jax.Array, AttentionCache]:
        c = self.config
        batch, length, _ = x.shape
        width = conv_size(c)
        tails = (None,) * 3 if cache is None else cache.conv
        (q, conv_q), (k, conv_k), (v, conv_v) = (
            project_heads(x, segment_ids, heads, c.key_dim, name, width, None, tail)
            for name, heads, tail in zip("qkv", c.head_counts, tails, strict=True)
        )
        if positions is None:
            offset = None if cache is None else cache.position
            positions = default_positions(batch, length, segment_ids, offset)
        q, k = rotary(q, positions, c.rope_base), rotary(k, positions, c.rope_base)
        kv = None if cache is None else cache.kv
        if kv is not None and length == 1:
            o, kv = softmax_attention_step(q[:, 0], k[:, 0], v[:, 0], kv, window=c.window)
            o = o[:, None]
        else:
            o, kv = softmax_attention(
                q,
                k,
                v,
                window=c.window,
                segment_ids=segment_ids,
                initial_state=kv,
                impl=c.impl,
                sequence_method=c.sequence_method,
            )
        y = dense(c.width, ("heads", "kv", "embed"), "o", axis=(-2, -1))(o)
        return y, AttentionCache(kv, positions[:, -1] + 1, (conv_q, conv_k, conv_v))

    def init_cache(self, batch_size: int, max_length: int, dtype=jnp.float32) -> AttentionCache:
        c = self.config
        capacity = max_length if c.window is None else c.window
        kv = init_kv_cache(batch_size, capacity, c.kv_heads, c.key_dim, c.key_dim, dtype)
        channels = tuple(heads * c.key_dim for heads in c.head_counts)
        conv = init_conv_tails(batch_size, conv_size(c), channels, dtype)
        return AttentionCache(kv, jnp.zeros((batch_size,), jnp.int32), conv)
