"""Causal depthwise short convolution with a decode cache (Mamba, DeltaNet, fla's
`ShortConvolution`; the module is `seqjax.nn.conv.ShortConvolution`).

For each channel `d` and a kernel of width `W`,

    y_t[d] = sum_{j=0}^{W-1} w[W-1-j, d] x_{t-j}[d] + b[d],

where `x_{t-j}` counts only if it is in t's segment (a packed document never sees the end of the
one before it) and, before the first token, comes from the cache: the last `W - 1` inputs of the
previous call, zeros at the start.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from seqjax.scan import segment_index, segment_starts


def init_conv_cache(batch: int, width: int, channels: int, dtype=jnp.float32) -> jax.Array:
    """The cache before any token: `[B, W - 1, D]` zeros."""
    return jnp.zeros((batch, width - 1, channels), dtype)


def _tail(x: jax.Array, cache: jax.Array, segment_ids: jax.Array | None) -> jax.Array:
    """The last `W - 1` inputs of `[cache; x]` for the next call; those before the row's last
    segment are zeroed (the next token continues that segment)."""
    keep = cache.shape[1]
    tail = jnp.concatenate([cache, x.astype(cache.dtype)], axis=1)[:, -keep:] if keep else cache
    if segment_ids is None or keep == 0:
        return tail
    length = x.shape[1]
    tokens = jnp.arange(length)
    last_start = jnp.max(jnp.where(segment_starts(segment_ids), tokens, 0), axis=1)
    index = jnp.arange(length - keep, length)  # the tail's slots as token indices of x
    # Negative indices are cache slots: they belong to the first segment, kept if it is last.
    first = jnp.where(last_start > 0, last_start, -keep)
    return jnp.where((index[None] >= first[:, None])[..., None], tail, 0)


def causal_conv(
    x: jax.Array,
    kernel: jax.Array,
    bias: jax.Array | None,
    cache: jax.Array,
    segment_ids: jax.Array | None,
) -> tuple[jax.Array, jax.Array]:
    """`x: [B, T, D]`, `kernel: [W, D]` (tap `W - 1` on the current token), `cache:
    [B, W - 1, D]`; returns `(y [B, T, D] float32, new cache)`."""
    width = kernel.shape[0]
    length = x.shape[1]
    padded = jnp.concatenate([cache.astype(x.dtype), x], axis=1).astype(jnp.float32)
    segments = None if segment_ids is None else segment_index(segment_ids)
    y = jnp.zeros(x.shape, jnp.float32)
    for lag in range(width):
        shifted = padded[:, width - 1 - lag : width - 1 - lag + length]
        if segments is not None and lag:
            # The cache belongs to the first segment of the row.
            earlier = jnp.pad(segments, ((0, 0), (lag, 0)), mode="edge")[:, :length]
            shifted = jnp.where((earlier == segments)[..., None], shifted, 0.0)
        y = y + shifted * kernel[width - 1 - lag].astype(jnp.float32)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y, _tail(x, cache, segment_ids)
