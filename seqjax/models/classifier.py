"""A sequence classifier: the backbone of the language model, pooled, then a linear head (the
classification benchmarks: LRA, formal languages, time series).

    inputs -> Backbone (embed or project, blocks, RMSNorm) -> pool over valid tokens -> W_c

`pooling`: `"mean"` over the valid tokens, or `"last"`: the last valid token, which under
causal mixers has seen the whole sequence. `mask: [B, T]` marks valid tokens; padding must
follow them (causal mixers then never see it).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from seqjax.checks import check_tokens
from seqjax.models.backbone import Backbone, BackboneConfig
from seqjax.nn.layers import dense
from seqjax.nn.mixer import frozen, positive, require

POOLINGS = ("mean", "last")


@frozen
class SequenceClassifierConfig(BackboneConfig):
    num_classes: int = 2
    pooling: str = "mean"

    def __post_init__(self):
        positive(self, "num_classes")
        require(self.pooling in POOLINGS, "pooling", f"expected one of {POOLINGS}")
        super().__post_init__()


class SequenceClassifier(nn.Module):
    config: SequenceClassifierConfig

    @nn.compact
    def __call__(self, inputs: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
        """`inputs: [B, T]` tokens (or `[B, T, F]` features when `vocab_size` is None) ->
        logits `[B, num_classes]` float32."""
        c = self.config
        if c.vocab_size is not None:
            check_tokens("inputs", inputs)
        elif inputs.ndim != 3:
            raise ValueError(f"inputs: expected features [B, T, F], got shape {inputs.shape}")
        batch, length = inputs.shape[:2]
        if mask is None:
            mask = jnp.ones((batch, length), bool)
        elif mask.shape != (batch, length):
            raise ValueError(f"mask: expected shape {(batch, length)}, got {mask.shape}")
        positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
        h, _ = Backbone(c, name="backbone")(inputs, None, positions, None)
        h = h.astype(jnp.float32)
        if c.pooling == "mean":
            weights = mask.astype(jnp.float32)
            count = jnp.maximum(weights.sum(axis=1, keepdims=True), 1.0)
            pooled = jnp.einsum("bt,btd->bd", weights, h) / count
        else:
            last = jnp.maximum(jnp.sum(mask, axis=1) - 1, 0)
            pooled = jnp.take_along_axis(h, last[:, None, None], axis=1)[:, 0]
        return dense(c.num_classes, ("embed", None), "head", use_bias=True)(pooled)
