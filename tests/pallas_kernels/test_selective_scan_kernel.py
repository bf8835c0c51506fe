"""The selective-scan kernels (`pallas_kernels.selective_scan`) against seqjax's reference op.

Both backends run in Pallas interpret mode on CPU (the TPU interpreter for "tpu", the generic
one for "gpu") and are compared with `seqjax.ops.selective_scan(impl="reference")` (delta
passed as `dt` with `dt_softplus=False`, no skip, no gate) in values and gradients; `jax.export`
for `tpu` and `cuda` checks that they lower to kernel calls. A chunk of 16 tokens makes short
sequences cross several chunks. The default set holds one case per check and backend; the
full matrix of lengths, initial states, dtypes, groups, decay ranges and state sizes is
marked slow.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from contract import GRAD_TOLERANCE, TOLERANCE, assert_trees_close
from exporting import interpret_mode, kernel_calls

from pallas_kernels.selective_scan import selective_scan, unsupported
from seqjax.ops.selective_scan import selective_scan as reference_op

BACKENDS = ("tpu", "gpu")
CHUNK = 16  # tokens per chunk in the interpret-mode tests: T = 37 spans three, the last partial
F32, BF16 = jnp.float32, jnp.bfloat16


def make_inputs(length, *, groups=2, width=32, state_size=16, dtype=F32, batch=1, seed=0):
    """Mamba-like inputs: `delta = softplus(normal)`, `A = -exp(normal)`, the rest normal."""
    keys = jax.random.split(jax.random.key(seed), 6)
    return dict(
        x=jax.random.normal(keys[0], (batch, length, width)).astype(dtype),
        delta=jax.nn.softplus(jax.random.normal(keys[1], (batch, length, width))).astype(dtype),
        A=-jnp.exp(jax.random.normal(keys[2], (width, state_size))),
        B=jax.random.normal(keys[3], (batch, length, groups, state_size)).astype(dtype),
        C=jax.random.normal(keys[4], (batch, length, groups, state_size)).astype(dtype),
        h0=jax.random.normal(keys[5], (batch, width, state_size)),
    )


def run_kernel(backend, allow_neg_eigval):
    def run(x, delta, A, B, C, h0):
        return selective_scan(
            x,
            delta,
            A,
            B,
            C,
            h0,
            allow_neg_eigval=allow_neg_eigval,
            backend=backend,
            interpret=interpret_mode(backend),
            chunk_size=CHUNK,
        )

    return run


def run_reference(allow_neg_eigval):
    def run(x, delta, A, B, C, h0):
        return reference_op(
            x,
            delta,
            A,
            B,
            C,
            initial_state=h0,
            dt_softplus=False,
            allow_neg_eigval=allow_neg_eigval,
            impl="reference",
        )

    return run


def tolerance(table, inputs):
    return max(table[jnp.dtype(inputs[name].dtype)] for name in ("x", "delta", "B", "C"))


def check_values(backend, length, *, with_h0=True, allow_neg_eigval=False, **shape):
    inputs = make_inputs(length, **shape)
    if not with_h0:
        inputs["h0"] = jnp.zeros_like(inputs["h0"])  # what the op passes for no initial state
    y, final = run_kernel(backend, allow_neg_eigval)(**inputs)
    assert y.dtype == inputs["x"].dtype and final.dtype == F32
    expected = run_reference(allow_neg_eigval)(**inputs)
    assert_trees_close((y, final), expected, tolerance(TOLERANCE, inputs), "(y, final)")


def weighted_loss(scan, cotangents):
    """`<y, w_y> + <final, w_final>` with fixed random weights."""

    def loss(*args):
        y, final = scan(*args)
        w_y, w_final = cotangents
        return jnp.sum(y.astype(F32) * w_y) + jnp.sum(final * w_final)

    return loss


def check_gradients(backend, length, *, allow_neg_eigval=False, **shape):
    inputs = make_inputs(length, **shape)
    args = tuple(inputs.values())
    key_y, key_final = jax.random.split(jax.random.key(1))
    cotangents = (
        jax.random.normal(key_y, inputs["x"].shape),
        jax.random.normal(key_final, inputs["h0"].shape),
    )
    argnums = tuple(range(len(args)))
    kernel = weighted_loss(run_kernel(backend, allow_neg_eigval), cotangents)
    reference = weighted_loss(run_reference(allow_neg_eigval), cotangents)
    grads = jax.grad(kernel, argnums)(*args)
    expected = jax.grad(reference, argnums)(*args)
    assert_trees_close(
        dict(zip(inputs, grads, strict=True)),
        dict(zip(inputs, expected, strict=True)),
        tolerance(GRAD_TOLERANCE, inputs),
        "gradients",
    )


# ----------------------------------------------------------------------------- values


@pytest.mark.parametrize("backend", BACKENDS)
def test_values_match_reference(backend):
    # Two groups on GPU (two D tiles); one on TPU, where each group is padded to 128 lanes.
    check_values(backend, 37, groups=1 if backend == "tpu" else 2, allow_neg_eigval=True)


def test_bfloat16_values_match_reference():
    check_values("gpu", 37, groups=1, dtype=BF16)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("length", [1, 37, 40])  # 40 = 2.5 chunks
@pytest.mark.parametrize("with_h0", [True, False])
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_values_match_reference_at_every_length(backend, length, with_h0, dtype):
    check_values(backend, length, with_h0=with_h0, dtype=dtype)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("allow_neg_eigval", [False, True])
def test_values_match_reference_for_groups_and_decays(backend, groups, allow_neg_eigval):
    check_values(backend, 37, groups=groups, allow_neg_eigval=allow_neg_eigval, batch=2)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("state_size", [5, 64])
def test_values_match_reference_at_other_state_sizes(backend, state_size):
    """N = 5 (padded to 8 on GPU) and N = 64 (the second row of the block tables)."""
    check_values(backend, 37, state_size=state_size, width=48, groups=3)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_values_match_reference_at_table_chunk(backend):
    """The block table's own chunk and tiles, several chunks long on both backends."""
    inputs = make_inputs(300, groups=1, width=160)
    y, final = selective_scan(**inputs, backend=backend, interpret=interpret_mode(backend))
    expected = run_reference(False)(**inputs)
    assert_trees_close((y, final), expected, TOLERANCE[jnp.dtype(F32)], "(y, final)")


