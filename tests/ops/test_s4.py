import jax
import jax.numpy as jnp
import numpy as np
import pytest
from contract import (
    GRAD_TOLERANCE,
    TOLERANCE,
    OpContract,
    OpSpec,
    assert_trees_close,
    cotangents_like,
    weighted_sum,
)

from seqjax.ops.s4 import (
    discretize_bilinear,
    discretize_zoh,
    hippo_matrix,
    nplr,
    s4_dplr_kernel,
    s4d,
    s4d_kernel,
    s4d_step,
    s5,
    s5_step,
    ssm_convolution,
)

H, N = 3, 4  # S4D: channels, complex modes per channel
HIN, HOUT, P = 3, 3, 5  # S5: input and output features, complex modes


def complex_normal(key, shape):
    kr, ki = jax.random.split(key)
    return (jax.random.normal(kr, shape) + 1j * jax.random.normal(ki, shape)) / jnp.sqrt(2.0)


def parameter_dtypes(dtype):
    """Parameters stay float32 / complex64 (float64 / complex128 in the float64 check)."""
    real = jnp.promote_types(dtype, jnp.float32)
    return real, jnp.promote_types(real, jnp.complex64)


def stable_modes(key, shape):
    kr, ki = jax.random.split(key)
    real = -jax.random.uniform(kr, shape, minval=0.1, maxval=0.8)
    return real + 1j * jax.random.uniform(ki, shape, minval=0.0, maxval=3.0)


def log_uniform_steps(key, shape):
    return jnp.exp(jax.random.uniform(key, shape, minval=jnp.log(0.05), maxval=jnp.log(0.5)))


# ----------------------------------------------------------------------------- S4D


def make_s4d_inputs(key, batch, length, dtype):
    keys = jax.random.split(key, 6)
    real, cplx = parameter_dtypes(dtype)
    return {
        "u": jax.random.normal(keys[0], (batch, length, H)).astype(dtype),
        "Lambda": stable_modes(keys[1], (H, N)).astype(cplx),
        "B": complex_normal(keys[2], (H, N)).astype(cplx),
        "C": complex_normal(keys[3], (H, N)).astype(cplx),
        "dt": log_uniform_steps(keys[4], (H,)).astype(real),
        "D": jax.random.normal(keys[5], (H,)).astype(real),
    }


def s4d_args(i):
    return i["u"], i["Lambda"], i["B"], i["C"], i["dt"], i["D"]


S4D_SPEC = OpSpec(
    make_inputs=make_s4d_inputs,
    apply=lambda i, s, ids, impl: s4d(*s4d_args(i), s, segment_ids=ids, impl=impl, chunk_size=16),
    make_state=lambda key, batch: complex_normal(key, (batch, H, N)).astype(jnp.complex64),
    step=lambda i, s: s4d_step(*s4d_args(i), s),
    time_inputs=frozenset({"u"}),
    # With the harness's random initial state, "fft" runs the recurrent view; the convolution
    # view itself is checked from a zero state by the tests below (and by the harness's
    # separately run segments, which start from None).
    impls=("fft", "recurrent"),
    chunk_size=16,
)


class TestS4D(OpContract):
    spec = S4D_SPEC


def s4d_fft_and_reference(length, discretization="zoh"):
    inputs = make_s4d_inputs(jax.random.key(3), 2, length, jnp.float32)

    def apply(impl):
        return jax.jit(lambda i: s4d(*s4d_args(i), discretization=discretization, impl=impl))

    return inputs, apply("fft"), apply("reference")


def test_s4d_convolution_view_matches_reference_from_zero_state():
    inputs, fft, reference = s4d_fft_and_reference(37)
    assert_trees_close(fft(inputs), reference(inputs), TOLERANCE[jnp.dtype("float32")], "fft")


def test_s4d_convolution_view_gradients_match_reference():
    inputs, fft, reference = s4d_fft_and_reference(37)
    weights = cotangents_like(reference(inputs), jax.random.key(4))

    def grad(fn):
        return jax.jit(jax.grad(lambda i: weighted_sum(fn(i), weights)))(inputs)

    assert_trees_close(
        grad(fft), grad(reference), GRAD_TOLERANCE[jnp.dtype("float32")], "fft d/d(inputs)"
    )


