"""The LTI state-space mixers (S4, S4D, S5, LRU), Griffin's RG-LRU block and the diagonal LRNN:
the mixer contract (`mixer_checks`), their papers' initializations, and bad configs."""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
import pytest
from mixer_checks import WIDTH, check_mixer, mixer_setup

from seqjax.nn.diagonal_lrnn import DiagonalLRNN, DiagonalLRNNConfig
from seqjax.nn.rg_lru import RGLRU, RGLRUConfig
from seqjax.nn.ssm import LRU, S4, S4D, S5, LRUConfig, S4Config, S4DConfig, S5Config

# One representative config per mixer runs by default; the variants are `slow`.
MIXERS = {
    "s4d": S4D(S4DConfig(WIDTH, state_size=8, chunk_size=8)),
    "s4": S4(S4Config(WIDTH, state_size=8)),
    "s5": S5(S5Config(WIDTH, state_size=16, blocks=2, chunk_size=8)),
    "lru": LRU(LRUConfig(WIDTH, state_size=8, chunk_size=8)),
    "rg_lru": RGLRU(RGLRUConfig(WIDTH, num_heads=2, chunk_size=8)),
    "diagonal_lrnn": DiagonalLRNN(DiagonalLRNNConfig(WIDTH, allow_neg_eigval=True, chunk_size=8)),
}
VARIANTS = {
    "s4d_inv_bilinear": S4D(
        S4DConfig(
            WIDTH,
            state_size=8,
            init="inv",
            discretization="bilinear",
            impl="recurrent",
            chunk_size=4,
        )
    ),
    "s4d_reference": S4D(S4DConfig(WIDTH, state_size=4, dt_min=0.01, dt_max=0.5, impl="reference")),
    "s4d_fft": S4D(S4DConfig(WIDTH, state_size=4, impl="fft")),
    "s4_state_16": S4(S4Config(WIDTH, state_size=16, dt_min=0.01, dt_max=0.2)),
    "s5_full_modes": S5(
        S5Config(
            WIDTH,
            state_size=8,
            conj_sym=False,
            c_init="complex_normal",
            discretization="bilinear",
            clip_eigs=True,
            activation="half_glu1",
            output_norm=False,
            impl="associative",
        )
    ),
    "s5_half_glu2": S5(
        S5Config(
            WIDTH,
            state_size=8,
            c_init="trunc_standard_normal",
            activation="half_glu2",
            impl="reference",
        )
    ),
    "s5_gelu": S5(S5Config(WIDTH, state_size=8, activation="gelu", impl="chunked", chunk_size=4)),
    "lru_ring": LRU(
        LRUConfig(
            WIDTH, state_size=8, r_min=0.4, r_max=0.9, max_phase=3.14, impl="chunked", chunk_size=4
        )
    ),
    "lru_reference": LRU(LRUConfig(WIDTH, state_size=8, impl="reference")),
    "rg_lru_wide": RGLRU(
        RGLRUConfig(
            WIDTH,
            lru_width=48,
            conv_size=3,
            min_rad=0.5,
            max_rad=0.9,
            final_w_init_variance_scale=0.5,
            impl="reference",
        )
    ),
    "rg_lru_chunked": RGLRU(RGLRUConfig(WIDTH, num_heads=4, impl="chunked", chunk_size=4)),
    "diagonal_lrnn_positive": DiagonalLRNN(
        DiagonalLRNNConfig(
            WIDTH, sharpness=2.0, output_norm=False, norm_eps=1e-6, impl="associative"
        )
    ),
}


@pytest.mark.parametrize("name", list(MIXERS))
def test_mixer_contract(name):
    check_mixer(MIXERS[name], name)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(VARIANTS))
def test_mixer_variant_contract(name):
    check_mixer(VARIANTS[name], name)


def parameters(mixer):
    x = jax.random.normal(jax.random.key(0), (2, 5, WIDTH))
    params = jax.jit(mixer.init)(jax.random.key(1), x)
    return jax.tree.map(np.asarray, nn.meta.unbox(params)["params"])


def as_complex(pair):
    return pair[..., 0] + 1j * pair[..., 1]


def test_s4_starts_from_hippo_legs():
    """`diag([Lambda, conj Lambda]) - Q Q^*` is similar to HiPPO-LegS: eigenvalues -1..-N."""
    p = parameters(MIXERS["s4"])
    Lambda = -np.exp(p["log_A_real"][0]) + 1j * p["A_imag"][0]
    Q = as_complex(p["P"])[0]
    A = np.diag(np.concatenate([Lambda, Lambda.conj()])) - (
        np.concatenate([Q, Q.conj()], -1).T @ np.concatenate([Q, Q.conj()], -1).conj()
    )
    eigenvalues = np.sort(np.linalg.eigvals(A.astype(np.complex128)).real)
    np.testing.assert_allclose(eigenvalues, -np.arange(8, 0, -1), rtol=1e-3)
    np.testing.assert_allclose(p["log_A_real"], np.log(0.5))
    assert np.all(np.abs(as_complex(p["B"]).imag) <= 2.0)


def test_s4d_lin_init_and_steps():
    p = parameters(MIXERS["s4d"])
    np.testing.assert_allclose(p["A_imag"], np.broadcast_to(np.pi * np.arange(4), (WIDTH, 4)))
    np.testing.assert_allclose(p["log_A_real"], np.log(0.5))
    dt = np.exp(p["log_dt"])
    assert dt.shape == (WIDTH,) and np.all((dt >= 1e-3) & (dt <= 0.1))


