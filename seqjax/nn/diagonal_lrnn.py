"""The diagonal linear RNN of Grazzi et al., "Unlocking State-Tracking in Linear RNNs Through
Negative Eigenvalues" (automl/unlocking_state_tracking, `simple_recurrent/layers/diagonal.py`
and `block.py`; the model of their diagonal-LRNN parity experiments):

    a_t = sigmoid(s (x_t W_a + b_a))      in (0, 1)       s = 10, the sharpness
        = tanh(s (x_t W_a + b_a))         in (-1, 1)      with allow_neg_eigval
    b_t = (x_t W_b + b_b) * x_t                           (a diagonal input matrix times x_t)
    h_t = a_t * h_{t-1} + b_t,   h_0 = 0                  (`seqjax.scan.linear_recurrence`)
    y_t = LayerNorm(h_t)                                  (the reference block's post-norm)

There is no output projection: the state is the output. W_a, W_b are PyTorch `Linear` layers
with their weights divided by sqrt(d) (uniform in +-1/d; biases uniform in +-1/sqrt(d)); the
post-norm has a weight and no bias. The reference block is pre-norm, layer, post-norm, without
a residual connection and without an MLP; here the model's block adds the residual.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from seqjax.nn.layers import Initializer
from seqjax.nn.mixer import frozen, positive, require
from seqjax.parallel.dispatch import linear_recurrence
from seqjax.scan import SCAN_IMPLS


@frozen
class DiagonalLRNNConfig:
    width: int
    allow_neg_eigval: bool = False
    sharpness: float = 10.0
    output_norm: bool = True
    norm_eps: float = 1e-5
    impl: str = "auto"
    chunk_size: int = 64

    def __post_init__(self):
        positive(self, "width", "chunk_size")
        require(self.sharpness > 0, "sharpness", f"must be positive, got {self.sharpness}")
        require(self.norm_eps > 0, "norm_eps", f"must be positive, got {self.norm_eps}")
        require(self.impl in SCAN_IMPLS, "impl", f"expected one of {SCAN_IMPLS}")


def symmetric_uniform(bound: float) -> Initializer:
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class DiagonalLRNN(nn.Module):
    config: DiagonalLRNNConfig

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        *,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
        cache: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        """`cache`: the state `[B, D]` float32."""
        del positions  # no position embedding
        c = self.config
        width = c.width

        def linear(name):
            return nn.Dense(
                width,
                kernel_init=nn.with_logical_partitioning(
                    symmetric_uniform(1 / width), ("embed", "mlp")
                ),
                bias_init=nn.with_logical_partitioning(symmetric_uniform(width**-0.5), ("mlp",)),
                name=name,
            )

        logits = c.sharpness * linear("A")(x).astype(jnp.float32)
        a = jnp.tanh(logits) if c.allow_neg_eigval else jax.nn.sigmoid(logits)
        b = linear("B")(x).astype(jnp.float32) * x.astype(jnp.float32)
        if cache is not None and x.shape[1] == 1:
            state = a[:, 0] * cache + b[:, 0]
            h = state[:, None]
        else:
            h, state = linear_recurrence(
                a, b, cache, segment_ids=segment_ids, impl=c.impl, chunk_size=c.chunk_size
            )
        if c.output_norm:
            norm = nn.LayerNorm(
                epsilon=c.norm_eps,
                use_bias=False,
                dtype=jnp.float32,
                scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("mlp",)),
                name="norm",
            )
            h = norm(h)
        return h.astype(x.dtype), state

    def init_cache(self, batch_size: int, max_length: int, dtype=jnp.float32) -> jax.Array:
        del max_length, dtype  # the state does not grow and is float32
        return jnp.zeros((batch_size, self.config.width), jnp.float32)
