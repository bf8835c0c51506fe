"""What the matrix-state mixers (GLA, DeltaNet, Gated DeltaNet) share: their cache, the q/k/v
projections with optional short convolutions, and running the op or its one-token step."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from seqjax.nn.conv import ConvolvedProjection, init_conv_tails


class MatrixStateCache(NamedTuple):
    """`state: [B, H, K, V]` float32 and the short convolutions' tails of q, k and v
    (`[B, W - 1, H * K]`, `[B, W - 1, H * V]`; None for a layer without them)."""

    state: jax.Array
    conv_q: jax.Array | None
    conv_k: jax.Array | None
    conv_v: jax.Array | None


def conv_size(config: Any) -> int | None:
    """The short convolutions' width of a config, None when it has none."""
    return config.conv_size if config.use_short_conv else None


def init_matrix_state_cache(batch: int, config: Any, dtype) -> MatrixStateCache:
    """The cache before any token, for a config with `num_heads`, `key_dim`, `value_dim`,
    `use_short_conv` and `conv_size`."""
    heads, key_dim, value_dim = config.num_heads, config.key_dim, config.value_dim
    state = jnp.zeros((batch, heads, key_dim, value_dim), jnp.float32)
    channels = (heads * key_dim, heads * key_dim, heads * value_dim)
    return MatrixStateCache(state, *init_conv_tails(batch, conv_size(config), channels, dtype))


def project_qkv(
    x: jax.Array,
    segment_ids: jax.Array | None,
    cache: MatrixStateCache | None,
    config: Any,
    activation: str | None,
) -> tuple[jax.Array, jax.Array, jax.Array, tuple]:
    """`q, k: [B, T, H, K]`, `v: [B, T, H, V]` (submodules "q", "k", "v" of the calling
    compact module) and the convolutions' new tails."""
    conv = (None, None, None) if cache is None else cache[1:]
    dims = (config.key_dim, config.key_dim, config.value_dim)
    width = conv_size(config)
    outputs = []
    for name, dim, tail in zip("qkv", dims, conv, strict=True):
        layer = ConvolvedProjection(
            config.num_heads, dim, width is not None, width or 0, activation, name=name
        )
        outputs.append(layer(x, segment_ids, tail))
    (q, conv_q), (k, conv_k), (v, conv_v) = outputs
    return q, k, v, (conv_q, conv_k, conv_v)


def recur(
    op: Callable,
    step: Callable,
    args: tuple[jax.Array, ...],
    cache: MatrixStateCache | None,
    segment_ids: jax.Array | None,
    **options,
) -> tuple[jax.Array, jax.Array]:
    """The op over `args` (`[B, T, ...]` each) from the cache's state; one token with a cache
    runs the op's `*_step` instead. Returns `(o [B, T, H, V], state)`."""
    state = None if cache is None else cache.state
    if cache is not None and args[0].shape[1] == 1:
        o, state = step(*(a[:, 0] for a in args), state)
        return o[:, None], state
    return op(*args, initial_state=state, segment_ids=segment_ids, **options)
