"""Head-wise nonlinear RNN cells: sLSTM, LSTM and GRU (Pöppel et al., "FlashRNN: I/O-Aware
Optimization of Traditional RNNs on modern hardware"; Beck et al., "xLSTM: Extended Long
Short-Term Memory"). Reference code: NX-AI/flashrnn `flashrnn/vanilla/{slstm,lstm,gru}.py`
and NX-AI/xlstm `blocks/slstm/src/vanilla/slstm.py`, `blocks/slstm/src/cuda/slstm_pointwise.cu`.

Every cell feeds its previous output `h_{t-1}` back through a recurrent matrix that is
block-diagonal over `H` heads (FlashRNN's "multiple smaller RNNs in parallel"): with the
precomputed input pre-activations `x_t` (`x W + b`, bias included) of gate `g` and head `h`,

    a_t[h, g] = x_t[h, g] + h_{t-1}[h] R[h, :, g, :]        (R: [H, D, G, D])

where `D` is the head dim and `G` the number of gates. Gates are in float32.

**LSTM** (Hochreiter & Schmidhuber; gates `i, f, z, o`):

    c_t = sigmoid(a_f) c_{t-1} + sigmoid(a_i) tanh(a_z),     h_t = sigmoid(a_o) tanh(c_t)

**sLSTM** (xLSTM; gates `i, f, z, o`), an exponential input gate with a normalizer `n` and a
max stabilizer `m` (PAPERS.md B.1.12):

    m_t  = max(log sigmoid(a_f) + m_{t-1}, a_i)
    i'_t = exp(a_i - m_t),   f'_t = exp(log sigmoid(a_f) + m_{t-1} - m_t)
    c_t  = f'_t c_{t-1} + i'_t tanh(a_z),     n_t = f'_t n_{t-1} + i'_t
    h_t  = sigmoid(a_o) c_t / n_t

`(c, n)` are the unstabilized cell and normalizer times `exp(-m_t)`, so `h` does not depend on
`m`. As xLSTM's kernels do, a fresh state (`n = 0`: the start, or a segment start) takes
`m_t = a_i` (and `f'_t` is clipped at 1): the plain max would give the same `h`, but a very
negative first input gate would underflow `i'_t` and leave `n_t = 0`. After any step `n_t >= 1`.

**GRU** (Cho et al., in the cuDNN / PyTorch form FlashRNN uses; gates `r, z, n`, the reset gate
applied to the recurrent candidate term, which has its own bias `b_n`):

    r_t = sigmoid(a_r),   z_t = sigmoid(a_z),   n_t = tanh(x_n + r_t (h_{t-1} R_n + b_n))
    h_t = z_t h_{t-1} + (1 - z_t) n_t

The cells are strictly sequential: `"reference"` is a `lax.scan` over tokens and `"auto"` picks
it (the one impl; a fused kernel would be added beside it). Segment starts restart the state
from zeros. States are float32 `NamedTuple`s of `[B, H, D]` arrays; outputs are `h` in the dtype
of `x`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp

from seqjax import checks
from seqjax.ops.common import reset, scan_tokens
from seqjax.scan.linear_recurrence import accumulation_dtype

RNNImpl = Literal["auto", "reference"]
RNN_IMPLS: tuple[str, ...] = ("auto", "reference")
LSTM_GATES = 4  # i, f, z, o
SLSTM_GATES = 4  # i, f, z, o
GRU_GATES = 3  # r, z, n


class LSTMState(NamedTuple):
    """LSTM state, float32 `[B, H, D]` each: the output `h` and the cell `c`."""

    h: jax.Array
    c: jax.Array


class SLSTMState(NamedTuple):
    """sLSTM state, float32 `[B, H, D]` each: the output `h`, the cell `c` and the normalizer
    `n` (both times `exp(-m)`) and the stabilizer `m`."""

    h: jax.Array
    c: jax.Array
    n: jax.Array
    m: jax.Array


class GRUState(NamedTuple):
    """GRU state, float32 `[B, H, D]`: the output `h`."""

    h: jax.Array


def recurrent_preactivations(h: jax.Array, R: jax.Array) -> jax.Array:
    """`h: [B, H, D]` through the block-diagonal `R: [H, D, G, D]`: `[B, H, G, D]`."""
    return jnp.einsum("bhd,hdge->bhge", h, R)


def _lstm_cell(state: LSTMState, a: jax.Array) -> LSTMState:
    i, f, z, o = (a[:, :, g] for g in range(LSTM_GATES))
    c = jax.nn.sigmoid(f) * state.c + jax.nn.sigmoid(i) * jnp.tanh(z)
    return LSTMState(jax.nn.sigmoid(o) * jnp.tanh(c), c)


def _slstm_cell(state: SLSTMState, a: jax.Array) -> SLSTMState:
    i, f, z, o = (a[:, :, g] for g in range(SLSTM_GATES))
    log_forget = jax.nn.log_sigmoid(f) + state.m
    m = jnp.where(state.n == 0, i, jnp.maximum(log_forget, i))
    forget = jnp.exp(jnp.minimum(log_forget - m, 0.0))
    write = jnp.exp(i - m)
    c = forget * state.c + write * jnp.tanh(z)
    n = forget * state.n + write
    return SLSTMState(jax.nn.sigmoid(o) * c / n, c, n, m)


def _gru_cell(state: GRUState, x: jax.Array, recurrent: jax.Array, bias: jax.Array) -> GRUState:
    """`x, recurrent: [B, H, 3, D]`, the input and recurrent pre-activations of `r, z, n`."""
    r = jax.nn.sigmoid(x[:, :, 0] + recurrent[:, :, 0])
    z = jax.nn.sigmoid(x[:, :, 1] + recurrent[:, :, 1])
    candidate = jnp.tanh(x[:, :, 2] + r * (recurrent[:, :, 2] + bias))
    return GRUState(z * state.h + (1 - z) * candidate)


def _lstm_step(state, x_t, R):
    return _lstm_cell(state, x_t + recurrent_preactivations(state.h, R))


def _slstm_step(state, x_t, R):
    return _slstm_cell(state, x_t + recurrent_preactivations(state.h, R))


def _gru_step(bias):
    def step(state, x_t, R):
        recurrent = recurrent_preactivations(state.h, R)
        return _gru_cell(state, x_t, recurrent, bias.astype(R.dtype))

    return step


# ----------------------------------------------------------------------------- the drivers


def _validate(name: str, x, R, gates: int, state, state_type, time: bool) -> None:
    dims = checks.Dims(G=gates)
    dims.check(name, x, "B T H G D" if time else "B H G D")
    dims.check("R", R, "H D G D")
    checks.check_floating(name, x)
    checks.check_floating("R", R)
    if state is not None:
        if not isinstance(state, state_type):
            fields = ", ".join(state_type._fields)
            got = type(state).__name__
            raise TypeError(f"state: expected a {state_type.__name__}({fields}), got {got}")
        for field, leaf in zip(state_type._fields, state, strict=True):
            dims.check(f"state.{field}", leaf, "B H D")


def _initial(state, state_type, batch, heads, head_dim, acc):
    if state is None:
        return state_type(*(jnp.zeros((batch, heads, head_dim), acc) for _ in state_type._fields))
    return state_type(*(leaf.astype(acc) for leaf in state))


def _scan(
    step: Callable, x: jax.Array, R: jax.Array, state, state_type, segment_ids, acc
) -> tuple[jax.Array, NamedTuple]:
    batch, _, heads, _, head_dim = x.shape
    state = _initial(state, state_type, batch, heads, head_dim, acc)
    R = R.astype(acc)

    def token(state, xs):
        start, x_t = xs
        state = jax.tree.map(lambda s: reset(start, s), state)
        state = step(state, x_t.astype(acc), R)
        return state, state.h.astype(x.dtype)

    return scan_tokens(token, state, x, segment_ids)


def _run(step, x, R, initial_state, state_type, gates, segment_ids, impl, *extra_dtypes):
    _validate("x", x, R, gates, initial_state, state_type, time=True)
    checks.check_segment_ids(segment_ids, *x.shape[:2])
    checks.check_choice("impl", impl, RNN_IMPLS)
    states = () if initial_state is None else tuple(s.dtype for s in initial_state)
    acc = accumulation_dtype(x.dtype, R.dtype, *states, *extra_dtypes)
    return _scan(step, x, R, initial_state, state_type, segment_ids, acc)


def _one_token(step, x_t, R, state, state_type, gates, *extra_dtypes):
    _validate("x_t", x_t, R, gates, state, state_type, time=False)
    states = () if state is None else tuple(s.dtype for s in state)
    acc = accumulation_dtype(x_t.dtype, R.dtype, *states, *extra_dtypes)
    batch, heads, _, head_dim = x_t.shape
    state = _initial(state, state_type, batch, heads, head_dim, acc)
    state = step(state, x_t.astype(acc), R.astype(acc))
    return state.h.astype(x_t.dtype), state


# ----------------------------------------------------------------------------- the ops


def lstm(
    x: jax.Array,
    R: jax.Array,
    *,
    initial_state: LSTMState | None = None,
    segment_ids: jax.Array | None = None,
    impl: RNNImpl = "auto",
) -> tuple[jax.Array, LSTMState]:
    """The head-wise LSTM (module docstring).

    Args:
      x: input pre-activations (bias included) `[B, T, H, 4, D]`, gates `i, f, z, o`.
      R: block-diagonal recurrent weights `[H, D, 4, D]` (head, input, gate, output).
      initial_state: an `LSTMState`; None means zeros.
      segment_ids: `[B, T]` ints; the state restarts from zeros at every new segment.
      impl: `"reference"` or `"auto"` (the same `lax.scan`).

    Returns:
      `h: [B, T, H, D]` in the dtype of `x`, and the float32 `LSTMState` after each row's
      last token.
    """
    return _run(_lstm_step, x, R, initial_state, LSTMState, LSTM_GATES, segment_ids, impl)


def lstm_step(x_t: jax.Array, R: jax.Array, state: LSTMState | None) -> tuple[jax.Array, LSTMState]:
    """One token of `lstm`: `x_t: [B, H, 4, D]` -> `(h_t [B, H, D], new_state)`."""
    return _one_token(_lstm_step, x_t, R, state, LSTMState, LSTM_GATES)


def slstm(
    x: jax.Array,
    R: jax.Array,
    *,
    initial_state: SLSTMState | None = None,
    segment_ids: jax.Array | None = None,
    impl: RNNImpl = "auto",
) -> tuple[jax.Array, SLSTMState]:
    """The head-wise sLSTM of xLSTM (module docstring), stabilized.

    Args:
      x: input pre-activations (bias included) `[B, T, H, 4, D]`, gates `i, f, z, o`.
      R: block-diagonal recurrent weights `[H, D, 4, D]` (head, input, gate, output).
      initial_state: an `SLSTMState`; None means zeros (a fresh state, `n = 0`).
      segment_ids: `[B, T]` ints; the state restarts from zeros at every new segment.
      impl: `"reference"` or `"auto"` (the same `lax.scan`).

    Returns:
      `h: [B, T, H, D]` in the dtype of `x`, and the float32 `SLSTMState` after each row's
      last token.
    """
    return _run(_slstm_step, x, R, initial_state, SLSTMState, SLSTM_GATES, segment_ids, impl)


def slstm_step(
    x_t: jax.Array, R: jax.Array, state: SLSTMState | None
) -> tuple[jax.Array, SLSTMState]:
    """One token of `slstm`: `x_t: [B, H, 4, D]` -> `(h_t [B, H, D], new_state)`."""
    return _one_token(_slstm_step, x_t, R, state, SLSTMState, SLSTM_GATES)


def _gru_bias(bias: jax.Array | None, R: jax.Array) -> jax.Array:
    """`recurrent_bias` checked against `R`, zeros for None."""
    checks.Dims(G=GRU_GATES).check("R", R, "H D G D")
    heads, head_dim = R.shape[0], R.shape[-1]
    if bias is None:
        return jnp.zeros((heads, head_dim), R.dtype)
    checks.Dims(H=heads, D=head_dim).check("recurrent_bias", bias, "H D")
    checks.check_floating("recurrent_bias", bias)
    return bias


def gru(
    x: jax.Array,
    R: jax.Array,
    recurrent_bias: jax.Array | None = None,
    *,
    initial_state: GRUState | None = None,
    segment_ids: jax.Array | None = None,
    impl: RNNImpl = "auto",
) -> tuple[jax.Array, GRUState]:
    """The head-wise GRU (module docstring).

    Args:
      x: input pre-activations (bias included) `[B, T, H, 3, D]`, gates `r, z, n`.
      R: block-diagonal recurrent weights `[H, D, 3, D]` (head, input, gate, output).
      recurrent_bias: `b_n: [H, D]`, the bias of the recurrent candidate term (inside the
        reset gate); None means zeros.
      initial_state: a `GRUState`; None means zeros.
      segment_ids: `[B, T]` ints; the state restarts from zeros at every new segment.
      impl: `"reference"` or `"auto"` (the same `lax.scan`).

    Returns:
      `h: [B, T, H, D]` in the dtype of `x`, and the float32 `GRUState` after each row's
      last token.
    """
    bias = _gru_bias(recurrent_bias, R)
    return _run(
        _gru_step(bias), x, R, initial_state, GRUState, GRU_GATES, segment_ids, impl, bias.dtype
    )


def gru_step(
    x_t: jax.Array,
    R: jax.Array,
    state: GRUState | None,
    recurrent_bias: jax.Array | None = None,
) -> tuple[jax.Array, GRUState]:
    """One token of `gru`: `x_t: [B, H, 3, D]` -> `(h_t [B, H, D], new_state)`."""
    bias = _gru_bias(recurrent_bias, R)
    return _one_token(_gru_step(bias), x_t, R, state, GRUState, GRU_GATES, bias.dtype)
