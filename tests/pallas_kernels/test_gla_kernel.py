"""The gla kernels (`pallas_kernels.gla`) against `seqjax.ops.gla`'s reference, in Pallas
interpret mode on CPU, and their lowering for TPU and GPU through `jax.export`.

The default suite runs one representative case per check and backend (`DEFAULT_MODE`, at a
length a bit over one chunk); the full
matrix of decay modes, lengths, dtypes and head sizes is marked slow. Decay inputs always
hold a few tokens of log-decay -20, the strong decays the kernels must handle exactly.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import pytest
from contract import GRAD_TOLERANCE, TOLERANCE, assert_trees_close, cotangents_like, upcast
from exporting import interpret_mode, kernel_calls

from pallas_kernels import gla as gla_kernel
from seqjax.ops import gla as gla_ops

BACKENDS = ("tpu", "gpu")
MODES = ("linear_attention", "simple_gla", "gla")
# One decay mode per backend in the default suite (the rest are slow): the per-head decay on
# TPU (its interpreter is the slower one), the per-channel secondary chunking on GPU.
DEFAULT_MODE = {"tpu": "simple_gla", "gpu": "gla"}
CHUNK = 32  # a smaller chunk than the table's, so short sequences span several chunks
STRONG_LOG_DECAY = -20.0


def make_inputs(mode, length, dtype, with_state, *, batch=2, heads=2, key_dim=16, value_dim=24):
    """`(q, k, v, g, h0)`; `g` is None for linear attention and has log-decay -20 at the
    tokens a third and two thirds into the sequence."""
    keys = jax.random.split(jax.random.PRNGKey(length), 5)
    q, k = (jax.random.normal(key, (batch, length, heads, key_dim)) for key in keys[:2])
    v = jax.random.normal(keys[2], (batch, length, heads, value_dim))
    g = None
    if mode != "linear_attention":
        shape = (batch, length, heads) + ((key_dim,) if mode == "gla" else ())
        g = jax.nn.log_sigmoid(2.0 * jax.random.normal(keys[3], shape) + 2.0)
        g = g.at[:, length // 3].set(STRONG_LOG_DECAY).at[:, 2 * length // 3].set(STRONG_LOG_DECAY)
    h0 = jax.random.normal(keys[4], (batch, heads, key_dim, value_dim)) if with_state else None
    q, k, v = (x.astype(dtype) for x in (q, k, v))
    return q, k, v, g, h0


@functools.partial(jax.jit, static_argnums=5)
def reference(q, k, v, g, h0, scale):
    """The seqjax op of the decay mode that `g`'s shape names, `impl="reference"`."""
    options = {"scale": scale, "initial_state": h0, "impl": "reference"}
    if g is None:
        return gla_ops.linear_attention(q, k, v, **options)
    if g.ndim == 3:
        return gla_ops.simple_gla(q, k, v, g, **options)
    return gla_ops.gla(q, k, v, g, **options)


def kernel(backend, chunk=CHUNK, interpret=None):
    """The jitted kernel; `interpret` None: compiled on the backend's hardware, else
    interpreted."""
    interpret = interpret_mode(backend) if interpret is None else interpret

    def run(q, k, v, g, h0, scale):
        return gla_kernel.gla(
            q, k, v, g, h0, scale=scale, backend=backend, interpret=interpret, chunk_size=chunk
        )

    return jax.jit(run, static_argnums=5)


def cases(default, matrix):
    """pytest params of (backend, *case): `default[backend]` unmarked, the rest slow."""
    params = []
    for backend in BACKENDS:
        for case in matrix:
            marks = () if case == default[backend] else (pytest.mark.slow,)
            name = "-".join(str(getattr(x, "__name__", x)) for x in (backend, *case))
            params.append(pytest.param(backend, *case, marks=marks, id=name))
    return params


# ----------------------------------------------------------------------------- values

VALUE_MATRIX = [
    (mode, length, dtype, with_state)
    for mode in MODES
    for length in (1, 37, 5 * CHUNK // 2)
    for dtype, with_state in ((jnp.float32, True), (jnp.float32, False), (jnp.bfloat16, True))
]
VALUE_DEFAULT = {
    "tpu": (DEFAULT_MODE["tpu"], 37, jnp.float32, True),
    "gpu": (DEFAULT_MODE["gpu"], 37, jnp.bfloat16, True),
}


@pytest.mark.parametrize(
    "backend, mode, length, dtype, with_state", cases(VALUE_DEFAULT, VALUE_MATRIX)
)
def test_output_and_final_state_match_reference(backend, mode, length, dtype, with_state):
    q, k, v, g, h0 = make_inputs(mode, length, dtype, with_state)
    scale = q.shape[-1] ** -0.5
    actual = kernel(backend)(q, k, v, g, h0, scale)
    expected = reference(*upcast((q, k, v)), g, h0, scale)
    assert actual[0].dtype == v.dtype and actual[1].dtype == jnp.float32
    assert_trees_close(upcast(actual), expected, TOLERANCE[jnp.dtype(dtype)], "(o, state)")


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["simple_gla", "gla"])
def test_decays_of_minus_20_at_every_token_stay_exact(backend, mode):
    q, k, v, g, h0 = make_inputs(mode, 70, jnp.float32, True)
    g = jnp.full_like(g, STRONG_LOG_DECAY).at[:, ::3].set(-0.1)
    scale = q.shape[-1] ** -0.5
    actual = kernel(backend)(q, k, v, g, h0, scale)
    expected = reference(q, k, v, g, h0, scale)
    assert_trees_close(actual, expected, TOLERANCE[jnp.dtype(jnp.float32)], "(o, state)")


