"""First-order linear recurrences `h_t = a_t * h_{t-1} + b_t`: the primitive of the diagonal ops.

Three algorithms compute the same thing over axis 1 of `[B, T, ...]` arrays:

- `"sequential"`: a loop over tokens; T dependent steps on `[B, ...]` slices.
- `"associative"`: `lax.associative_scan` with `(a1, b1) . (a2, b2) = (a2 a1, a2 b1 + b2)`;
  about 2 log2(T) steps but O(T log T) work and memory.
- `"pallas"`: the Pallas kernels of `pallas_kernels.linear_recurrence` (TPU and GPU; see
  `seqjax.kernels`), for real inputs; other calls fall back to `"chunked"`.
- `"chunked"`: the sequence is cut into chunks of `chunk_size` tokens. A loop over the C
  positions of a chunk runs on all chunks at once from a zero state and keeps each chunk's
  summary (decay product, end state); a short scan over the T / C summaries gives the state
  entering each chunk; a second loop over the C positions reruns every chunk from its entering
  state. 2 C + T / C dependent steps on arrays T / C times wider than the sequential loop's,
  O(B T D) memory, and no per-token decay products.

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

from seqjax import checks, kernels

ScanImpl = Literal["auto", "sequential", "associative", "chunked", "pallas"]
SCAN_IMPLS: tuple[str, ...] = ("auto", "sequential", "associative", "chunked", "pallas")
DEFAULT_CHUNK_SIZE = 64


def segment_starts(segment_ids: jax.Array) -> jax.Array:
    """`[B, T]` bool: True where token t opens a new segment (t > 0 and its id changed).

    Position 0 is never a start: `initial_state` seeds the first segment of each row.
    """
    changed = segment_ids[:, 1:] != segment_ids[:, :-1]
    return jnp.pad(changed, ((0, 0), (1, 0)))


def segment_index(segment_ids: jax.Array) -> jax.Array:
    """`[B, T]` int32: 0 for the row's first segment, then +1 at every start. Tokens are in
    the same segment iff their indices are equal: an id that comes back after another is a
    new segment, as it is for every recurrence."""
    return jnp.cumsum(segment_starts(segment_ids), axis=1, dtype=jnp.int32)


def resolve_impl(impl: ScanImpl) -> str:
    """The algorithm `"auto"` stands for on the default backend.

    CPU: `"sequential"`. Its loop indexes `a`, `b` and `h` in place, so each step costs a few
    hundred nanoseconds beyond reading 3 arrays once; no other form reads and writes less
    memory, and `benchmarks/scan.py` measures it ahead of `"chunked"` (which reads `a` and `b`
    twice) at every T from 1K to 64K. GPU and TPU: `"pallas"`, one kernel with the state on
    chip (`"chunked"` where the kernel does not apply), as the issue of the kernels asks; not
    yet measured on those backends.
    """
    if impl != "auto":
        return impl
    return "pallas" if kernels.on_accelerator() else "sequential"


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
      impl: `"sequential"`, `"associative"`, `"chunked"`, `"pallas"`, or `"auto"` (see
        `resolve_impl`).
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
    h0 = jnp.zeros((batch, *b.shape[2:]), acc) if h0 is None else h0.astype(acc)
    if segment_ids is not None:
        # The link into a segment's first token (its last, when reversed) is cut.
        changed = segment_ids[:, 1:] != segment_ids[:, :-1]
        cut = jnp.pad(changed, ((0, 0), (0, 1) if reverse else (1, 0)))
        a = jnp.where(cut.reshape(batch, length, *([1] * (b.ndim - 2))), jnp.zeros_like(a), a)
    algorithm = resolve_impl(impl)
    if algorithm == "pallas":
        # The kernel reads the inputs in their own dtype (bfloat16 halves its traffic) and
        # accumulates in float32; trailing feature axes are one axis to it.
        flat = (a.reshape(batch, length, -1), b.reshape(batch, length, -1), h0.reshape(batch, -1))
        kernel = kernels.choose("linear_recurrence", impl, flat)
        if kernel is not None:
            h, h_last = kernel.linear_recurrence(*flat, reverse=reverse, **kernels.options())
            return h.reshape(b.shape), h_last.reshape(h0.shape)
        algorithm = "chunked"
    h, h_last = _recurrence(algorithm, chunk_size, reverse, a.astype(acc), b.astype(acc), h0)
    return h.astype(out_dtype), h_last


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _recurrence(
    algorithm: str, chunk_size: int, reverse: bool, a: jax.Array, b: jax.Array, h0: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """`(h, h_last)` for same-shape, same-dtype `a, b: [B, T, ...]`, `h0: [B, ...]`."""
    if algorithm == "sequential":
        h = _sequential(a, b, h0, reverse)
    elif algorithm == "associative":
        h = _associative(a, b, h0, reverse)
    else:
        h = _chunked(a, b, h0, chunk_size, reverse)
    return h, h[:, 0] if reverse else h[:, -1]


def _recurrence_fwd(algorithm, chunk_size, reverse, a, b, h0):
    h, h_last = _recurrence(algorithm, chunk_size, reverse, a, b, h0)
    return (h, h_last), (a, h, h0)


def _recurrence_bwd(algorithm, chunk_size, reverse, residuals, cotangents):
    a, h, h0 = residuals
    dh, dh_last = cotangents
    if algorithm == "sequential":
        lam, lam_first = _sequential_adjoint(a, dh, dh_last, reverse)
    else:
        zero = jnp.zeros_like(a[:, :1])
        if reverse:
            # Mirror image of the forward case: lam_t = a_{t-1} lam_{t-1} + dh_t.
            dh = dh.at[:, 0].add(dh_last)
            a_next = jnp.concatenate([zero, a[:, :-1]], axis=1)
        else:
            dh = dh.at[:, -1].add(dh_last)
            a_next = jnp.concatenate([a[:, 1:], zero], axis=1)
        # lam_t = a_{t+1} lam_{t+1} + dh_t: the same recurrence run in the other direction.
        lam, _ = _recurrence(algorithm, chunk_size, not reverse, a_next, dh, jnp.zeros_like(h0))
        lam_first = lam[:, -1 if reverse else 0]
    if reverse:
        h_prev = jnp.concatenate([h[:, 1:], h0[:, None]], axis=1)
    else:
        h_prev = jnp.concatenate([h0[:, None], h[:, :-1]], axis=1)
    return lam * h_prev, lam, a[:, -1 if reverse else 0] * lam_first


_recurrence.defvjp(_recurrence_fwd, _recurrence_bwd)


def _time_index(t: jax.Array, length: int, reverse: bool) -> jax.Array:
    return length - 1 - t if reverse else t


def _sequential(a: jax.Array, b: jax.Array, h0: jax.Array, reverse: bool) -> jax.Array:
    length = b.shape[1]

    # The loop indexes axis 1 in place (rather than `lax.scan` over a transposed copy), and
    # overwrites b_t with h_t in b's buffer: no passes over memory beyond reading a and b.
    def step(t, carry):
        h, out = carry
        t = _time_index(t, length, reverse)
        h = lax.dynamic_index_in_dim(a, t, 1, False) * h + lax.dynamic_index_in_dim(
            out, t, 1, False
        )
        return h, lax.dynamic_update_index_in_dim(out, h, t, 1)

    _, h = lax.fori_loop(0, length, step, (h0, b))
    return h


def _sequential_adjoint(a, dh, dh_last, reverse):
    """`(lam, lam_first)` of the backward pass by one loop against the recurrence's direction:
    `lam_t = dh_t + a_next lam_next`, `next` being t's successor in the recurrence's order.
    The loop reads `a_next` in place rather than from a shifted copy of `a`; `da` is left to
    one elementwise pass after it, which measures faster than writing it from the loop."""
    length = a.shape[1]
    last = 0 if reverse else length - 1

    def step(i, carry):
        lam, out = carry
        t = _time_index(i, length, not reverse)
        nxt = jnp.clip(t + (-1 if reverse else 1), 0, length - 1)
        # Entering the last token, lam carries dL/dh_last with a weight of 1.
        a_next = jnp.where(t == last, 1.0, lax.dynamic_index_in_dim(a, nxt, 1, False))
        lam = lax.dynamic_index_in_dim(out, t, 1, False) + a_next * lam
        return lam, lax.dynamic_update_index_in_dim(out, lam, t, 1)

    # lam_t overwrites dh_t in dh's buffer, as in `_sequential`.
    lam_first, lam = lax.fori_loop(0, length, step, (dh_last, dh))
    return lam, lam_first


def _combine(left, right):
    a_left, b_left = left
    a_right, b_right = right
    return a_right * a_left, a_right * b_left + b_right


def _associative(a: jax.Array, b: jax.Array, h0: jax.Array, reverse: bool) -> jax.Array:
    first = -1 if reverse else 0
    b = b.at[:, first].add(a[:, first] * h0)
    _, h = lax.associative_scan(_combine, (a, b), axis=1, reverse=reverse)
    return h


def _chunked(
    a: jax.Array, b: jax.Array, h0: jax.Array, chunk_size: int, reverse: bool
) -> jax.Array:
    """Two passes over chunks of C tokens, each a loop of C steps over all chunks at once.

    Pass 1 runs every chunk from a zero state and keeps only its summary: the decay product
    and the end state. A scan over the T / C summaries gives the state entering each chunk.
    Pass 2 reruns every chunk from its entering state and writes `h`. Reading `a` and `b`
    twice costs less than writing and re-reading per-token decay products.
    """
    batch, length = b.shape[:2]
    feature_shape = b.shape[2:]
    size = min(chunk_size, length)
    num_chunks = -(-length // size)
    pad = num_chunks * size - length
    if pad:
        # a = 1, b = 0 carries the state through the padding unchanged.
        widths = ((0, 0), (pad, 0) if reverse else (0, pad)) + ((0, 0),) * len(feature_shape)
        a = jnp.pad(a, widths, constant_values=1)
        b = jnp.pad(b, widths)
    a = a.reshape(batch, num_chunks, size, *feature_shape)
    b = b.reshape(batch, num_chunks, size, *feature_shape)

    def at(x, t):
        return lax.dynamic_index_in_dim(x, _time_index(t, size, reverse), 2, False)

    def summarize(t, carry):
        decay, h = carry
        a_t = at(a, t)
        return a_t * decay, a_t * h + at(b, t)

    # Typed like `b` (per-shard under shard_map), as a carry meeting `b` must be.
    zeros = jnp.zeros_like(b[:, :, 0])
    chunk_decay, chunk_state = lax.fori_loop(0, size, summarize, (jnp.ones_like(zeros), zeros))

    def enter(h, summary):
        decay_n, state_n = summary
        return decay_n * h + state_n, h

    _, h_entering = lax.scan(
        enter,
        h0,
        (jnp.moveaxis(chunk_decay, 1, 0), jnp.moveaxis(chunk_state, 1, 0)),
        reverse=reverse,
    )

    def run(t, carry):
        h, out = carry
        h = at(a, t) * h + at(out, t)
        return h, lax.dynamic_update_index_in_dim(out, h, _time_index(t, size, reverse), 2)

    # As in `_sequential`, h_t overwrites b_t in b's buffer.
    _, h = lax.fori_loop(0, size, run, (jnp.moveaxis(h_entering, 0, 1), b))
    h = h.reshape(batch, num_chunks * size, *feature_shape)
    return h[:, pad:] if reverse else h[:, :length]
