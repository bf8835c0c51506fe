import jax
import jax.numpy as jnp
import numpy as np
import pytest
from contract import OpContract, OpSpec, assert_trees_close, packed_segment_ids

from seqjax.ops.selective_scan import selective_scan
from seqjax.ops.ssd import ssd, ssd_chunk_states, ssd_step

H, G, P, N = 4, 2, 3, 5  # heads, groups of B and C, head dim, state size
CHUNK = 16


def make_inputs(key, batch, length, dtype, *, heads=H, groups=G, head_dim=P):
    keys = jax.random.split(key, 7)
    inputs = {
        "x": jax.random.normal(keys[0], (batch, length, heads, head_dim)),
        "dt": jax.random.normal(keys[1], (batch, length, heads)) - 1.0,
        "A": -jnp.exp(jax.random.normal(keys[2], (heads,))),
        "B": jax.random.normal(keys[3], (batch, length, groups, N)),
        "C": jax.random.normal(keys[4], (batch, length, groups, N)),
        "D": jax.random.normal(keys[5], (heads,)),
        "dt_bias": 0.5 * jax.random.normal(keys[6], (heads,)),
    }
    return {name: value.astype(dtype) for name, value in inputs.items()}


def make_state(key, batch):
    return jax.random.normal(key, (batch, H, N, P))


SSD_SPEC = OpSpec(
    make_inputs=make_inputs,
    apply=lambda i, s, ids, impl: ssd(
        i["x"],
        i["dt"],
        i["A"],
        i["B"],
        i["C"],
        i["D"],
        i["dt_bias"],
        s,
        segment_ids=ids,
        impl=impl,
        chunk_size=CHUNK,
    ),
    make_state=make_state,
    step=lambda i, s: ssd_step(i["x"], i["dt"], i["A"], i["B"], i["C"], i["D"], i["dt_bias"], s),
    time_inputs=frozenset({"x", "dt", "B", "C"}),
    impls=("chunked", "parallel"),
    chunk_size=CHUNK,
)


class TestSSD(OpContract):
    spec = SSD_SPEC


def ssd_numpy(x, dt, A, B, C, D, dt_bias, h0, *, dt_softplus):
    """The equations of `seqjax.ops.ssd`, one head and one token at a time, in float64."""
    x, dt, A, B, C, D, dt_bias, h = (
        np.asarray(a, np.float64) for a in (x, dt, A, B, C, D, dt_bias, h0)
    )
    batch, length, heads, _ = x.shape
    heads_per_group = heads // B.shape[2]
    y = np.zeros_like(x)
    for b in range(batch):
        for t in range(length):
            for head in range(heads):
                group = head // heads_per_group
                step = dt[b, t, head] + dt_bias[head]
                if dt_softplus:
                    step = np.log1p(np.exp(step))
                h[b, head] = np.exp(step * A[head]) * h[b, head] + np.outer(
                    B[b, t, group], step * x[b, t, head]
                )
                y[b, t, head] = h[b, head].T @ C[b, t, group] + D[head] * x[b, t, head]
    return y.astype(np.float32), h.astype(np.float32)  # the comparison runs in float32


@pytest.mark.parametrize("dt_softplus", [True, False])
def test_matches_a_numpy_loop_of_the_equations(dt_softplus):
    inputs = make_inputs(jax.random.key(0), 2, 11, jnp.float32)
    if not dt_softplus:
        inputs["dt"] = jnp.abs(inputs["dt"])
        inputs["dt_bias"] = jnp.abs(inputs["dt_bias"])
    h0 = make_state(jax.random.key(1), 2)
    expected = ssd_numpy(**inputs, h0=h0, dt_softplus=dt_softplus)
    for impl in ("reference", "chunked"):
        actual = ssd(**inputs, initial_state=h0, dt_softplus=dt_softplus, impl=impl, chunk_size=4)
        assert_trees_close(actual, expected, 2e-5, f"{impl} vs numpy, dt_softplus={dt_softplus}")


