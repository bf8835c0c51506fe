import jax
import jax.numpy as jnp
import numpy as np
import pytest
from contract import OpContract, OpSpec, assert_trees_close

from seqjax.ops.mlstm import MLSTMState, mlstm, mlstm_chunk_states, mlstm_step

H, K, V = 2, 8, 5
CHUNK = 16


def make_inputs(key, batch, length, dtype):
    kq, kk, kv, ki, kf = jax.random.split(key, 5)
    inputs = {
        "q": jax.random.normal(kq, (batch, length, H, K)),
        "k": jax.random.normal(kk, (batch, length, H, K)),
        "v": jax.random.normal(kv, (batch, length, H, V)),
        # Input gates exp(i) from e^-6 to e^6; forget gates mostly near 1, as xLSTM's are.
        "i": 2.0 * jax.random.normal(ki, (batch, length, H)),
        "f": 2.0 + jax.random.normal(kf, (batch, length, H)),
    }
    return {name: x.astype(dtype) for name, x in inputs.items()}


def random_state(key, batch):
    kc, kn, km = jax.random.split(key, 3)
    return MLSTMState(
        jax.random.normal(kc, (batch, H, K, V)),
        jax.random.normal(kn, (batch, H, K)),
        jax.random.normal(km, (batch, H)),
    )


def gates(x):
    return x["q"], x["k"], x["v"], x["i"], x["f"]


MLSTM_SPEC = OpSpec(
    make_inputs=make_inputs,
    apply=lambda x, s, ids, impl: mlstm(
        *gates(x), initial_state=s, segment_ids=ids, impl=impl, chunk_size=CHUNK
    ),
    make_state=random_state,
    step=lambda x, s: mlstm_step(*gates(x), s),
    time_inputs=frozenset({"q", "k", "v", "i", "f"}),
    impls=("chunked", "parallel"),
    chunk_size=CHUNK,
)


class TestMLSTM(OpContract):
    spec = MLSTM_SPEC


def unstabilized_mlstm(q, k, v, i, f, segment_ids):
    """The recurrence without stabilizer, in float64 numpy: `C_t = sigmoid(f_t) C + exp(i_t)
    k_t v_t^T`, `n_t` likewise, `h_t = C_t^T q_t / max(|n_t . q_t|, 1)`, q scaled by K^-1/2."""
    q, k, v, i, f = (np.asarray(x, np.float64) for x in (q, k, v, i, f))
    q = q * K**-0.5
    batch, length = i.shape[:2]
    C = np.zeros((batch, H, K, V))
    n = np.zeros((batch, H, K))
    h = np.zeros((batch, length, H, V))
    for b in range(batch):
        for t in range(length):
            if t > 0 and segment_ids[b, t] != segment_ids[b, t - 1]:
                C[b], n[b] = 0.0, 0.0
            forget = 1.0 / (1.0 + np.exp(-f[b, t]))
            write = np.exp(i[b, t])
            C[b] = forget[:, None, None] * C[b] + write[:, None, None] * np.einsum(
                "hk,hv->hkv", k[b, t], v[b, t]
            )
            n[b] = forget[:, None] * n[b] + write[:, None] * k[b, t]
            numerator = np.einsum("hk,hkv->hv", q[b, t], C[b])
            denominator = np.maximum(np.abs(np.einsum("hk,hk->h", q[b, t], n[b])), 1.0)
            h[b, t] = numerator / denominator[:, None]
    return h, C, n


@pytest.mark.parametrize("impl", ["reference", "chunked", "parallel"])
def test_matches_the_unstabilized_recurrence(impl):
    # Small input gates keep m near 0, so the 1e-6 of the normalizer is negligible.
    x = make_inputs(jax.random.key(3), 2, 40, jnp.float32)
    x["i"] = 0.1 * x["i"]
    ids = np.zeros((2, 40), np.int32)
    ids[0, 15:] = 1
    ids[0, 29:] = 2
    h, state = mlstm(*gates(x), segment_ids=jnp.asarray(ids), impl=impl, chunk_size=CHUNK)
    expected_h, expected_C, expected_n = (
        array.astype(np.float32) for array in unstabilized_mlstm(*gates(x), ids)
    )
    unstabilize = jnp.exp(state.m)
    assert_trees_close(h, expected_h, 2e-5, "h")
    assert_trees_close(state.C * unstabilize[..., None, None], expected_C, 2e-5, "C exp(m)")
    assert_trees_close(state.n * unstabilize[..., None], expected_n, 2e-5, "n exp(m)")


