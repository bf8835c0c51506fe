"""What every mixer layer is: the call and cache interface, and the config base.

A mixer maps `x: [B, T, D]` to `y: [B, T, D]`:

    y, new_cache = mixer(x, segment_ids=None, positions=None, cache=None)
    cache = mixer.init_cache(batch_size, max_length, dtype)

- `segment_ids: [B, T]` packs documents: no token sees another document.
- `positions: [B, T]` (layers with position embeddings): None means the token's index within
  its segment, counted on from the position the cache holds when there is one.
- `cache`: the state after earlier tokens (recurrent states, short-convolution tails, a KV
  cache). With a cache the call continues those tokens: any T, so prefill and token-by-token
  decoding are the same call, and decoding equals the parallel pass.

Each mixer has a frozen dataclass config holding its paper's defaults; `__post_init__` rejects a
bad value naming the field.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import jax
import jax.numpy as jnp

from seqjax.scan import segment_starts


class Mixer(Protocol):
    def __call__(
        self,
        x: jax.Array,
        *,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
        cache: Any = None,
    ) -> tuple[jax.Array, Any]: ...

    def init_cache(self, batch_size: int, max_length: int, dtype: Any = jnp.float32) -> Any: ...


def require(condition: bool, field: str, message: str) -> None:
    """Config validation: raises `ValueError("<field>: <message>")` unless `condition`."""
    if not condition:
        raise ValueError(f"{field}: {message}")


def divides(config: Any, part: str, whole: str) -> None:
    """Requires the config field `part` to divide the field `whole`."""
    a, b = getattr(config, part), getattr(config, whole)
    require(b % a == 0, part, f"{part} = {a} must divide {whole} = {b}")


def positive(config: Any, *fields: str) -> None:
    for field in fields:
        value = getattr(config, field)
        require(
            isinstance(value, int) and value > 0, field, f"expected a positive int, got {value!r}"
        )


def expanded_width(config: Any, field: str) -> int:
    """`config.<field> * config.width`, required to be a positive integer divisible by
    `config.num_heads` (the key or value width of a linear-attention layer)."""
    width = getattr(config, field) * config.width
    require(
        width == int(width) and width > 0,
        field,
        f"{field} * width must be a positive integer, got {width}",
    )
    require(
        int(width) % config.num_heads == 0,
        field,
        f"{field} * width = {int(width)} must be divisible by num_heads = {config.num_heads}",
    )
    return int(width)


def frozen(cls):
    """`dataclasses.dataclass(frozen=True)`: configs are values (hashable, usable as static
    arguments and as Flax module fields)."""
    return dataclasses.dataclass(frozen=True)(cls)


def default_positions(
    batch: int, length: int, segment_ids: jax.Array | None, offset: jax.Array | None
) -> jax.Array:
    """`[B, T]` positions: the index within the segment, plus `offset: [B]` (a cache's length)
    for the first segment of each row."""
    index = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    if segment_ids is not None:
        starts = jnp.where(segment_starts(segment_ids), index, 0)
        index = index - jax.lax.cummax(starts, axis=1)
        first = ~jnp.cumsum(segment_starts(segment_ids), axis=1).astype(bool)
    else:
        first = jnp.ones((batch, length), bool)
    if offset is not None:
        index = index + jnp.where(first, offset[:, None], 0)
    return index
