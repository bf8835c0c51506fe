import jax
import jax.numpy as jnp
import numpy as np
import pytest
from contract import OpContract, OpSpec, assert_trees_close

from seqjax.ops.rnn_cells import (
    GRUState,
    LSTMState,
    SLSTMState,
    gru,
    gru_step,
    lstm,
    lstm_step,
    slstm,
    slstm_step,
)

H, D = 2, 3
CHUNK = 8


def make_inputs(gates, input_gate_scale=1.0):
    def make(key, batch, length, dtype):
        kx, kr, kb = jax.random.split(key, 3)
        x = jax.random.normal(kx, (batch, length, H, gates, D))
        # sLSTM: exponential input gates from about e^-6 to e^6 exercise the stabilizer.
        x = x.at[..., 0, :].multiply(input_gate_scale)
        inputs = {
            "x": x,
            "R": jax.random.normal(kr, (H, D, gates, D)) / np.sqrt(D),
            "b": jax.random.normal(kb, (H, D)),
        }
        return {name: value.astype(dtype) for name, value in inputs.items()}

    return make


def random_state(state_type):
    def make(key, batch):
        leaves = jax.random.normal(key, (len(state_type._fields), batch, H, D))
        if state_type is SLSTMState:  # a reachable state has a positive normalizer
            leaves = leaves.at[2].set(jnp.exp(leaves[2]))
        return state_type(*leaves)

    return make


def spec(op, step, state_type, gates, **input_options):
    return OpSpec(
        make_inputs=make_inputs(gates, **input_options),
        apply=lambda i, s, ids, impl: op(i, s, ids, impl),
        make_state=random_state(state_type),
        step=step,
        time_inputs=frozenset({"x"}),
        impls=("auto",),
        chunk_size=CHUNK,
    )


# The harness runs for the sLSTM by default; LSTM and GRU share its driver, so theirs is `slow`
# (their math is checked by default against the dense recurrence below).
@pytest.mark.slow
class TestLSTM(OpContract):
    spec = spec(
        lambda i, s, ids, impl: lstm(i["x"], i["R"], initial_state=s, segment_ids=ids, impl=impl),
        lambda i, s: lstm_step(i["x"], i["R"], s),
        LSTMState,
        4,
    )


class TestSLSTM(OpContract):
    spec = spec(
        lambda i, s, ids, impl: slstm(i["x"], i["R"], initial_state=s, segment_ids=ids, impl=impl),
        lambda i, s: slstm_step(i["x"], i["R"], s),
        SLSTMState,
        4,
        input_gate_scale=3.0,
    )


@pytest.mark.slow
class TestGRU(OpContract):
    spec = spec(
        lambda i, s, ids, impl: gru(
            i["x"], i["R"], i["b"], initial_state=s, segment_ids=ids, impl=impl
        ),
        lambda i, s: gru_step(i["x"], i["R"], s, i["b"]),
        GRUState,
        3,
    )


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def numpy_cells(kind, x, R, b):
    """The three cells from zeros in float64 numpy, with the recurrent matrix as one dense
    block-diagonal `[H D, G, H D]` matrix and the sLSTM unstabilized (`exp(i)` as is)."""
    x, R, b = (np.asarray(a, np.float64) for a in (x, R, b))
    batch, length, heads, gates, dim = x.shape
    dense = np.zeros((heads * dim, gates, heads * dim))
    for h in range(heads):
        dense[h * dim : (h + 1) * dim, :, h * dim : (h + 1) * dim] = R[h]
    h, c, n = (np.zeros((batch, heads * dim)) for _ in range(3))
    outputs = []
    for t in range(length):
        a = x[:, t].transpose(0, 2, 1, 3).reshape(batch, gates, heads * dim)
        r = np.einsum("bd,dge->bge", h, dense)
        if kind == "gru":
            reset, update = sigmoid(a[:, 0] + r[:, 0]), sigmoid(a[:, 1] + r[:, 1])
            candidate = np.tanh(a[:, 2] + reset * (r[:, 2] + b.reshape(-1)))
            h = update * h + (1 - update) * candidate
        else:
            i, f, z, o = (a[:, g] + r[:, g] for g in range(4))
            if kind == "lstm":
                c = sigmoid(f) * c + sigmoid(i) * np.tanh(z)
                h = sigmoid(o) * np.tanh(c)
            else:
                c = sigmoid(f) * c + np.exp(i) * np.tanh(z)
                n = sigmoid(f) * n + np.exp(i)
                h = sigmoid(o) * c / n
        outputs.append(h.reshape(batch, heads, dim))
    return np.stack(outputs, axis=1)


@pytest.mark.parametrize("kind", ["lstm", "slstm", "gru"])
def test_cells_match_dense_block_diagonal_recurrence(kind):
    gates = 3 if kind == "gru" else 4
    inputs = make_inputs(gates, input_gate_scale=3.0)(jax.random.key(4), 2, 11, jnp.float32)
    x, R, b = inputs["x"], inputs["R"], inputs["b"]
    if kind == "lstm":
        h, _ = lstm(x, R)
    elif kind == "slstm":
        h, _ = slstm(x, R)
    else:
        h, _ = gru(x, R, b)
    assert_trees_close(h, jnp.asarray(numpy_cells(kind, x, R, b), jnp.float32), 1e-5, kind)


def test_slstm_very_negative_first_input_gate_stays_finite():
    x = jnp.zeros((1, 3, 1, 4, 2)).at[:, 0, :, 0].set(-200.0)
    h, state = slstm(x, jnp.zeros((1, 2, 4, 2)))
    assert bool(jnp.all(jnp.isfinite(h)))
    np.testing.assert_array_equal(np.asarray(state.n) >= 1, True)


def test_rejects_wrong_number_of_gates():
    with pytest.raises(ValueError, match=r"x: expected shape \[B, T, H, G, D\] = \[\?, \?, \?, 3"):
        gru(jnp.zeros((1, 2, 2, 4, 3)), jnp.zeros((2, 3, 3, 3)))


def test_rejects_mismatched_recurrent_matrix():
    with pytest.raises(ValueError, match=r"R: expected shape \[H, D, G, D\] = \[2, 3, 4, 3\]"):
        lstm(jnp.zeros((1, 2, 2, 4, 3)), jnp.zeros((2, 3, 4, 4)))


def test_rejects_wrong_state_type():
    with pytest.raises(TypeError, match=r"state: expected a SLSTMState\(h, c, n, m\)"):
        slstm(jnp.zeros((1, 2, 2, 4, 3)), jnp.zeros((2, 3, 4, 3)), initial_state=(0, 0))