@pytest.mark.slow
@pytest.mark.parametrize("length", [1, 2, 64, 301])
@pytest.mark.parametrize("discretization", ["zoh", "bilinear"])
def test_s4d_convolution_view_matches_reference_at_other_lengths(length, discretization):
    inputs, fft, reference = s4d_fft_and_reference(length, discretization)
    tolerance = 2 * TOLERANCE[jnp.dtype("float32")]
    assert_trees_close(fft(inputs), reference(inputs), tolerance, f"fft T={length}")


@pytest.mark.slow
def test_s4d_bilinear_recurrent_view_matches_reference():
    inputs = make_s4d_inputs(jax.random.key(5), 2, 23, jnp.float32)
    state = complex_normal(jax.random.key(6), (2, H, N))
    outputs = {
        impl: s4d(*s4d_args(inputs), state, discretization="bilinear", impl=impl)
        for impl in ("recurrent", "reference")
    }
    assert_trees_close(
        outputs["recurrent"], outputs["reference"], TOLERANCE[jnp.dtype("float32")], "bilinear"
    )


def test_s4d_auto_and_fft_route_to_recurrent_with_segments():
    inputs = make_s4d_inputs(jax.random.key(7), 1, 12, jnp.float32)
    ids = jnp.asarray([[0] * 5 + [1] * 7])
    expected = s4d(*s4d_args(inputs), segment_ids=ids, impl="reference")
    for impl in ("auto", "fft"):
        actual = s4d(*s4d_args(inputs), segment_ids=ids, impl=impl)
        assert_trees_close(actual, expected, TOLERANCE[jnp.dtype("float32")], impl)


# ----------------------------------------------------------------------------- S5


def make_s5_inputs(key, batch, length, dtype):
    keys = jax.random.split(key, 6)
    real, cplx = parameter_dtypes(dtype)
    return {
        "u": jax.random.normal(keys[0], (batch, length, HIN)).astype(dtype),
        "Lambda": stable_modes(keys[1], (P,)).astype(cplx),
        "B": (complex_normal(keys[2], (P, HIN)) / jnp.sqrt(HIN)).astype(cplx),
        "C": (complex_normal(keys[3], (HOUT, P)) / jnp.sqrt(P)).astype(cplx),
        "dt": log_uniform_steps(keys[4], (P,)).astype(real),
        "D": jax.random.normal(keys[5], (HOUT,)).astype(real),
    }


def s5_args(i):
    return i["u"], i["Lambda"], i["B"], i["C"], i["dt"], i["D"]


S5_SPEC = OpSpec(
    make_inputs=make_s5_inputs,
    apply=lambda i, s, ids, impl: s5(*s5_args(i), s, segment_ids=ids, impl=impl, chunk_size=16),
    make_state=lambda key, batch: complex_normal(key, (batch, P)).astype(jnp.complex64),
    step=lambda i, s: s5_step(*s5_args(i), s),
    time_inputs=frozenset({"u"}),
    impls=("associative", "chunked"),
    chunk_size=16,
)


class TestS5(OpContract):
    spec = S5_SPEC


def test_s5_without_skip_maps_to_a_different_output_width():
    inputs = make_s5_inputs(jax.random.key(0), 2, 7, jnp.float32)
    y, state = s5(inputs["u"], inputs["Lambda"], inputs["B"], inputs["C"][:2], inputs["dt"])
    assert y.shape == (2, 7, 2) and y.dtype == jnp.float32
    assert state.shape == (2, P) and state.dtype == jnp.complex64


# ----------------------------------------------------------------------------- HiPPO


def test_legs_matches_its_formula():
    A, B = hippo_matrix("legs", 6)
    for n in range(6):
        assert B[n] == pytest.approx(np.sqrt(2 * n + 1))
        for k in range(6):
            expected = (
                -np.sqrt(2 * n + 1) * np.sqrt(2 * k + 1) if n > k else -(n + 1) if n == k else 0
            )
            assert A[n, k] == pytest.approx(expected)


@pytest.mark.parametrize("measure", ["legs", "legt", "fout"])
def test_nplr_reconstructs_the_hippo_matrix(measure):
    A, B = hippo_matrix(measure, 16)
    Lambda, P_, B_, V = nplr(measure, 16)
    full_basis = np.concatenate([V, V.conj()], axis=1)
    modes = np.concatenate([Lambda, Lambda.conj()])
    low_rank = np.concatenate([P_, P_.conj()], axis=-1)
    reconstructed = full_basis @ (np.diag(modes) - low_rank.T @ low_rank.conj())
    reconstructed = reconstructed @ full_basis.conj().T
    np.testing.assert_allclose(full_basis.conj().T @ full_basis, np.eye(16), atol=1e-10)
    np.testing.assert_allclose(reconstructed, A, atol=1e-8)
    np.testing.assert_allclose(full_basis @ np.concatenate([B_, B_.conj()]), B, atol=1e-8)