# ----------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_match_reference(backend):
    check_gradients(backend, 20, groups=1 if backend == "tpu" else 2, allow_neg_eigval=False)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("allow_neg_eigval", [False, True])
@pytest.mark.parametrize("length", [1, 37])
def test_gradients_match_reference_everywhere(backend, groups, allow_neg_eigval, length):
    check_gradients(backend, length, groups=groups, allow_neg_eigval=allow_neg_eigval, batch=2)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_bfloat16_gradients_match_reference(backend):
    check_gradients(backend, 37, dtype=BF16)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_match_reference_at_odd_state_size(backend):
    check_gradients(backend, 37, state_size=5, width=48, groups=3)


# ----------------------------------------------------------------------------- lowering


def check_export(backend, state_size, dtype):
    """Forward: one kernel call; forward + backward: two (a fallback would have none)."""
    inputs = make_inputs(300, groups=2, width=256, state_size=state_size, dtype=dtype, batch=2)
    args = tuple(inputs.values())

    def forward(*args):
        return selective_scan(*args, backend=backend)

    def loss(*args):
        y, final = forward(*args)
        return jnp.sum(y.astype(F32)) + jnp.sum(final)

    gradients = jax.grad(loss, argnums=tuple(range(len(args))))
    assert kernel_calls(forward, args, backend) >= 1
    assert kernel_calls(gradients, args, backend) >= 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_exports_to_kernel_calls(backend):
    check_export(backend, 16, F32)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("state_size", [16, 64, 256])
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_exports_to_kernel_calls_for_every_table_row(backend, state_size, dtype):
    check_export(backend, state_size, dtype)


# ----------------------------------------------------------------------------- unsupported


def shapes(**overrides):
    """Abstract inputs (`unsupported` and the check in the entry point need no values)."""
    arrays = dict(
        x=((1, 8, 32), F32),
        delta=((1, 8, 32), F32),
        A=((32, 16), F32),
        B=((1, 8, 1, 16), F32),
        C=((1, 8, 1, 16), F32),
        h0=((1, 32, 16), F32),
    )
    arrays.update(overrides)
    return {name: jax.ShapeDtypeStruct(*spec) for name, spec in arrays.items()}


UNSUPPORTED = {
    "complex": (dict(A=((32, 16), jnp.complex64)), "complex"),
    "float16": (dict(x=((1, 8, 32), jnp.float16)), "float16"),
    "state size": (
        dict(
            A=((32, 512), F32),
            B=((1, 8, 1, 512), F32),
            C=((1, 8, 1, 512), F32),
            h0=((1, 32, 512), F32),
        ),
        "N = 512",
    ),
    "groups": (dict(B=((1, 8, 3, 16), F32), C=((1, 8, 3, 16), F32)), "G = 3"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(UNSUPPORTED))
def test_unsupported_inputs_are_named_and_rejected(backend, case):
    overrides, reason = UNSUPPORTED[case]
    inputs = shapes(**overrides)
    assert reason in unsupported(**inputs, backend=backend)
    with pytest.raises(ValueError, match=reason):
        selective_scan(**inputs, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_supported_inputs_have_no_reason(backend):
    assert unsupported(**shapes(), backend=backend) is None
