"""First-order linear recurrences `h_t = a_t * h_{t-1} + b_t`: the primitive of the diagonal ops.

Three algorithms compute the same thing over axis 1 of `[B, T, ...]` arrays:

- `"sequential"`: a `lax.scan` over tokens; T dependent steps.
- `"associative"`: `lax.associative_scan` with `(a1, b1) . (a2, b2) = (a2 a1, a2 b1 + b2)`;
  about 2 log2(T) steps but O(T log T) work and memory.
- `"chunked"`: the sequence is cut into chunks of `chunk_size` tokens. A scan over the C
  positions of a chunk runs on all chunks at once, from a zero state, and also accumulates the
  decay products `A_t = a_t ... a_first`; a short scan over the T / C chunk summaries then gives
  the state entering each chunk, and `h_t = h_t^local + A_t * h_entering`. C + T / C dependent
  steps on arrays T / C times wider than the sequential scan's, with O(B T D) memory.

All three share one `jax.custom_vjp`: the gradient of a linear recurrence is the reversed
linear recurrence `lam_t = a_{t+1} lam_{t+1} + dL/dh_t`, with `dL/db_t = lam_t`,
`dL/da_t = lam_t h_{t-1}` and `dL/dh0 = a_1 lam_1`, so the backward pass costs one more scan
and keeps nothing but `a`, `h` and `h0` (the trick of recurrentgemma's scan). The formulas hold
for complex values as written, with JAX's convention that a VJP is the transpose (not the
adjoint) of the linearization.
"""

from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax

from seqjax import checks

ScanImpl = Literal["auto", "sequential", "associative", "chunked"]
SCAN_IMPLS: tuple[str, ...] = ("auto", "sequential", "associative", "chunked")
DEFAULT_CHUNK_SIZE = 64


def segment_starts(segment_ids: jax.Array) -> jax.Array:
    """`[B, T]` bool: True where token t opens a new segment (t > 0 and its id changed).

    Position 0 is never a start: `initial_state` seeds the first segment of each row.
    """
    changed = segment_ids[:, 1:] != segment_ids[:, :-1]
    return jnp.pad(changed, ((0, 0), (1, 0)))


def accumulation_dtype(*dtypes: jnp.dtype) -> jnp.dtype:
    """float32 (complex64 for complex inputs), or wider when an input is wider (float64)."""
    return jnp.promote_types(jnp.result_type(*dtypes), jnp.float32)