def test_legs_normal_part_has_negative_real_eigenvalues():
    np.testing.assert_allclose(nplr("legs", 32).Lambda.real, -0.5, atol=1e-10)


def test_nplr_rejects_odd_state_size():
    with pytest.raises(ValueError, match="N: expected an even state size"):
        nplr("legs", 5)


# ----------------------------------------------------------------------------- discretization


def test_bilinear_of_a_diagonal_equals_the_dense_formula():
    Lambda = stable_modes(jax.random.key(0), (4,))
    B = complex_normal(jax.random.key(1), (4,))
    dt = jnp.float32(0.3)
    Abar, Bbar = discretize_bilinear(Lambda, B, dt)
    dense_Abar, dense_Bbar = discretize_bilinear(jnp.diag(Lambda), B, dt)
    np.testing.assert_allclose(dense_Abar, jnp.diag(Abar), atol=1e-6)
    np.testing.assert_allclose(dense_Bbar, Bbar, atol=1e-6)


def test_zoh_equals_the_exponential_of_the_augmented_matrix():
    with jax.enable_x64(True):
        Lambda = stable_modes(jax.random.key(0), (4,)).astype(jnp.complex128)
        B = complex_normal(jax.random.key(1), (4,)).astype(jnp.complex128)
        dt = 0.3
        augmented = jnp.zeros((5, 5), jnp.complex128)
        augmented = augmented.at[:4, :4].set(jnp.diag(Lambda)).at[:4, 4].set(B)
        exponential = jax.scipy.linalg.expm(dt * augmented)
        Abar, Bbar = discretize_zoh(Lambda, B, dt)
        np.testing.assert_allclose(jnp.diag(Abar), exponential[:4, :4], atol=1e-12)
        np.testing.assert_allclose(Bbar, exponential[:4, 4], atol=1e-12)


# ----------------------------------------------------------------------------- kernels


def test_s4d_kernel_equals_powers_of_the_discrete_system():
    inputs = make_s4d_inputs(jax.random.key(0), 1, 1, jnp.float32)
    Lambda, B, C, dt = (np.asarray(inputs[k], np.complex128) for k in ("Lambda", "B", "C", "dt"))
    kernel = s4d_kernel(inputs["Lambda"], inputs["B"], inputs["C"], inputs["dt"], 20)
    Abar = np.exp(dt[:, None] * Lambda)
    Bbar = (Abar - 1) / Lambda * B
    expected = np.stack([2 * np.sum(C * Bbar * Abar**l, -1).real for l in range(20)], -1)
    np.testing.assert_allclose(kernel, expected, rtol=1e-5, atol=1e-6)


def test_ssm_convolution_equals_direct_causal_convolution():
    u = jax.random.normal(jax.random.key(0), (2, 11, 3))
    kernel = jax.random.normal(jax.random.key(1), (3, 15))
    D = jnp.asarray([0.5, -1.0, 2.0])
    y = ssm_convolution(u, kernel, D)
    for b in range(2):
        for h in range(3):
            expected = np.convolve(u[b, :, h], kernel[h])[:11] + D[h] * u[b, :, h]
            np.testing.assert_allclose(y[b, :, h], expected, rtol=1e-5, atol=1e-5)


dplr_kernel = jax.jit(s4_dplr_kernel, static_argnums=5)


def dense_kernel(A, B, C, dt, length):
    """`C Abar^l Bbar` for l < length, bilinear, by powering the dense matrix (numpy)."""
    identity = np.eye(A.shape[0])
    inverse_side = np.linalg.inv(identity - dt / 2 * A)
    Abar, Bbar = inverse_side @ (identity + dt / 2 * A), inverse_side @ (dt * B)
    taps, state = [], Bbar
    for _ in range(length):
        taps.append(C @ state)
        state = Abar @ state
    return np.asarray(taps)