def test_s5_starts_from_hippo_n_blocks():
    """S5's Lambda: the eigenvalues of the normal part of HiPPO-LegS on each block (N = 8 per
    block, one per conjugate pair), tiled over the 2 blocks."""
    p = parameters(MIXERS["s5"])
    np.testing.assert_allclose(p["Lambda_re"], -0.5, rtol=1e-6)
    block = p["Lambda_im"].reshape(2, 4)
    np.testing.assert_allclose(block[0], block[1])
    assert np.all(block > 0) and np.all(np.diff(block[0]) > 0)
    assert p["B"].shape == (8, WIDTH, 2) and p["C"].shape == (WIDTH, 8, 2)


def test_lru_eigenvalues_start_on_the_ring():
    config = LRUConfig(WIDTH, state_size=64, r_min=0.4, r_max=0.9, max_phase=3.14)
    p = parameters(LRU(config))
    magnitude = np.exp(-np.exp(p["nu_log"]))
    assert np.all((magnitude >= 0.4 - 1e-6) & (magnitude <= 0.9 + 1e-6))
    assert np.all(np.exp(p["theta_log"]) <= 3.14)
    np.testing.assert_allclose(np.exp(p["gamma_log"]), np.sqrt(1 - magnitude**2), rtol=1e-5)


def test_rg_lru_decay_starts_in_griffin_ring():
    p = parameters(MIXERS["rg_lru"])
    a = np.exp(-np.logaddexp(0.0, p["a_param"]))  # sigmoid(-a_param)
    assert np.all((a >= 0.9 - 1e-6) & (a <= 0.999 + 1e-6))
    assert p["input_gate"]["w"].shape == (2, WIDTH // 2, WIDTH // 2)


def test_rg_lru_rows_restart_where_their_cache_is_empty():
    """A cache whose row 1 was reset to empty: row 0 continues its prefix, row 1 starts over."""
    mixer = MIXERS["rg_lru"]
    params, x = mixer_setup(mixer)
    apply = jax.jit(lambda p, x, c: mixer.apply(p, x, cache=c))
    _, cache = apply(params, x[:, :6], mixer.init_cache(2, 13))
    empty = mixer.init_cache(2, 13)
    cache = jax.tree.map(lambda kept, new: kept.at[1].set(new[1]), cache, empty)
    y, _ = apply(params, x[:, 6:], cache)
    whole, _ = jax.jit(mixer.apply)(params, x)
    alone, _ = jax.jit(mixer.apply)(params, x[:, 6:])
    np.testing.assert_allclose(y[0], whole[0, 6:], atol=1e-5)
    np.testing.assert_allclose(y[1], alone[1], atol=1e-5)


@pytest.mark.parametrize("allow_neg_eigval", [False, True])
def test_diagonal_lrnn_is_the_reference_recurrence(allow_neg_eigval):
    """`h_t = act(10 (x W_a + b_a)) h_{t-1} + (x W_b + b_b) x_t`, then the post-norm; negative
    transitions only with `allow_neg_eigval` (tanh instead of sigmoid)."""
    mixer = DiagonalLRNN(DiagonalLRNNConfig(WIDTH, allow_neg_eigval=allow_neg_eigval))
    params, x = mixer_setup(mixer, length=5)
    p = parameters(mixer)
    y, _ = mixer.apply(params, x)
    x = np.asarray(x)
    logits = 10 * (x @ p["A"]["kernel"] + p["A"]["bias"])
    a = np.tanh(logits) if allow_neg_eigval else 1 / (1 + np.exp(-logits))
    b = (x @ p["B"]["kernel"] + p["B"]["bias"]) * x
    h, states = np.zeros_like(x[:, 0]), []
    for t in range(x.shape[1]):
        h = a[:, t] * h + b[:, t]
        states.append(h)
    h = np.stack(states, axis=1)
    centered = h - h.mean(-1, keepdims=True)
    expected = centered / np.sqrt((centered**2).mean(-1, keepdims=True) + 1e-5) * p["norm"]["scale"]
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)
    assert (a.min() < 0) == allow_neg_eigval


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: S4DConfig(WIDTH, state_size=7), "state_size"),
        (lambda: S4DConfig(WIDTH, init="legs"), "init"),
        (lambda: S4DConfig(WIDTH, dt_min=0.1, dt_max=0.01), "dt_max"),
        (lambda: S4DConfig(WIDTH, discretization="euler"), "discretization"),
        (lambda: S4Config(WIDTH, dt_min=0.0), "dt_min"),
        (lambda: S5Config(WIDTH, state_size=16, blocks=3), "blocks"),
        (lambda: S5Config(WIDTH, state_size=16, blocks=16), "blocks"),
        (lambda: S5Config(WIDTH, activation="relu"), "activation"),
        (lambda: S5Config(WIDTH, c_init="zeros"), "c_init"),
        (lambda: LRUConfig(WIDTH, r_min=0.9, r_max=0.5), "r_max"),
        (lambda: LRUConfig(WIDTH, max_phase=0.0), "max_phase"),
        (lambda: LRUConfig(WIDTH, impl="fft"), "impl"),
        (lambda: RGLRUConfig(WIDTH, num_heads=3), "num_heads"),
        (lambda: RGLRUConfig(WIDTH, min_rad=0.999, max_rad=0.9), "min_rad"),
        (lambda: RGLRUConfig(WIDTH, lru_width=0), "lru_width"),
        (lambda: DiagonalLRNNConfig(WIDTH, sharpness=-1.0), "sharpness"),
        (lambda: DiagonalLRNNConfig(WIDTH, impl="reference"), "impl"),
    ],
)
def test_bad_config_names_the_field(make, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        make()
