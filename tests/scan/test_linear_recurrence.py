"""The scan layer against a plain `lax.scan` differentiated by JAX itself (no custom_vjp)."""

import jax
import jax.numpy as jnp
import pytest
from contract import Case, OpContract, OpSpec, assert_trees_close, make_problem

from seqjax.scan import linear_recurrence, segment_starts

D = 5


def autodiff_scan(a, b, h0, segment_ids, reverse):
    """h_t = a_t h_{t-1} + b_t, written out; JAX differentiates it."""
    acc = jnp.promote_types(jnp.result_type(a, b, h0), jnp.float32)
    a, b = jnp.broadcast_to(a, b.shape).astype(acc), b.astype(acc)
    if reverse:
        a, b = a[:, ::-1], b[:, ::-1]
        segment_ids = None if segment_ids is None else segment_ids[:, ::-1]
    if segment_ids is not None:
        a = jnp.where(segment_starts(segment_ids)[..., None], 0.0, a)

    def step(h, inputs):
        a_t, b_t = inputs
        h = a_t * h + b_t
        return h, h

    h_last, h = jax.lax.scan(step, h0.astype(acc), (a.swapaxes(0, 1), b.swapaxes(0, 1)))
    h = h.swapaxes(0, 1)
    return (h[:, ::-1] if reverse else h), h_last


def make_spec(*, reverse=False, complex_decay=False, broadcast=False):
    def make_inputs(key, batch, length, dtype):
        ka, kb, kp = jax.random.split(key, 3)
        shape = (batch, length, 1 if broadcast else D)
        a = jax.random.uniform(ka, shape, minval=-1.0, maxval=1.0)
        if complex_decay:
            phase = jax.random.uniform(kp, shape, maxval=6.28)
            a = a * jnp.exp(1j * phase).astype(jnp.promote_types(dtype, jnp.complex64))
        else:
            a = a.astype(dtype)
        return {"a": a, "b": jax.random.normal(kb, (batch, length, D)).astype(dtype)}

    def make_state(key, batch):
        h0 = jax.random.normal(key, (batch, D))
        return h0.astype(jnp.complex64) if complex_decay else h0

    def apply(inputs, state, segment_ids, impl):
        a, b = inputs["a"], inputs["b"]
        if impl == "reference":
            return autodiff_scan(a, b, state, segment_ids, reverse)
        return linear_recurrence(
            a, b, state, reverse=reverse, segment_ids=segment_ids, impl=impl, chunk_size=16
        )

    def step(inputs, state):
        state = inputs["a"] * state + inputs["b"]
        return state, state

    return OpSpec(
        make_inputs=make_inputs,
        apply=apply,
        make_state=make_state,
        step=None if reverse else step,
        time_inputs=frozenset({"a", "b"}),
        impls=("sequential", "associative", "chunked"),
        chunk_size=16,
    )


class TestLinearRecurrence(OpContract):
    spec = make_spec()


class TestReversedLinearRecurrence(OpContract):
    spec = make_spec(reverse=True)

    def test_packed_segments_equal_separate_sequences(self, impl):
        """Reversed, `h0` seeds the last segment: it is the forward scan of the mirrored input,
        whose segments the forward class checks against separate sequences."""
        problem = make_problem(self.spec, Case(2 * 16 + 3, jnp.float32, True))
        a, b = problem.inputs["a"], problem.inputs["b"]
        ids = problem.segment_ids
        h, h_last = linear_recurrence(
            a, b, problem.state, reverse=True, segment_ids=ids, impl=impl, chunk_size=16
        )
        mirrored, mirrored_last = linear_recurrence(
            a[:, ::-1],
            b[:, ::-1],
            problem.state,
            segment_ids=ids[:, ::-1],
            impl=impl,
            chunk_size=16,
        )
        assert_trees_close((h, h_last), (mirrored[:, ::-1], mirrored_last), 1e-5, "reversed")


class TestComplexBroadcastLinearRecurrence(OpContract):
    spec = make_spec(complex_decay=True, broadcast=True)


def test_auto_is_chunked_and_bfloat16_accumulates_in_float32():
    a = jnp.full((1, 4096, 2), 1.0, jnp.bfloat16)
    b = jnp.full((1, 4096, 2), 1.0, jnp.bfloat16)
    h, h_last = linear_recurrence(a, b)
    # A bfloat16 accumulator would stall at 256; float32 counts exactly to 4096.
    assert h_last.dtype == jnp.float32 and float(h_last[0, 0]) == 4096.0
    assert h.dtype == jnp.bfloat16


def test_rejects_non_broadcastable_decay():
    with pytest.raises(ValueError, match="a: expected a shape broadcastable to b"):
        linear_recurrence(jnp.ones((2, 3, 4)), jnp.ones((2, 3, 5)))


def test_rejects_initial_state_of_wrong_shape():
    with pytest.raises(ValueError, match=r"h0: expected shape \(2, 5\)"):
        linear_recurrence(jnp.ones((2, 3, 5)), jnp.ones((2, 3, 5)), jnp.ones((2, 4)))


def test_rejects_unknown_impl():
    with pytest.raises(ValueError, match="impl: expected one of"):
        linear_recurrence(jnp.ones((2, 3, 5)), jnp.ones((2, 3, 5)), impl="triton")