def test_dplr_kernel_of_legs_equals_the_dense_hippo_ssm():
    size, length = 8, 24  # an even length puts a root of unity at z = -1
    A, B = hippo_matrix("legs", size)
    Lambda, P_, B_, V = nplr("legs", size)
    C_ = np.asarray(complex_normal(jax.random.key(0), (2, size // 2)), np.complex128)
    dt = np.asarray([0.1, 0.02])
    real_C = 2 * (C_ @ V.conj().T).real  # [C, conj(C)] in the original basis
    expected = np.stack([dense_kernel(A, B, real_C[h], dt[h], length) for h in range(2)])
    with jax.enable_x64(True):
        kernel = dplr_kernel(
            np.stack([Lambda] * 2), np.stack([P_] * 2), np.stack([B_] * 2), C_, dt, length
        )
    np.testing.assert_allclose(kernel, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.slow
@pytest.mark.parametrize("length", [1, 17])
def test_dplr_kernel_with_rank_two_equals_the_dense_conjugate_system(length):
    keys = jax.random.split(jax.random.key(1), 4)
    Lambda = np.asarray(stable_modes(keys[0], (2, N)), np.complex128)
    P_ = 0.5 * np.asarray(complex_normal(keys[1], (2, 2, N)), np.complex128)
    B_ = np.asarray(complex_normal(keys[2], (2, N)), np.complex128)
    C_ = np.asarray(complex_normal(keys[3], (2, N)), np.complex128)
    dt = np.asarray([0.3, 0.05])
    expected = []
    for h in range(2):
        Q = np.concatenate([P_[h], P_[h].conj()], -1)
        A = np.diag(np.concatenate([Lambda[h], Lambda[h].conj()])) - Q.T @ Q.conj()
        full_B, full_C = (np.concatenate([x[h], x[h].conj()]) for x in (B_, C_))
        expected.append(dense_kernel(A, full_B, full_C, dt[h], length))
    expected = np.stack(expected)
    np.testing.assert_allclose(expected.imag, 0, atol=1e-10)
    with jax.enable_x64(True):
        kernel = dplr_kernel(Lambda, P_, B_, C_, dt, length)
    np.testing.assert_allclose(kernel, expected.real, rtol=1e-9, atol=1e-9)


def test_dplr_kernel_without_low_rank_equals_the_s4d_kernel():
    inputs = make_s4d_inputs(jax.random.key(2), 1, 1, jnp.float32)
    Lambda, B, C, dt = (inputs[k] for k in ("Lambda", "B", "C", "dt"))
    diagonal = s4d_kernel(Lambda, B, C, dt, 33, discretization="bilinear")
    dplr = dplr_kernel(Lambda, jnp.zeros((H, 1, N), jnp.complex64), B, C, dt, 33)
    np.testing.assert_allclose(dplr, diagonal, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- bad inputs


def test_s4d_rejects_mismatched_B_shape():
    i = make_s4d_inputs(jax.random.key(0), 2, 5, jnp.float32)
    with pytest.raises(ValueError, match=r"B: expected shape \[H, N\] = \[3, 4\]"):
        s4d(i["u"], i["Lambda"], i["B"][:, :3], i["C"], i["dt"])


def test_s5_rejects_mismatched_C_shape():
    i = make_s5_inputs(jax.random.key(0), 2, 5, jnp.float32)
    with pytest.raises(ValueError, match=r"C: expected shape \[Hout, N\] = \[\?, 5\]"):
        s5(i["u"], i["Lambda"], i["B"], i["C"][:, :4], i["dt"])


def test_s5_rejects_skip_when_output_width_differs():
    i = make_s5_inputs(jax.random.key(0), 2, 5, jnp.float32)
    with pytest.raises(ValueError, match="D: the skip D \\* u needs Hout == Hin"):
        s5(i["u"], i["Lambda"], i["B"], i["C"][:2], i["dt"], i["D"][:2])


def test_rejects_unstable_Lambda_when_concrete():
    i = make_s4d_inputs(jax.random.key(0), 1, 5, jnp.float32)
    unstable = i["Lambda"].at[0, 0].set(0.1 + 1j)
    with pytest.raises(ValueError, match=r"Lambda: expected Re\(Lambda\) < 0"):
        s4d(i["u"], unstable, i["B"], i["C"], i["dt"])


def test_rejects_non_positive_step_when_concrete():
    i = make_s5_inputs(jax.random.key(0), 1, 5, jnp.float32)
    with pytest.raises(ValueError, match="dt: expected dt > 0"):
        s5(i["u"], i["Lambda"], i["B"], i["C"], -i["dt"])


def test_ssm_convolution_rejects_short_kernel():
    with pytest.raises(ValueError, match="kernel: expected length L >= T = 6"):
        ssm_convolution(jnp.zeros((1, 6, 2)), jnp.zeros((2, 5)))