# ----------------------------------------------------------------------------- gradients

GRAD_MATRIX = [
    (mode, length, dtype, with_state)
    for mode in MODES
    for length, dtype, with_state in (
        (5 * CHUNK // 2, jnp.float32, True),
        (37, jnp.float32, False),
        (37, jnp.bfloat16, True),
    )
]
GRAD_DEFAULT = {backend: (DEFAULT_MODE[backend], 37, jnp.float32, False) for backend in BACKENDS}


def gradients(fn, inputs, scale, weights):
    """Gradients w.r.t. every given input of `fn`'s output and final state weighed by
    `weights` (a None decay or initial state has none)."""
    present = [i for i, x in enumerate(inputs) if x is not None]

    def loss(*args):
        full = list(inputs)
        for index, x in zip(present, args, strict=True):
            full[index] = x
        o, state = fn(*full, scale)
        return jnp.sum(o.astype(jnp.float32) * weights[0]) + jnp.sum(state * weights[1])

    return jax.grad(loss, argnums=tuple(range(len(present))))(*(inputs[i] for i in present))


@pytest.mark.parametrize(
    "backend, mode, length, dtype, with_state", cases(GRAD_DEFAULT, GRAD_MATRIX)
)
def test_gradients_match_reference(backend, mode, length, dtype, with_state):
    inputs = make_inputs(mode, length, dtype, with_state)
    scale = inputs[0].shape[-1] ** -0.5
    o, state = reference(*upcast(inputs[:3]), *inputs[3:], scale)
    weights = cotangents_like((o, state), jax.random.PRNGKey(1))
    actual = gradients(kernel(backend), inputs, scale, weights)
    expected = gradients(reference, upcast(inputs), scale, weights)
    assert_trees_close(upcast(actual), expected, GRAD_TOLERANCE[jnp.dtype(dtype)], "grads")


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_several_value_tiles_match_reference(backend):
    """V = 130 spans two TPU and five GPU value tiles: dq and dk are summed over them."""
    inputs = make_inputs("gla", 40, jnp.float32, True, batch=1, value_dim=130)
    scale = inputs[0].shape[-1] ** -0.5
    actual = kernel(backend)(*inputs, scale)
    expected = reference(*inputs, scale)
    assert_trees_close(actual, expected, TOLERANCE[jnp.dtype(jnp.float32)], "(o, state)")
    weights = cotangents_like(expected, jax.random.PRNGKey(1))
    actual = gradients(kernel(backend), inputs, scale, weights)
    expected = gradients(reference, inputs, scale, weights)
    assert_trees_close(actual, expected, GRAD_TOLERANCE[jnp.dtype(jnp.float32)], "grads")


# ----------------------------------------------------------------------------- lowering

EXPORT_MATRIX = [
    (mode, dim, dtype)
    for mode in MODES
    for dim in (64, 128, 256)
    for dtype in (jnp.float32, jnp.bfloat16)
]
EXPORT_DEFAULT = {backend: (DEFAULT_MODE[backend], 64, jnp.float32) for backend in BACKENDS}


@pytest.mark.parametrize("backend, mode, dim, dtype", cases(EXPORT_DEFAULT, EXPORT_MATRIX))
def test_forward_and_gradient_lower_to_kernels(backend, mode, dim, dtype):
    inputs = make_inputs(mode, 100, dtype, True, key_dim=dim, value_dim=dim)
    run = kernel(backend, chunk=None, interpret=False)

    def forward(*inputs):
        return run(*inputs, 0.125)

    weights = (jnp.ones((1, 100, 2, dim)), jnp.ones((1, 2, dim, dim)))
    present = tuple(i for i, x in enumerate(inputs) if x is not None)

    def loss(*inputs):
        o, state = forward(*inputs)
        return jnp.sum(o.astype(jnp.float32) * weights[0]) + jnp.sum(state * weights[1])

    assert kernel_calls(forward, inputs, backend) >= 1
    assert kernel_calls(jax.grad(loss, argnums=present), inputs, backend) >= 2


# ----------------------------------------------------------------------------- unsupported


@pytest.mark.parametrize("backend", BACKENDS)
def test_head_dim_beyond_the_table_is_unsupported_and_raises(backend):
    q = k = v = g = jnp.zeros((1, 4, 2, 300))
    h0 = None
    reason = gla_kernel.unsupported(q, k, v, g, h0, backend)
    assert reason is not None and "300" in reason
    with pytest.raises(ValueError, match="head dim 300"):
        gla_kernel.gla(q, k, v, g, h0, scale=1.0, backend=backend, interpret=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_integer_inputs_are_unsupported(backend):
    q = k = v = jnp.zeros((1, 4, 2, 16))
    assert "int32" in gla_kernel.unsupported(q.astype(jnp.int32), k, v, None, None, backend)
    assert gla_kernel.unsupported(q, k, v, None, None, backend) is None
