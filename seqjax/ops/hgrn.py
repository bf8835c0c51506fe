"""HGRN: the elementwise gated linear recurrence of Qin et al. (2023), fla's `ops/hgrn`.

    h_t = exp(g_t) * h_{t-1} + x_t,        o_t = h_t

`g <= 0` is the log forget gate (the layer builds it as `log(gamma + (1 - gamma) sigmoid(.))`
and folds `1 - f_t` into `x_t`); everything is elementwise over `D` channels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from seqjax import checks
from seqjax.ops.common import SCAN_OP_IMPLS, ScanOpImpl, reset, scan_tokens
from seqjax.scan import linear_recurrence
from seqjax.scan.linear_recurrence import DEFAULT_CHUNK_SIZE, accumulation_dtype


def hgrn(
    x: jax.Array,
    g: jax.Array,
    initial_state: jax.Array | None = None,
    *,
    segment_ids: jax.Array | None = None,
    impl: ScanOpImpl = "auto",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[jax.Array, jax.Array]:
    """HGRN recurrence over `x, g: [B, T, D]`; returns `(o [B, T, D], final_state [B, D])`.

    Args:
      x: inputs `[B, T, D]`.
      g: log forget gates `[B, T, D]`, `g <= 0` (checked when concrete).
      initial_state: `[B, D]`; None means zeros.
      segment_ids: `[B, T]` ints; the state restarts at every new segment.
      impl: `"reference"` (token loop), or one of the scan layer's algorithms
        (`"sequential"`, `"associative"`, `"chunked"`, `"auto"`), which share its
        recurrence-as-gradient `custom_vjp`.
      chunk_size: chunk length of `"chunked"`.

    Returns:
      `o` in the dtype of `x` and the float32 state after each row's last token.
    """
    dims = checks.Dims()
    dims.check("x", x, "B T D")
    dims.check("g", g, "B T D")
    checks.check_floating("x", x)
    checks.check_floating("g", g)
    if initial_state is not None:
        dims.check("initial_state", initial_state, "B D")
    checks.check_segment_ids(segment_ids, *x.shape[:2])
    checks.check_choice("impl", impl, SCAN_OP_IMPLS)
    checks.check_values("g", g <= 0, "log forget gates g <= 0")
    if impl == "reference":
        return _hgrn_reference(x, g, initial_state, segment_ids)
    h, final = linear_recurrence(
        jnp.exp(g.astype(accumulation_dtype(g.dtype))),
        x,
        initial_state,
        segment_ids=segment_ids,
        impl=impl,
        chunk_size=chunk_size,
    )
    return h.astype(x.dtype), final


def hgrn_step(
    x_t: jax.Array, g_t: jax.Array, state: jax.Array | None
) -> tuple[jax.Array, jax.Array]:
    """One token: `x_t, g_t: [B, D]`, `state: [B, D]` or None (zeros) -> `(o_t, new_state)`."""
    acc = accumulation_dtype(x_t.dtype, g_t.dtype)
    if state is None:
        state = jnp.zeros(x_t.shape, acc)
    state = jnp.exp(g_t.astype(acc)) * state + x_t.astype(acc)
    return state.astype(x_t.dtype), state


def _hgrn_reference(x, g, initial_state, segment_ids):
    batch, _, width = x.shape
    acc = accumulation_dtype(x.dtype, g.dtype)
    h0 = jnp.zeros((batch, width), acc) if initial_state is None else initial_state.astype(acc)

    def step(h, inputs):
        start, (x_t, g_t) = inputs
        h = reset(start, h)
        h = jnp.exp(g_t.astype(acc)) * h + x_t.astype(acc)
        return h, h.astype(x.dtype)

    return scan_tokens(step, h0, (x, g), segment_ids)
