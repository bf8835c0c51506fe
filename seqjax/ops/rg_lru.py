"""RG-LRU: the real-gated linear recurrent unit of Griffin / RecurrentGemma (De et al., 2024).

With the gate pre-activations of the layer (`gate_x`, `gate_a`, block-diagonal projections of
the input) and the learned `a_param` (so that `a = sigmoid(-a_param)` per channel):

    r_t = sigmoid(gate_a_t),   i_t = sigmoid(gate_x_t)
    log a_t = -c * r_t * softplus(a_param)                      (c = 8; a_t = a^{c r_t})
    h_t = a_t * h_{t-1} + sqrt(1 - a_t^2) * (i_t * x_t)

At the first token of a segment the state restarts and the input is not normalized
(multiplier 1), as in recurrentgemma. Position 0 of a row opens a segment exactly when no
`initial_state` is given: a row that continues a state (decoding, a second prefill chunk) does
not restart. `sqrt(1 - a^2)` has its derivative bounded (by 1000, as recurrentgemma does) so
that `a -> 1` cannot produce infinite gradients in bfloat16.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from seqjax import checks
from seqjax.ops.common import SCAN_OP_IMPLS, ScanOpImpl, reset, scan_tokens, token_starts
from seqjax.scan import linear_recurrence
from seqjax.scan.linear_recurrence import DEFAULT_CHUNK_SIZE, accumulation_dtype

MAX_SQRT_GRADIENT = 1000.0


@jax.custom_jvp
def sqrt_bounded_derivative(x: jax.Array) -> jax.Array:
    """`sqrt(x)` whose derivative is capped at `MAX_SQRT_GRADIENT` near 0."""
    return jnp.sqrt(x)


@sqrt_bounded_derivative.defjvp
def _sqrt_bounded_derivative_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    floor = 1.0 / (4.0 * MAX_SQRT_GRADIENT**2)
    return jnp.sqrt(x), dx * 0.5 / jnp.sqrt(jnp.maximum(x, floor))


def rg_lru(
    x: jax.Array,
    gate_x: jax.Array,
    gate_a: jax.Array,
    a_param: jax.Array,
    initial_state: jax.Array | None = None,
    *,
    segment_ids: jax.Array | None = None,
    c: float = 8.0,
    impl: ScanOpImpl = "auto",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[jax.Array, jax.Array]:
    """RG-LRU over `x: [B, T, D]`; returns `(h [B, T, D], final_state [B, D])`.

    Args:
      x: inputs `[B, T, D]`.
      gate_x: input-gate pre-activations `[B, T, D]`.
      gate_a: recurrence-gate pre-activations `[B, T, D]`.
      a_param: `[D]`, the recurrence's learned parameter (`log a = -softplus(a_param)`).
      initial_state: `[B, D]`; None means zeros and that position 0 opens a segment.
      segment_ids: `[B, T]` ints; the state restarts at every new segment.
      c: the fixed scale of the gate exponent (8 in Griffin).
      impl: `"reference"` (token loop), or one of the scan layer's algorithms
        (`"sequential"`, `"associative"`, `"chunked"`, `"auto"`).
      chunk_size: chunk length of `"chunked"`.

    Returns:
      `h` in the dtype of `x`; the float32 state after each row's last token.
    """
    dims = checks.Dims()
    for name, value in (("x", x), ("gate_x", gate_x), ("gate_a", gate_a)):
        dims.check(name, value, "B T D")
        checks.check_floating(name, value)
    dims.check("a_param", a_param, "D")
    checks.check_floating("a_param", a_param)
    if initial_state is not None:
        dims.check("initial_state", initial_state, "B D")
    checks.check_segment_ids(segment_ids, *x.shape[:2])
    checks.check_choice("impl", impl, SCAN_OP_IMPLS)
    if impl == "reference":
        return _rg_lru_reference(x, gate_x, gate_a, a_param, initial_state, segment_ids, c)

    batch, length, _ = x.shape
    starts = token_starts(segment_ids, batch, length)
    if initial_state is None:
        starts = starts.at[:, 0].set(True)
    a, normalized_x = decay_and_input(x, gate_x, gate_a, a_param, starts[..., None], c)
    h, final = linear_recurrence(
        a,
        normalized_x,
        initial_state,
        segment_ids=segment_ids,
        impl=impl,
        chunk_size=chunk_size,
    )
    return h.astype(x.dtype), final


def rg_lru_step(
    x_t: jax.Array,
    gate_x_t: jax.Array,
    gate_a_t: jax.Array,
    a_param: jax.Array,
    state: jax.Array | None,
    *,
    c: float = 8.0,
) -> tuple[jax.Array, jax.Array]:
    """One token: `x_t, gate_x_t, gate_a_t: [B, D]`; `state: [B, D]`, None opens a segment."""
    start = jnp.full(x_t.shape, state is None)
    a, normalized_x = decay_and_input(x_t, gate_x_t, gate_a_t, a_param, start, c)
    if state is None:
        state = jnp.zeros(x_t.shape, a.dtype)
    state = a * state + normalized_x
    return state.astype(x_t.dtype), state


def decay_and_input(
    x: jax.Array,
    gate_x: jax.Array,
    gate_a: jax.Array,
    a_param: jax.Array,
    start: jax.Array,
    c: float,
) -> tuple[jax.Array, jax.Array]:
    """`a_t` and `sqrt(1 - a_t^2) i_t x_t` (multiplier 1 where `start`), in float32."""
    acc = accumulation_dtype(x.dtype, gate_x.dtype, gate_a.dtype, a_param.dtype)
    log_a = -c * jax.nn.sigmoid(gate_a.astype(acc)) * jax.nn.softplus(a_param.astype(acc))
    multiplier = sqrt_bounded_derivative(1.0 - jnp.exp(2.0 * log_a))
    multiplier = jnp.where(start, jnp.ones_like(multiplier), multiplier)
    gated_x = jax.nn.sigmoid(gate_x.astype(acc)) * x.astype(acc)
    return jnp.exp(log_a), multiplier * gated_x


def _rg_lru_reference(x, gate_x, gate_a, a_param, initial_state, segment_ids, c):
    batch, _, width = x.shape
    acc = accumulation_dtype(x.dtype, gate_x.dtype, gate_a.dtype, a_param.dtype)
    softplus_a = jax.nn.softplus(a_param.astype(acc))
    h0 = jnp.zeros((batch, width), acc) if initial_state is None else initial_state.astype(acc)
    first = jnp.full((batch,), initial_state is None)

    def step(carry, inputs):
        h, is_first = carry
        start, (x_t, gate_x_t, gate_a_t) = inputs
        start = start | is_first
        h = reset(start, h)
        log_a = -c * jax.nn.sigmoid(gate_a_t.astype(acc)) * softplus_a
        multiplier = jnp.where(
            start[:, None], 1.0, sqrt_bounded_derivative(1.0 - jnp.exp(2.0 * log_a))
        )
        h = jnp.exp(log_a) * h + multiplier * jax.nn.sigmoid(gate_x_t.astype(acc)) * x_t
        return (h, jnp.zeros_like(is_first)), h.astype(x.dtype)

    outputs, (final, _) = scan_tokens(step, (h0, first), (x, gate_x, gate_a), segment_ids)
    return outputs, final
