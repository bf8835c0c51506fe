"""A causal language model whose layers are any mixers (`seqjax.models.backbone`).

    tokens -> Backbone (embed, blocks, RMSNorm) -> head (tied to the embedding or not)

The model's cache holds every layer's cache and the next token's position in its segment, from
which positions continue (after a packed prefill, the last document's).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from seqjax.checks import check_tokens
from seqjax.models.backbone import MIXERS, Backbone, BackboneConfig
from seqjax.nn.layers import dense
from seqjax.nn.mixer import default_positions, frozen, require


@frozen
class LanguageModelConfig(BackboneConfig):
    """A `BackboneConfig` over tokens (`vocab_size` required) and the head:
    `tie_embeddings` reuses the embedding as the output projection."""

    tie_embeddings: bool = False

    def __post_init__(self):
        require(self.vocab_size is not None, "vocab_size", "a language model needs a vocabulary")
        super().__post_init__()


class LanguageModelCache(NamedTuple):
    """Every group's block caches (stacked along a leading axis under `scan_layers`) and the
    next token's position in its segment `[B]`."""

    layers: Any
    position: jax.Array


class LanguageModel(nn.Module):
    config: LanguageModelConfig

    def setup(self):
        c = self.config
        self.backbone = Backbone(c)
        if not c.tie_embeddings:
            self.head = dense(c.vocab_size, ("embed", "vocab"), "head")

    def __call__(
        self,
        tokens: jax.Array,
        *,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
        cache: LanguageModelCache | None = None,
    ) -> tuple[jax.Array, LanguageModelCache]:
        """`tokens: [B, T]` int -> `(logits [B, T, vocab] float32, cache)`."""
        check_tokens("tokens", tokens)
        batch, length = tokens.shape
        if positions is None:
            offset = None if cache is None else cache.position
            positions = default_positions(batch, length, segment_ids, offset)
        caches = None if cache is None else cache.layers
        x, caches = self.backbone(tokens, segment_ids, positions, caches)
        if self.config.tie_embeddings:
            logits = self.backbone.embed.attend(x)
        else:
            logits = self.head(x)
        return logits.astype(jnp.float32), LanguageModelCache(caches, positions[:, -1] + 1)

    def init_cache(self, batch_size: int, max_length: int, dtype=jnp.float32):
        """The cache before any token (call on the unbound module: no parameters needed)."""
        layers = Backbone(self.config, parent=None).init_cache(batch_size, max_length, dtype)
        return LanguageModelCache(layers, jnp.zeros((batch_size,), jnp.int32))


__all__ = ["MIXERS", "LanguageModel", "LanguageModelCache", "LanguageModelConfig"]