def test_large_input_gates_give_finite_values_and_gradients():
    # exp(i) up to e^30 and forget gates down to sigmoid(-40): the unstabilized memory and
    # the cumulative decays of a 64-token chunk (far below exp(-1000)) leave float32's range.
    batch, length = 1, 300
    x = make_inputs(jax.random.key(4), batch, length, jnp.float32)
    ki, kf = jax.random.split(jax.random.key(5))
    x["i"] = jax.random.uniform(ki, (batch, length, H), minval=-30.0, maxval=30.0)
    x["f"] = -20.0 + 10.0 * jax.random.normal(kf, (batch, length, H))

    def loss(impl):
        def f(x):
            h, final = mlstm(*gates(x), impl=impl)
            return jnp.sum(h * jnp.cos(h)) + sum(jnp.sum(leaf) for leaf in final)

        return jax.jit(jax.value_and_grad(f))

    expected = loss("reference")(x)
    actual = loss("chunked")(x)
    for leaf in jax.tree.leaves(actual):
        assert np.all(np.isfinite(np.asarray(leaf)))
    assert_trees_close(actual, expected, 1e-4, "chunked (loss, grads) with gates up to e^30")


def test_chunk_states_are_the_states_after_every_chunk_boundary():
    x = make_inputs(jax.random.key(6), 2, 50, jnp.float32)
    h0 = random_state(jax.random.key(7), 2)
    states = mlstm_chunk_states(x["k"], x["v"], x["i"], x["f"], initial_state=h0, chunk_size=CHUNK)
    assert jax.tree.map(jnp.shape, states) == MLSTMState((2, 4, H, K, V), (2, 4, H, K), (2, 4, H))
    expected = [h0]
    for end in (16, 32, 48):
        _, state = mlstm(*(g[:, :end] for g in gates(x)), initial_state=h0, impl="reference")
        expected.append(state)
    expected = jax.tree.map(lambda *xs: jnp.stack(xs, axis=1), *expected)
    assert_trees_close(states, expected, 1e-5, "chunk states")


def test_rejects_mismatched_head_counts():
    q = jnp.zeros((1, 4, 2, 8))
    with pytest.raises(ValueError, match=r"k: expected shape \[B, T, H, K\] = \[1, 4, 2, 8\]"):
        mlstm(q, jnp.zeros((1, 4, 3, 8)), q, jnp.zeros((1, 4, 2)), jnp.zeros((1, 4, 2)))


def test_rejects_per_channel_gates():
    q = jnp.zeros((1, 4, 2, 8))
    with pytest.raises(ValueError, match=r"f: expected shape \[B, T, H\] = \[1, 4, 2\]"):
        mlstm(q, q, q, jnp.zeros((1, 4, 2)), q)


def test_rejects_a_state_of_the_wrong_shape_or_type():
    q, gate = jnp.zeros((1, 4, 2, 8)), jnp.zeros((1, 4, 2))
    state = MLSTMState(jnp.zeros((1, 2, 8, 8)), jnp.zeros((1, 2, 8)), jnp.zeros((1, 2, 1)))
    with pytest.raises(ValueError, match=r"initial_state.m: expected shape \[B, H\] = \[1, 2\]"):
        mlstm(q, q, q, gate, gate, initial_state=state)
    with pytest.raises(TypeError, match="initial_state: expected an MLSTMState"):
        mlstm(q, q, q, gate, gate, initial_state=jnp.zeros((1, 2, 8, 8)))
    with pytest.raises(ValueError, match=r"state.n: expected shape \[B, H, K\] = \[1, 2, 8\]"):
        mlstm_step(q[:, 0], q[:, 0], q[:, 0], gate[:, 0], gate[:, 0], state._replace(n=q))


def test_rejects_unknown_impl_and_float_segment_ids():
    q, gate = jnp.zeros((1, 4, 2, 8)), jnp.zeros((1, 4, 2))
    with pytest.raises(ValueError, match="impl: expected one of"):
        mlstm(q, q, q, gate, gate, impl="pallas")
    with pytest.raises(TypeError, match="segment_ids: expected an integer array"):
        mlstm(q, q, q, gate, gate, segment_ids=jnp.zeros((1, 4)))