def linear_recurrence(
    a: jax.Array,
    b: jax.Array,
    h0: jax.Array | None = None,
    *,
    reverse: bool = False,
    segment_ids: jax.Array | None = None,
    impl: ScanImpl = "auto",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[jax.Array, jax.Array]:
    """Computes `h_t = a_t * h_{t-1} + b_t` over axis 1 and returns `(h, h_last)`.

    Args:
      a: decays `[B, T, ...]`, real or complex, broadcastable to `b`.
      b: inputs `[B, T, ...]`, real or complex.
      h0: state before the first token, `[B, ...]` (trailing shape of `b`); None means zeros.
      reverse: run from the end: `h_t = a_t * h_{t+1} + b_t` with `h0` the state after the last
        token; `h_last` is then the state at t = 0.
      segment_ids: `[B, T]` integers; the recurrence restarts from zero at every change of id
        (packed documents; the reset operator of S5 for in-context RL). `h0` seeds the first
        segment of each row (the last one when `reverse`).
      impl: `"sequential"`, `"associative"`, `"chunked"`, or `"auto"` (= `"chunked"`, the
        fastest on CPU and GPU, with memory linear in T).
      chunk_size: tokens per chunk of the `"chunked"` impl.

    Returns:
      `h` `[B, T, ...]` in the dtype of `b` (complex if `a` is), and `h_last` `[B, ...]` in the
      float32 (complex64) accumulation dtype. Accumulation is float32 for bfloat16 inputs.
    """
    checks.check_floating("a", a, allow_complex=True)
    checks.check_floating("b", b, allow_complex=True)
    checks.check_choice("impl", impl, SCAN_IMPLS)
    checks.check_positive("chunk_size", chunk_size)
    if b.ndim < 2 or b.shape[1] < 1:
        raise ValueError(f"b: expected shape [B, T, ...] with T >= 1, got {b.shape}")
    try:
        a = jnp.broadcast_to(a, b.shape)
    except ValueError:
        raise ValueError(
            f"a: expected a shape broadcastable to b {b.shape}, got {a.shape}"
        ) from None
    batch, length = b.shape[:2]
    if h0 is not None:
        checks.check_floating("h0", h0, allow_complex=True)
        if h0.shape != (batch, *b.shape[2:]):
            raise ValueError(
                f"h0: expected shape {(batch, *b.shape[2:])} ([B, ...]), got {h0.shape}"
            )
    checks.check_segment_ids(segment_ids, batch, length)

    acc = accumulation_dtype(a.dtype, b.dtype, *([] if h0 is None else [h0.dtype]))
    out_dtype = jnp.promote_types(b.dtype, jnp.complex64) if jnp.iscomplexobj(a) else b.dtype
    a, b = a.astype(acc), b.astype(acc)
    h0 = jnp.zeros((batch, *b.shape[2:]), acc) if h0 is None else h0.astype(acc)
    if reverse:
        a, b = jnp.flip(a, 1), jnp.flip(b, 1)
        segment_ids = None if segment_ids is None else jnp.flip(segment_ids, 1)
    if segment_ids is not None:
        starts = segment_starts(segment_ids).reshape(batch, length, *([1] * (b.ndim - 2)))
        a = jnp.where(starts, jnp.zeros_like(a), a)
    algorithm = "chunked" if impl == "auto" else impl
    h, h_last = _recurrence(algorithm, chunk_size, a, b, h0)
    if reverse:
        h = jnp.flip(h, 1)
    return h.astype(out_dtype), h_last


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _recurrence(
    algorithm: str, chunk_size: int, a: jax.Array, b: jax.Array, h0: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """`(h, h_last)` for same-shape, same-dtype `a, b: [B, T, ...]`, `h0: [B, ...]`."""
    if algorithm == "sequential":
        h = _sequential(a, b, h0)
    elif algorithm == "associative":
        h = _associative(a, b, h0)
    else:
        h = _chunked(a, b, h0, chunk_size)
    return h, h[:, -1]


def _recurrence_fwd(algorithm, chunk_size, a, b, h0):
    h, h_last = _recurrence(algorithm, chunk_size, a, b, h0)
    return (h, h_last), (a, h, h0)


def _recurrence_bwd(algorithm, chunk_size, residuals, cotangents):
    a, h, h0 = residuals
    dh, dh_last = cotangents
    dh = dh.at[:, -1].add(dh_last)
    # lam_t = a_{t+1} lam_{t+1} + dh_t, run forward on the time-reversed arrays.
    a_next = jnp.concatenate([a[:, 1:], jnp.zeros_like(a[:, :1])], axis=1)
    lam, _ = _recurrence(
        algorithm, chunk_size, jnp.flip(a_next, 1), jnp.flip(dh, 1), jnp.zeros_like(h0)
    )
    lam = jnp.flip(lam, 1)
    h_prev = jnp.concatenate([h0[:, None], h[:, :-1]], axis=1)
    return lam * h_prev, lam, a[:, 0] * lam[:, 0]


_recurrence.defvjp(_recurrence_fwd, _recurrence_bwd)


def _sequential(a: jax.Array, b: jax.Array, h0: jax.Array) -> jax.Array:
    def step(h, inputs):
        a_t, b_t = inputs
        h = a_t * h + b_t
        return h, h

    _, h = lax.scan(step, h0, (jnp.moveaxis(a, 1, 0), jnp.moveaxis(b, 1, 0)))
    return jnp.moveaxis(h, 0, 1)


def _combine(left, right):
    a_left, b_left = left
    a_right, b_right = right
    return a_right * a_left, a_right * b_left + b_right


def _associative(a: jax.Array, b: jax.Array, h0: jax.Array) -> jax.Array:
    b = b.at[:, 0].add(a[:, 0] * h0)
    _, h = lax.associative_scan(_combine, (a, b), axis=1)
    return h


def _chunked(a: jax.Array, b: jax.Array, h0: jax.Array, chunk_size: int) -> jax.Array:
    batch, length = b.shape[:2]
    feature_shape = b.shape[2:]
    size = min(chunk_size, length)
    num_chunks = -(-length // size)
    pad = num_chunks * size - length
    if pad:
        # a = 1, b = 0 carries the state through the padding unchanged.
        widths = ((0, 0), (0, pad)) + ((0, 0),) * len(feature_shape)
        a = jnp.pad(a, widths, constant_values=1)
        b = jnp.pad(b, widths)

    def to_chunk_major(x):  # [B, N*C, ...] -> [C, B, N, ...]
        return jnp.moveaxis(x.reshape(batch, num_chunks, size, *feature_shape), 2, 0)

    def within_chunk(carry, inputs):
        decay, h = carry
        a_t, b_t = inputs
        return (a_t * decay, a_t * h + b_t), (a_t * decay, a_t * h + b_t)

    zeros = jnp.zeros((batch, num_chunks, *feature_shape), b.dtype)
    (chunk_decay, chunk_state), (decay, h_local) = lax.scan(
        within_chunk, (jnp.ones_like(zeros), zeros), (to_chunk_major(a), to_chunk_major(b))
    )

    def across_chunks(h, inputs):
        decay_n, state_n = inputs
        return decay_n * h + state_n, h

    _, h_entering = lax.scan(
        across_chunks, h0, (jnp.moveaxis(chunk_decay, 1, 0), jnp.moveaxis(chunk_state, 1, 0))
    )
    h = h_local + decay * jnp.moveaxis(h_entering, 0, 1)[None]
    h = jnp.moveaxis(h, 0, 2).reshape(batch, num_chunks * size, *feature_shape)
    return h[:, :length]
