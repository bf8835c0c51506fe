"""Machinery shared by the ops: the token loop of the references and impl dispatch."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
from jax import lax

from seqjax.scan import segment_starts

# The impls of an op whose fast path is one call of the scan layer: its token-loop reference,
# or any of the scan layer's algorithms (`"auto"` is the scan layer's choice for the backend).
ScanOpImpl = Literal["auto", "reference", "sequential", "associative", "chunked", "pallas"]
SCAN_OP_IMPLS: tuple[str, ...] = (
    "auto",
    "reference",
    "sequential",
    "associative",
    "chunked",
    "pallas",
)


def take_rows(x: jax.Array, index: jax.Array) -> jax.Array:
    """`x[b, index[b]]` for each row b: `x: [B, N, ...]` and `index: [B]` or `[B, M]`."""
    return jax.vmap(lambda row, i: row[i])(x, index)


def token_starts(segment_ids: jax.Array | None, batch: int, length: int) -> jax.Array:
    """`[B, T]` bool, True where a token opens a new segment (never at t = 0; see the scan)."""
    if segment_ids is None:
        return jnp.zeros((batch, length), bool)
    return segment_starts(segment_ids)


def scan_tokens(
    step: Callable[[Any, tuple[jax.Array, Any]], tuple[Any, Any]],
    initial_state: Any,
    inputs: Any,
    segment_ids: jax.Array | None,
) -> tuple[Any, Any]:
    """The token loop of a reference: `lax.scan` over axis 1 of every leaf of `inputs`.

    `step(state, (start_t, inputs_t)) -> (state, output_t)`, where `start_t: [B]` is True where
    token t opens a new segment (the step resets its state there). Returns `(outputs, final)`
    with outputs batch-major `[B, T, ...]`.
    """
    batch, length = jax.tree.leaves(inputs)[0].shape[:2]
    starts = token_starts(segment_ids, batch, length)
    time_major = jax.tree.map(lambda x: jnp.moveaxis(x, 1, 0), (starts, inputs))
    final, outputs = lax.scan(step, initial_state, time_major)
    return jax.tree.map(lambda x: jnp.moveaxis(x, 0, 1), outputs), final


def reset(start: jax.Array, state: jax.Array) -> jax.Array:
    """Zeros the rows of `state: [B, ...]` where `start: [B]` is True."""
    return jnp.where(start.reshape(-1, *([1] * (state.ndim - 1))), jnp.zeros_like(state), state)


def scan_tokens_chunked(
    step: Callable[[Any, tuple[jax.Array, Any]], tuple[Any, Any]],
    initial_state: Any,
    inputs: Any,
    segment_ids: jax.Array | None,
    chunk_size: int,
) -> tuple[Any, Any]:
    """`scan_tokens`, rematerialized chunk by chunk: the fast form of ops whose state is large.

    An outer `lax.scan` runs over chunks of `chunk_size` tokens and the token loop inside each
    chunk is wrapped in `jax.checkpoint`, so the backward pass keeps only the states entering
    the chunks, `[T / C, ...state]`, and recomputes each chunk's per-token states from its
    entry. An op whose step contracts the state with a readout (S6, S4D) never holds a
    per-token state for the whole sequence. Padding tokens past the end leave the state as is.
    """
    batch, length = jax.tree.leaves(inputs)[0].shape[:2]
    starts = token_starts(segment_ids, batch, length)
    size = min(chunk_size, length)
    num_chunks = -(-length // size)
    pad = num_chunks * size - length

    def to_chunks(x):  # [B, T, ...] -> [T / C, C, B, ...]
        x = jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))
        return jnp.moveaxis(x.reshape(batch, num_chunks, size, *x.shape[2:]), 0, 2)

    valid = (jnp.arange(num_chunks * size) < length).reshape(num_chunks, size)

    def token(state, xs):
        valid_t, token_inputs = xs
        new_state, output = step(state, token_inputs)
        return jax.tree.map(lambda new, old: jnp.where(valid_t, new, old), new_state, state), output

    @jax.checkpoint
    def chunk(state, xs):
        return lax.scan(token, state, xs)

    final, outputs = lax.scan(
        chunk, initial_state, (valid, jax.tree.map(to_chunks, (starts, inputs)))
    )
    outputs = jax.tree.map(
        lambda x: jnp.moveaxis(x, 2, 0).reshape(batch, num_chunks * size, *x.shape[3:])[:, :length],
        outputs,
    )
    return outputs, final
