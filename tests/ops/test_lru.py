import jax
import jax.numpy as jnp
import pytest
from contract import OpContract, OpSpec

from seqjax.ops.lru import lru, lru_step

H, N = 5, 4


def complex_normal(key, shape):
    kr, ki = jax.random.split(key)
    return (jax.random.normal(kr, shape) + 1j * jax.random.normal(ki, shape)) / jnp.sqrt(2.0)


def make_inputs(key, batch, length, dtype):
    keys = jax.random.split(key, 7)
    real = jnp.promote_types(dtype, jnp.float32)
    cplx = jnp.promote_types(real, jnp.complex64)
    radius = jax.random.uniform(keys[1], (N,), minval=0.6, maxval=0.99)
    return {
        "x": jax.random.normal(keys[0], (batch, length, H)).astype(dtype),
        "nu_log": jnp.log(-jnp.log(radius)).astype(real),
        "theta_log": jnp.log(jax.random.uniform(keys[2], (N,), minval=0.1, maxval=3.0)).astype(
            real
        ),
        "B": complex_normal(keys[3], (N, H)).astype(cplx),
        "C": complex_normal(keys[4], (H, N)).astype(cplx),
        "D": jax.random.normal(keys[5], (H,)).astype(real),
        "gamma_log": (0.5 * jnp.log(1 - radius**2)).astype(real),
    }


def args(i):
    return (i["x"], i["nu_log"], i["theta_log"], i["B"], i["C"], i["D"], i["gamma_log"])


class TestLRU(OpContract):
    spec = OpSpec(
        make_inputs=make_inputs,
        apply=lambda i, s, ids, impl: lru(*args(i), s, segment_ids=ids, impl=impl, chunk_size=16),
        make_state=lambda key, batch: complex_normal(key, (batch, N)).astype(jnp.complex64),
        step=lambda i, s: lru_step(*args(i), s),
        time_inputs=frozenset({"x"}),
        impls=("sequential", "chunked"),
        chunk_size=16,
    )


def test_default_gamma_is_the_unit_variance_normalization():
    i = make_inputs(jax.random.key(0), 1, 6, jnp.float32)
    with_default, _ = lru(*args(i)[:-1])
    explicit, _ = lru(*args(i))  # gamma_log was built as log sqrt(1 - |lambda|^2)
    assert jnp.allclose(with_default, explicit, rtol=1e-5, atol=1e-6)


def test_rejects_real_shape_mismatch_in_C():
    i = make_inputs(jax.random.key(0), 1, 6, jnp.float32)
    with pytest.raises(ValueError, match=r"C: expected shape \[H, N\] = \[5, 4\]"):
        lru(i["x"], i["nu_log"], i["theta_log"], i["B"], i["C"][:, :3])