def test_equals_selective_scan_with_one_channel_per_head_and_A_equal_across_the_state():
    # Mamba-1 with A[d, n] = A_d for every n is SSD with P = 1: channel d is head d, its
    # [N] state is the [N, 1] state of the head, and selective_scan's contiguous channel
    # groups are SSD's head groups (h // (H / G)).
    batch, length, heads = 2, 37, 6
    inputs = make_inputs(jax.random.key(2), batch, length, jnp.float32, heads=heads, head_dim=1)
    h0 = jax.random.normal(jax.random.key(3), (batch, heads, N, 1))
    ids = packed_segment_ids(batch, length)
    expected = ssd(**inputs, initial_state=h0, segment_ids=ids, chunk_size=CHUNK)
    y, final = selective_scan(
        inputs["x"][..., 0],
        inputs["dt"],
        jnp.broadcast_to(inputs["A"][:, None], (heads, N)),
        inputs["B"],
        inputs["C"],
        inputs["D"],
        dt_bias=inputs["dt_bias"],
        initial_state=h0[..., 0],
        segment_ids=ids,
    )
    assert_trees_close((y[..., None], final[..., None]), expected, 2e-5, "selective_scan")


def test_chunk_states_are_the_states_entering_every_chunk():
    inputs = make_inputs(jax.random.key(4), 2, 40, jnp.float32)
    h0 = make_state(jax.random.key(5), 2)
    args = (inputs["x"], inputs["dt"], inputs["A"], inputs["B"])
    states = ssd_chunk_states(*args, dt_bias=inputs["dt_bias"], initial_state=h0, chunk_size=CHUNK)
    assert states.shape == (2, 3, H, N, P)
    expected = [h0]
    for end in (CHUNK, 2 * CHUNK):
        prefix = {
            name: value[:, :end] if value.ndim > 1 else value for name, value in inputs.items()
        }
        expected.append(ssd(**prefix, initial_state=h0)[1])
    assert_trees_close(states, jnp.stack(expected, axis=1), 1e-5, "chunk states")


def test_state_starts_at_zero_and_output_has_the_input_dtype():
    inputs = make_inputs(jax.random.key(6), 1, 5, jnp.bfloat16)
    y, final = ssd(**inputs)
    assert y.dtype == jnp.bfloat16 and final.dtype == jnp.float32
    y_t, state = ssd_step(
        *(inputs[n][:, 0] for n in ("x", "dt")),
        inputs["A"],
        inputs["B"][:, 0],
        inputs["C"][:, 0],
        inputs["D"],
        inputs["dt_bias"],
    )
    assert y_t.dtype == jnp.bfloat16 and state.shape == (1, H, N, P)
    assert_trees_close(y_t, y[:, 0], 1e-2, "first token from a zero state")


def test_rejects_heads_that_do_not_split_into_groups():
    inputs = make_inputs(jax.random.key(7), 1, 4, jnp.float32, groups=3)
    with pytest.raises(ValueError, match=r"B: the H = 4 heads .* G = 3 .*H % G must be 0"):
        ssd(**inputs)


def test_rejects_C_with_other_groups_than_B():
    inputs = make_inputs(jax.random.key(8), 1, 4, jnp.float32)
    inputs["C"] = jnp.zeros((1, 4, 1, N))
    with pytest.raises(ValueError, match=r"C: expected shape \[B, T, G, N\] = \[1, 4, 2, 5\]"):
        ssd(**inputs)


def test_rejects_a_state_of_the_wrong_shape():
    inputs = make_inputs(jax.random.key(9), 1, 4, jnp.float32)
    with pytest.raises(ValueError, match=r"initial_state: expected shape \[B, H, N, P\]"):
        ssd(**inputs, initial_state=jnp.zeros((1, H, P, N)))


def test_rejects_positive_A_when_concrete():
    inputs = make_inputs(jax.random.key(10), 1, 4, jnp.float32)
    inputs["A"] = -inputs["A"]
    with pytest.raises(ValueError, match=r"A: expected A <= 0"):
        ssd(**inputs)


def test_rejects_negative_step_sizes_without_softplus_when_concrete():
    inputs = make_inputs(jax.random.key(11), 1, 4, jnp.float32)
    inputs["dt"] = -jnp.abs(inputs["dt"]) - 1.0
    with pytest.raises(ValueError, match=r"dt: expected step sizes dt \+ dt_bias >= 0"):
        ssd(**inputs, dt_softplus=False)
