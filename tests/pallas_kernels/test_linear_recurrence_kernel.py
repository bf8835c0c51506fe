"""The linear-recurrence kernels (`pallas_kernels.linear_recurrence`) against seqjax's scan.

Both backends run in Pallas interpret mode on CPU (the TPU interpreter for "tpu", the generic
one for "gpu") and are compared with `seqjax.scan.linear_recurrence(impl="sequential")` in
values and gradients; `jax.export` for `tpu` and `cuda` checks that they lower to kernel calls.
Small chunk sizes (16 tokens per TPU time block, 4 tokens per GPU loop step) make short
sequences cross several blocks, and loop steps plus a remainder. The default set holds one case
per check and backend; the full matrix of lengths, directions, dtypes and feature sizes is
marked slow.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import pytest
from contract import GRAD_TOLERANCE, TOLERANCE, assert_trees_close
from exporting import interpret_mode, kernel_calls

from pallas_kernels.linear_recurrence import linear_recurrence, unsupported
from seqjax.scan.linear_recurrence import linear_recurrence as reference_scan

BACKENDS = ("tpu", "gpu")
# Tokens per TPU time block / per GPU loop step: small, so that T = 37 crosses several; small
# GPU steps also keep the unrolled loop body (and its compile time in interpret mode) short.
CHUNK = {"tpu": 16, "gpu": 4}
F32, BF16 = jnp.float32, jnp.bfloat16


def make_inputs(length, dim, a_dtype=F32, b_dtype=F32, batch=2, seed=0):
    """`a` in (-1, 1) (negative decays included, as the op allows), `b` and `h0` normal."""
    key_a, key_b, key_h = jax.random.split(jax.random.key(seed), 3)
    a = jax.random.uniform(key_a, (batch, length, dim), minval=-1.0, maxval=1.0)
    b = jax.random.normal(key_b, (batch, length, dim))
    h0 = jax.random.normal(key_h, (batch, dim))
    return a.astype(a_dtype), b.astype(b_dtype), h0


def tolerance(table, *arrays):
    return max(table[jnp.dtype(x.dtype)] for x in arrays)


def run_kernel(backend, reverse, chunk_size="test"):
    """The kernel (interpreted off its hardware); `chunk_size` "test" takes `CHUNK`, None the
    block table."""
    chunk_size = CHUNK[backend] if chunk_size == "test" else chunk_size

    def run(a, b, h0):
        return linear_recurrence(
            a,
            b,
            h0,
            reverse=reverse,
            backend=backend,
            interpret=interpret_mode(backend),
            chunk_size=chunk_size,
        )

    return run


def run_reference(reverse, with_h0=True):
    """The sequential scan on the float32 values of the (possibly bfloat16) inputs."""

    def run(a, b, h0):
        return reference_scan(
            a.astype(F32),
            b.astype(F32),
            h0 if with_h0 else None,
            reverse=reverse,
            impl="sequential",
        )

    return run


def check_values(backend, length, dim, reverse, with_h0=True, dtypes=(F32, F32), chunk="test"):
    a, b, h0 = make_inputs(length, dim, *dtypes)
    if not with_h0:
        h0 = jnp.zeros_like(h0)  # what the op passes for `initial_state=None`
    h, h_last = run_kernel(backend, reverse, chunk)(a, b, h0)
    assert h.dtype == b.dtype and h_last.dtype == F32
    expected = run_reference(reverse, with_h0)(a, b, h0)
    assert_trees_close((h, h_last), expected, tolerance(TOLERANCE, a, b), "(h, h_last)")


def loss_of(run, cotangents):
    """A loss weighting the output and the final state with fixed random cotangents."""
    dh, dh_last = cotangents

    def loss(a, b, h0):
        h, h_last = run(a, b, h0)
        return jnp.sum(h.astype(F32) * dh) + jnp.sum(h_last * dh_last)

    return loss


def check_gradients(backend, length, dim, reverse, dtypes=(F32, F32)):
    a, b, h0 = make_inputs(length, dim, *dtypes)
    key_h, key_last = jax.random.split(jax.random.key(1))
    cotangents = (jax.random.normal(key_h, b.shape), jax.random.normal(key_last, h0.shape))
    grad = jax.grad(loss_of(run_kernel(backend, reverse), cotangents), argnums=(0, 1, 2))
    expected_grad = jax.grad(loss_of(run_reference(reverse), cotangents), argnums=(0, 1, 2))
    grads = grad(a, b, h0)
    assert [g.dtype for g in grads] == [a.dtype, b.dtype, h0.dtype]
    assert_trees_close(grads, expected_grad(a, b, h0), tolerance(GRAD_TOLERANCE, a, b), "d(a,b,h0)")


def check_exports(backend, dim, dtypes, reverse=False):
    """The forward exports to one kernel call and its gradient to two (forward, backward)."""
    a, b, h0 = (
        jnp.zeros((2, 300, dim), dtypes[0]),
        jnp.zeros((2, 300, dim), dtypes[1]),
        jnp.zeros((2, dim), F32),
    )

    def forward(a, b, h0):
        return linear_recurrence(a, b, h0, reverse=reverse, backend=backend)

    def loss(a, b, h0):
        h, h_last = forward(a, b, h0)
        return jnp.sum(h.astype(F32)) + jnp.sum(h_last)

    assert kernel_calls(forward, (a, b, h0), backend) >= 1
    assert kernel_calls(jax.grad(loss, argnums=(0, 1, 2)), (a, b, h0), backend) >= 2


# ----------------------------------------------------------------------------- default set


@pytest.mark.parametrize("backend", BACKENDS)
def test_values_match_reference(backend):
    check_values(backend, 37, 32, reverse=False, dtypes=(BF16, BF16))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_match_reference(backend):
    check_gradients(backend, 37, 32, reverse=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_exports_kernel_calls(backend):
    check_exports(backend, 64, (F32, F32))


@pytest.mark.parametrize(
    ("a", "b", "h0", "argument"),
    [
        (jnp.zeros((1, 4, 8), jnp.complex64), jnp.zeros((1, 4, 8)), jnp.zeros((1, 8)), "a"),
        (jnp.zeros((1, 4, 8)), jnp.zeros((1, 4, 8), jnp.float16), jnp.zeros((1, 8)), "b"),
        (jnp.zeros((1, 4, 4)), jnp.zeros((1, 4, 8)), jnp.zeros((1, 8)), "a"),
        (jnp.zeros((1, 4, 8)), jnp.zeros((1, 4, 8)), jnp.zeros((1, 8), BF16), "h0"),
        (jnp.zeros((1, 4, 8)), jnp.zeros((4, 8)), jnp.zeros((1, 8)), "b"),
    ],
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_unsupported_inputs_raise_with_reason(backend, a, b, h0, argument):
    reason = unsupported(a, b, h0, backend)
    assert reason is not None and reason.startswith(f"{argument}:")
    with pytest.raises(ValueError, match=re.escape(reason)):
        linear_recurrence(a, b, h0, backend=backend, interpret=True)


def test_gpu_arrays_past_int32_offsets_are_unsupported():
    a = b = jax.ShapeDtypeStruct((2, 2**20, 1024), F32)
    h0 = jax.ShapeDtypeStruct((2, 1024), F32)
    assert unsupported(a, b, h0, "gpu").startswith("b:")
    assert unsupported(a, b, h0, "tpu") is None


def test_unknown_backend_is_unsupported():
    a, b, h0 = jnp.zeros((1, 4, 8)), jnp.zeros((1, 4, 8)), jnp.zeros((1, 8))
    assert unsupported(a, b, h0, "cpu").startswith("backend:")


# ----------------------------------------------------------------------------- slow matrix


@pytest.mark.slow
@pytest.mark.parametrize("with_h0", [True, False])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("length", [1, 37, 40])
@pytest.mark.parametrize("backend", BACKENDS)
def test_values_at_ragged_lengths(backend, length, reverse, with_h0):
    check_values(backend, length, 32, reverse, with_h0)


@pytest.mark.slow
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("dtypes", [(BF16, BF16), (F32, BF16), (BF16, F32)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_values_in_bfloat16(backend, dtypes, reverse):
    check_values(backend, 40, 32, reverse, dtypes=dtypes)


@pytest.mark.slow
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("dim", [200, 640])
@pytest.mark.parametrize("backend", BACKENDS)
def test_values_over_padded_and_several_feature_tiles(backend, dim, reverse):
    check_values(backend, 37, dim, reverse)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_values_with_block_table_chunk(backend):
    check_values(backend, 300, 32, reverse=False, chunk=None)


@pytest.mark.slow
@pytest.mark.parametrize("dtypes", [(F32, F32), (BF16, BF16), (F32, BF16)])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("length", [1, 40])
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_across_lengths_and_dtypes(backend, length, reverse, dtypes):
    check_gradients(backend, length, 32, reverse, dtypes)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_over_several_feature_tiles(backend):
    check_gradients(backend, 37, 640, reverse=False)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("dim", "dtypes", "reverse"),
    [(640, (BF16, BF16), False), (200, (F32, BF16), True), (2048, (F32, F32), True)],
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_exports_kernel_calls_for_each_shape_class(backend, dim, dtypes, reverse):
    check_exports(backend, dim, dtypes, reverse)
