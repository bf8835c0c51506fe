"""The Aaren layer (Feng et al., "Attention as an RNN"): softmax attention of a learned query
over each prefix of the layer input, computed as a prefix scan.

Per head `h`, with a learned query `q_h: [K]` that does not depend on the token,

    k_t, v_t = x_t W_k, x_t W_v                          [B, T, H, K], [B, T, H, V]
    o_t      = sum_{i <= t} exp(q_h . k_i / sqrt(K)) v_i / sum_{i <= t} exp(q_h . k_i / sqrt(K))
    y_t      = o_t W_o

(`seqjax.ops.aaren`: an associative scan of `(max, denominator, numerator)` partials under the
online-softmax combine). The cache is that running partial, `(m, u, w)` per head: O(1) memory
per token decoded. Keys and values come from the layer input, so layers stack as
`h^{(j+1)} = Aaren(h^{(j)})`; the paper puts Aaren where a Transformer block has attention.

No official code was found; the multi-head projections, the output projection and the query's
initialization (standard normal, so that `q . k / sqrt(K)` starts with unit variance) follow
the Transformer layer the paper replaces.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from seqjax.nn.layers import dense
from seqjax.nn.mixer import divides, frozen, positive, require
from seqjax.ops.aaren import AAREN_IMPLS, aaren, aaren_step
from seqjax.scan.online_softmax import SoftmaxPartial, empty_partial


@frozen
class AarenConfig:
    """`width`, `num_heads`, `head_dim` (None: width / heads; keys and values alike), and the
    scan's `impl`."""

    width: int
    num_heads: int = 8
    head_dim: int | None = None
    impl: str = "auto"

    def __post_init__(self):
        positive(self, "width", "num_heads")
        if self.head_dim is None:
            divides(self, "num_heads", "width")
        else:
            positive(self, "head_dim")
        require(self.impl in AAREN_IMPLS, "impl", f"expected one of {AAREN_IMPLS}")

    @property
    def key_dim(self) -> int:
        return self.head_dim or self.width // self.num_heads


class Aaren(nn.Module):
    """Attention of a learned per-head query over the growing prefix (module docstring); the
    cache is the op's `SoftmaxPartial` `(max [B, H], denominator [B, H], numerator [B, H, K])`."""

    config: AarenConfig

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        *,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
        cache: SoftmaxPartial | None = None,
    ) -> tuple[jax.Array, SoftmaxPartial]:
        del positions  # no position embedding: the query is the same at every token
        c = self.config
        heads, key_dim = c.num_heads, c.key_dim
        query = self.param(
            "query",
            nn.with_logical_partitioning(nn.initializers.normal(1.0), ("heads", "kv")),
            (heads, key_dim),
        )
        k = dense((heads, key_dim), ("embed", "heads", "kv"), "k")(x)
        v = dense((heads, key_dim), ("embed", "heads", "kv"), "v")(x)
        q = jnp.broadcast_to(query.astype(x.dtype), (x.shape[0], heads, key_dim))
        if cache is not None and x.shape[1] == 1:
            o, state = aaren_step(q, k[:, 0], v[:, 0], cache)
            o = o[:, None]
        else:
            o, state = aaren(q, k, v, initial_state=cache, segment_ids=segment_ids, impl=c.impl)
        y = dense(c.width, ("heads", "kv", "embed"), "o", axis=(-2, -1))(o)
        return y, state

    def init_cache(self, batch_size: int, max_length: int, dtype=jnp.float32) -> SoftmaxPartial:
        del max_length, dtype  # the partial does not grow; it is float32
        c = self.config
        return empty_partial((batch_size, c.num_heads), c.key_dim, jnp.float32)
