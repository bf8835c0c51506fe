"""The linear time-invariant state-space layers: S4D, S4, S5 and the LRU.

Each layer runs one LTI recurrence over the `H = width` channels of `x: [B, T, H]` and a
pointwise output transform, as its authors' code does; the residual block and the pre-norm are
the model's (`seqjax.models.backbone`). None of these papers' blocks has an MLP after the layer:
the GELU and GLU output transform below is their pointwise part.

S4D (Gu et al., "On the Parameterization and Initialization of Diagonal State Space Models";
state-spaces/s4 `models/s4/s4d.py`): per channel h, N/2 complex modes (N = `state_size`),

    Lambda = -exp(log_A_real) + i A_imag      S4D-Lin: -1/2 + i pi n
                                              S4D-Inv: -1/2 + i N/pi (N/(2n+1) - 1)
    dt     = exp(log_dt),  log_dt ~ U[log 0.001, log 0.1]
    x_k = Abar x_{k-1} + Bbar u_k,  y_k = 2 Re(C x_k) + D u_k    (ZOH, B = 1, C complex normal)
    out = GLU(GELU(y) W + b)              (W: H -> 2H; GLU = first half * sigmoid(second half))

S4 (Gu et al., "Efficiently Modeling Long Sequences with Structured State Spaces";
state-spaces/s4 `models/s4/s4.py`, `SSMKernelDPLR`): the same layer with a diagonal-plus-low-rank
state matrix `A = Lambda - P P^*` initialized from the normal-plus-low-rank form of HiPPO-LegS
(`Re Lambda = -1/2`, `B` with its imaginary part clipped to [-2, 2]), bilinear discretization,
and the convolution kernel by the Cauchy/Woodbury algorithm (`s4_dplr_kernel`). The recurrent
form (decoding, a prefill from a cache, packed segments) is the discretized dense system of the
2 * (N/2) conjugate modes: `Abar = (I - dt/2 A)^{-1} (I + dt/2 A)` `[H, N, N]`. Its state stays
conjugate symmetric, `[x, conj(x)]`, so the cache keeps the half `x` and a step is

    x <- (Abar [x; conj x])[:N/2] + Bbar[:N/2] u,      y = 2 Re(C x) + D u.

S5 (Smith et al., "Simplified State Space Layers for Sequence Modeling"; luchris429/popjaxrl
`algorithms/s5.py`, lindermanlab/S5): one multi-input multi-output diagonal SSM over all channels,
`Lambda` the eigenvalues of the normal part of HiPPO-LegS on each of `blocks` diagonal blocks,
`B = V^{-1} B_real`, `C = C_real V` (V the eigenvectors), a learned step per mode, ZOH, and with
conjugate symmetry `y = 2 Re(C x) + D u`. Then (popjaxrl's `do_gtrxl_norm`) a LayerNorm, and the
activation: `gelu`, `full_glu` (`GELU`, then `W1 g * sigmoid(W2 g)`), `half_glu1`
(`g * sigmoid(W2 g)`) or `half_glu2` (`y * sigmoid(W2 g)`).

LRU (Orvieto et al., "Resurrecting Recurrent Neural Networks for Long Sequences"; the paper's
appendix code and NicolasZucchet/minimal-LRU `lru/model.py`):

    lambda = exp(-exp(nu_log) + i exp(theta_log)),   uniform on the ring r_min <= |lambda| <= r_max
    h_t = lambda h_{t-1} + exp(gamma_log) (B x_t),   gamma_log = log sqrt(1 - |lambda|^2) at init
    y_t = Re(C h_t) + D x_t,    out = W1 g * sigmoid(W2 g),  g = GELU(y)

Complex parameters are stored as real pairs `[..., 2]`. The caches hold the complex64 state.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from seqjax.nn.layers import Initializer, dense
from seqjax.nn.mixer import divides, frozen, positive, require
from seqjax.ops.common import SCAN_OP_IMPLS, reset, scan_tokens
from seqjax.ops.lru import lru_step
from seqjax.ops.s4 import (
    DISCRETIZATIONS,
    S4D_IMPLS,
    discretize_bilinear,
    nplr,
    s4_dplr_kernel,
    s4d,
    s4d_step,
    s5,
    s5_step,
    ssm_convolution,
)
from seqjax.parallel.dispatch import lru

S4D_INITS = ("lin", "inv")
S5_ACTIVATIONS = ("gelu", "full_glu", "half_glu1", "half_glu2")
S5_C_INITS = ("lecun_normal", "trunc_standard_normal", "complex_normal")
B_CLIP = 2.0  # S4's bound on the imaginary part of the HiPPO B in the eigenbasis
_HIGHEST = lax.Precision.HIGHEST


class SSMCache(NamedTuple):
    """The complex64 state after the tokens seen: `[B, H, N/2]` (S4, S4D), `[B, P]` (S5, LRU)."""

    state: jax.Array


# ----------------------------------------------------------------------------- configs


def require_step_range(config) -> None:
    require(config.dt_min > 0, "dt_min", f"must be positive, got {config.dt_min}")
    require(
        config.dt_max >= config.dt_min,
        "dt_max",
        f"must be at least dt_min = {config.dt_min}, got {config.dt_max}",
    )


def require_even_state(config) -> None:
    positive(config, "state_size")
    require(config.state_size % 2 == 0, "state_size", "must be even (conjugate pairs)")


@frozen
class S4DConfig:
    """`state_size` N (N/2 complex modes per channel), `init` "lin" or "inv", the range of the
    initial steps, `discretization` "zoh" (S4D's) or "bilinear"."""

    width: int
    state_size: int = 64
    init: str = "lin"
    dt_min: float = 0.001
    dt_max: float = 0.1
    discretization: str = "zoh"
    impl: str = "auto"
    chunk_size: int = 64

    def __post_init__(self):
        positive(self, "width", "chunk_size")
        require_even_state(self)
        require(self.init in S4D_INITS, "init", f"expected one of {S4D_INITS}")
        require_step_range(self)
        require(
            self.discretization in DISCRETIZATIONS,
            "discretization",
            f"expected one of {DISCRETIZATIONS}",
        )
        require(self.impl in S4D_IMPLS, "impl", f"expected one of {S4D_IMPLS}")


@frozen
class S4Config:
    """`state_size` N of the HiPPO-LegS matrix (N/2 conjugate modes per channel, rank 1)."""

    width: int
    state_size: int = 64
    dt_min: float = 0.001
    dt_max: float = 0.1

    def __post_init__(self):
        positive(self, "width")
        require_even_state(self)
        require_step_range(self)


@frozen
class S5Config:
    """`state_size`: the size of the real system (S5's `ssm_size`); with `conj_sym` the layer
    keeps P = state_size / 2 modes, one per conjugate pair. `blocks`: HiPPO-N blocks on the
    diagonal of the initial state matrix. `output_norm`: popjaxrl's LayerNorm after the SSM."""

    width: int
    state_size: int = 256
    blocks: int = 1
    conj_sym: bool = True
    c_init: str = "lecun_normal"
    discretization: str = "zoh"
    dt_min: float = 0.001
    dt_max: float = 0.1
    clip_eigs: bool = False
    activation: str = "full_glu"
    output_norm: bool = True
    impl: str = "auto"
    chunk_size: int = 64

    def __post_init__(self):
        positive(self, "width", "state_size", "blocks", "chunk_size")
        divides(self, "blocks", "state_size")
        block = self.state_size // self.blocks
        require(block % 2 == 0, "blocks", f"state_size / blocks = {block} must be even")
        require(self.c_init in S5_C_INITS, "c_init", f"expected one of {S5_C_INITS}")
        require(
            self.discretization in DISCRETIZATIONS,
            "discretization",
            f"expected one of {DISCRETIZATIONS}",
        )
        require_step_range(self)
        require(
            self.activation in S5_ACTIVATIONS, "activation", f"expected one of {S5_ACTIVATIONS}"
        )
        require(self.impl in SCAN_OP_IMPLS, "impl", f"expected one of {SCAN_OP_IMPLS}")

    @property
    def modes(self) -> int:
        return self.state_size // 2 if self.conj_sym else self.state_size


@frozen
class LRUConfig:
    """`state_size` N complex modes; `|lambda|` initialized uniformly on the ring
    `[r_min, r_max]` of the unit disk, its phase uniform in `[0, max_phase]`."""

    width: int
    state_size: int = 128
    r_min: float = 0.0
    r_max: float = 1.0
    max_phase: float = 6.28
    impl: str = "auto"
    chunk_size: int = 64

    def __post_init__(self):
        positive(self, "width", "state_size", "chunk_size")
        require(0 <= self.r_min, "r_min", f"must be in [0, r_max), got {self.r_min}")
        require(
            self.r_min < self.r_max <= 1,
            "r_max",
            f"must be in (r_min, 1] with r_min = {self.r_min}, got {self.r_max}",
        )
        require(self.max_phase > 0, "max_phase", f"must be positive, got {self.max_phase}")
        require(self.impl in SCAN_OP_IMPLS, "impl", f"expected one of {SCAN_OP_IMPLS}")


# ----------------------------------------------------------------------------- parameters


def log_uniform(low: float, high: float) -> Initializer:
    """`log x` for `x` log-uniform in `[low, high]` (the S4 family's `log_dt`)."""

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, math.log(low), math.log(high))

    return init


def constant(values) -> Initializer:
    """`values` broadcast to the parameter's shape."""

    def init(key, shape, dtype=jnp.float32):
        del key
        return jnp.broadcast_to(jnp.asarray(values, dtype), shape)

    return init


def complex_pair(values) -> Initializer:
    """The complex `values` broadcast to `shape[:-1]`, stored as `[..., 2]` real pairs."""
    values = np.asarray(values)
    return constant(np.stack([values.real, values.imag], axis=-1))


def complex_normal(stddev: float) -> Initializer:
    """Real and imaginary parts normal with `stddev` each (`torch.randn(cfloat)` is 0.5**0.5)."""
    return nn.initializers.normal(stddev)


def fan_in_uniform(key, shape, dtype=jnp.float32):
    """PyTorch's default `Linear` weight: uniform in `+-1/sqrt(fan_in)`, fan_in = shape[0]."""
    bound = shape[0] ** -0.5
    return jax.random.uniform(key, shape, dtype, -bound, bound)


def complex_param(
    module: nn.Module, name: str, init: Initializer, shape: tuple, axes: tuple
) -> jax.Array:
    """A complex64 parameter of `shape`, stored as real pairs `[*shape, 2]`."""
    pair = module.param(name, nn.with_logical_partitioning(init, (*axes, None)), (*shape, 2))
    return lax.complex(pair[..., 0], pair[..., 1])


def real_param(
    module: nn.Module, name: str, init: Initializer, shape: tuple, axes: tuple
) -> jax.Array:
    return module.param(name, nn.with_logical_partitioning(init, axes), shape)


def s4d_imag_init(init: str, state_size: int) -> np.ndarray:
    """`Im Lambda_n` for n < N/2: S4D-Lin `pi n`, S4D-Inv `N/pi (N/(2n+1) - 1)`."""
    n = np.arange(state_size // 2)
    if init == "lin":
        return np.pi * n
    return state_size / np.pi * (state_size / (2 * n + 1) - 1)


@functools.lru_cache
def legs_dplr(state_size: int):
    """`(Lambda [N/2], P [1, N/2], B [N/2])` of HiPPO-LegS in its normal eigenbasis, B's
    imaginary part clipped to `+-B_CLIP` as S4 does."""
    hippo = nplr("legs", state_size)
    B = hippo.B.real + 1j * np.clip(hippo.B.imag, -B_CLIP, B_CLIP)
    return hippo.Lambda, hippo.P, B


# ----------------------------------------------------------------------------- S4D and S4


def s4_output(y: jax.Array, width: int) -> jax.Array:
    """S4's pointwise part: exact GELU, then `Linear(H, 2H)` and a GLU."""
    g = jax.nn.gelu(y.astype(jnp.float32), approximate=False).astype(y.dtype)
    z = dense(
        (2, width), ("mlp", None, "embed"), "output", use_bias=True, kernel_init=fan_in_uniform
    )(g)
    value, gate = z[..., 0, :].astype(jnp.float32), z[..., 1, :].astype(jnp.float32)
    return (value * jax.nn.sigmoid(gate)).astype(y.dtype)


def s4_channel_parameters(module: nn.Module, config, imag_init: Initializer):
    """`(Lambda [H, N/2] complex, dt [H], C [H, N/2] complex, D [H])`, S4's per-channel
    parameters: `log_dt`, `log_A_real` (-1/2 at init), `A_imag`, `C` and `D`."""
    shape = (config.width, config.state_size // 2)
    log_dt = real_param(
        module, "log_dt", log_uniform(config.dt_min, config.dt_max), shape[:1], ("mlp",)
    )
    log_a_real = real_param(module, "log_A_real", constant(math.log(0.5)), shape, ("mlp", "state"))
    a_imag = real_param(module, "A_imag", imag_init, shape, ("mlp", "state"))
    C = complex_param(module, "C", complex_normal(0.5**0.5), shape, ("mlp", "state"))
    D = real_param(module, "D", nn.initializers.normal(1.0), shape[:1], ("mlp",))
    Lambda = lax.complex(-jnp.exp(log_a_real), a_imag)
    return Lambda, jnp.exp(log_dt), C, D


def init_s4_cache(batch_size: int, config) -> SSMCache:
    shape = (batch_size, config.width, config.state_size // 2)
    return SSMCache(jnp.zeros(shape, jnp.complex64))


class S4D(nn.Module):
    config: S4DConfig

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        *,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
        cache: SSMCache | None = None,
    ) -> tuple[jax.Array, SSMCache]:
        del positions  # no position embedding
        c = self.config
        imag = constant(s4d_imag_init(c.init, c.state_size))
        Lambda, dt, C, D = s4_channel_parameters(self, c, imag)
        B = jnp.ones(Lambda.shape, Lambda.dtype)  # folded into C, as the reference does
        options = dict(discretization=c.discretization)
        state = None if cache is None else cache.state
        if cache is not None and x.shape[1] == 1:
            y, state = s4d_step(x[:, 0], Lambda, B, C, dt, D, state, **options)
            y = y[:, None]
        else:
            y, state = s4d(
                x,
                Lambda,
                B,
                C,
                dt,
                D,
                state,
                segment_ids=segment_ids,
                impl=c.impl,
                chunk_size=c.chunk_size,
                **options,
            )
        return s4_output(y, c.width), SSMCache(state)

    def init_cache(self, batch_size: int, max_length: int, dtype=jnp.float32) -> SSMCache:
        del max_length, dtype  # the state does not grow and is complex64
        return init_s4_cache(batch_size, self.config)


def dplr_discretized(
    Lambda: jax.Array, P: jax.Array, B: jax.Array, dt: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """The bilinear `Abar [H, N, N]`, `Bbar [H, N]` of the full conjugate-symmetric system
    `A = diag([Lambda, conj Lambda]) - Q Q^*`, `Q = [P, conj P]`, `B = [B, conj B]`."""

    def with_conjugates(z):
        return jnp.concatenate([z, jnp.conj(z)], axis=-1)

    Q = with_conjugates(P)
    A = jax.vmap(jnp.diag)(with_conjugates(Lambda)) - jnp.einsum(
        "hrn,hrm->hnm", Q, jnp.conj(Q), precision=_HIGHEST
    )
    return discretize_bilinear(A, with_conjugates(B), dt)


def dplr_step(Abar: jax.Array, Bbar: jax.Array, C: jax.Array, D: jax.Array):
    """The token step `(x [B, H, N/2], (start [B], u [B, H])) -> (x, y [B, H])` of the
    discretized S4 system on the half state (restarting where `start`)."""
    half = C.shape[-1]
    Abar, Bbar = Abar[:, :half], Bbar[:, :half]

    def step(x, inputs):
        start, u = inputs
        x = reset(start, x)
        full = jnp.concatenate([x, jnp.conj(x)], axis=-1)
        x = jnp.einsum("hnm,bhm->bhn", Abar, full, precision=_HIGHEST) + Bbar * u[..., None]
        y = 2 * jnp.real(jnp.einsum("bhn,hn->bh", x, C, precision=_HIGHEST)) + D * u
        return x, y

    return step


class S4(nn.Module):
    config: S4Config

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        *,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
        cache: SSMCache | None = None,
    ) -> tuple[jax.Array, SSMCache]:
        del positions  # no position embedding
        c = self.config
        Lambda0, P0, B0 = legs_dplr(c.state_size)
        shape = (c.width, c.state_size // 2)
        Lambda, dt, C, D = s4_channel_parameters(self, c, constant(Lambda0.imag))
        P = complex_param(self, "P", complex_pair(P0), (c.width, *P0.shape), ("mlp", None, "state"))
        B = complex_param(self, "B", complex_pair(B0), shape, ("mlp", "state"))
        Abar, Bbar = dplr_discretized(Lambda, P, B, dt)
        step = dplr_step(Abar, Bbar, C, D)
        u = x.astype(jnp.float32)
        state = init_s4_cache(x.shape[0], c).state if cache is None else cache.state
        if cache is not None and x.shape[1] == 1:
            state, y = step(state, (jnp.zeros(x.shape[:1], bool), u[:, 0]))
            y = y[:, None]
        else:
            # The recurrent form restarts at segments and continues a cache; from a zero state
            # over one sequence the output is the convolution with S4's kernel (the final state
            # is still the recurrence's, and unused it is compiled away under jit).
            y, state = scan_tokens(step, state, u, segment_ids)
            if cache is None and segment_ids is None:
                kernel = s4_dplr_kernel(Lambda, P, B, C, dt, x.shape[1])
                y = ssm_convolution(u, kernel, D)
        return s4_output(y.astype(x.dtype), c.width), SSMCache(state)

    def init_cache(self, batch_size: int, max_length: int, dtype=jnp.float32) -> SSMCache:
        del max_length, dtype  # the state does not grow and is complex64
        return init_s4_cache(batch_size, self.config)


# ----------------------------------------------------------------------------- S5 and LRU


def glu_output(y: jax.Array, width: int, activation: str = "full_glu") -> jax.Array:
    """The S5 and LRU layers' activation (flax's tanh-approximated GELU): `gelu`, `full_glu`
    (`W1 g * sigmoid(W2 g)`), `half_glu1` (`g * sigmoid(W2 g)`), `half_glu2`
    (`y * sigmoid(W2 g)`), with `g = GELU(y)`."""
    g = jax.nn.gelu(y.astype(jnp.float32)).astype(y.dtype)
    if activation == "gelu":
        return g
    gate = dense(width, ("mlp", "embed"), "out2", use_bias=True)(g)
    if activation == "full_glu":
        value = dense(width, ("mlp", "embed"), "out1", use_bias=True)(g)
    else:
        value = g if activation == "half_glu1" else y
    gated = value.astype(jnp.float32) * jax.nn.sigmoid(gate.astype(jnp.float32))
    return gated.astype(y.dtype)


@functools.lru_cache
def s5_eigensystem(state_size: int, blocks: int, conj_sym: bool):
    """`(Lambda [P], V [state_size, P])`: on each of `blocks` diagonal blocks, the eigenvalues
    and eigenvectors of the normal part of HiPPO-LegS (one per conjugate pair with `conj_sym`)."""
    hippo = nplr("legs", state_size // blocks)
    Lambda, V = hippo.Lambda, hippo.V
    if not conj_sym:
        Lambda = np.concatenate([Lambda, np.conj(Lambda)])
        V = np.concatenate([V, np.conj(V)], axis=1)
    return np.tile(Lambda, blocks), np.kron(np.eye(blocks), V)


def s5_input_init(V: np.ndarray) -> Initializer:
    """`B = V^{-1} B_real`, `B_real [state_size, H]` LeCun normal (S5's `init_VinvB`)."""
    V_inverse = jnp.asarray(V.conj().T, jnp.complex64)

    def init(key, shape, dtype=jnp.float32):
        real = nn.initializers.lecun_normal()(key, (V.shape[0], shape[1]), dtype)
        B = V_inverse @ real.astype(jnp.complex64)
        return jnp.stack([B.real, B.imag], axis=-1).astype(dtype)

    return init


def s5_output_init(V: np.ndarray, method: str) -> Initializer:
    """S5's `C [H, P]`: `complex_normal` samples it directly; otherwise `C = C_real V` with
    `C_real [H, state_size]` complex, LeCun normal over the whole array (`lecun_normal`) or
    row by row (`trunc_standard_normal`), as S5's `init_CV` does."""
    if method == "complex_normal":
        return complex_normal(0.5**0.5)
    V = jnp.asarray(V, jnp.complex64)

    def init(key, shape, dtype=jnp.float32):
        lecun = nn.initializers.lecun_normal()
        full = (shape[0], V.shape[0], 2)
        if method == "lecun_normal":
            pairs = lecun(key, full, dtype)
        else:
            keys = jax.random.split(key, shape[0])
            pairs = jax.vmap(lambda k: lecun(k, (1, *full[1:]), dtype)[0])(keys)
        C = lax.complex(pairs[..., 0], pairs[..., 1]) @ V
        return jnp.stack([C.real, C.imag], axis=-1).astype(dtype)

    return init


class S5(nn.Module):
    config: S5Config

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        *,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
        cache: SSMCache | None = None,
    ) -> tuple[jax.Array, SSMCache]:
        del positions  # no position embedding
        c = self.config
        Lambda0, V = s5_eigensystem(c.state_size, c.blocks, c.conj_sym)
        modes, width = c.modes, c.width
        lambda_re = real_param(self, "Lambda_re", constant(Lambda0.real), (modes,), ("state",))
        lambda_im = real_param(self, "Lambda_im", constant(Lambda0.imag), (modes,), ("state",))
        B = complex_param(self, "B", s5_input_init(V), (modes, width), ("state", "embed"))
        C = complex_param(
            self, "C", s5_output_init(V, c.c_init), (width, modes), ("embed", "state")
        )
        D = real_param(self, "D", nn.initializers.normal(1.0), (width,), ("embed",))
        log_step = real_param(
            self, "log_step", log_uniform(c.dt_min, c.dt_max), (modes,), ("state",)
        )
        if c.clip_eigs:
            lambda_re = jnp.minimum(lambda_re, -1e-4)
        Lambda = lax.complex(lambda_re, lambda_im)
        if c.conj_sym:
            C = 2 * C  # each mode stands for a conjugate pair: y = 2 Re(C x)
        args = (Lambda, B, C, jnp.exp(log_step), D)
        state = None if cache is None else cache.state
        if cache is not None and x.shape[1] == 1:
            y, state = s5_step(x[:, 0], *args, state, discretization=c.discretization)
            y = y[:, None]
        else:
            y, state = s5(
                x,
                *args,
                state,
                segment_ids=segment_ids,
                discretization=c.discretization,
                impl=c.impl,
                chunk_size=c.chunk_size,
            )
        if c.output_norm:
            norm = nn.LayerNorm(
                dtype=jnp.float32,
                scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
                name="norm",
            )
            y = norm(y).astype(x.dtype)
        return glu_output(y, width, c.activation), SSMCache(state)

    def init_cache(self, batch_size: int, max_length: int, dtype=jnp.float32) -> SSMCache:
        del max_length, dtype  # the state does not grow and is complex64
        return SSMCache(jnp.zeros((batch_size, self.config.modes), jnp.complex64))


def ring_nu_log_init(r_min: float, r_max: float) -> Initializer:
    """`nu_log = log(-log |lambda|)`, `|lambda|^2` uniform in `[r_min^2, r_max^2]`."""

    def init(key, shape, dtype=jnp.float32):
        u = jax.random.uniform(key, shape, dtype)
        return jnp.log(-0.5 * jnp.log(u * (r_max**2 - r_min**2) + r_min**2))

    return init


def phase_log_init(max_phase: float) -> Initializer:
    def init(key, shape, dtype=jnp.float32):
        return jnp.log(max_phase * jax.random.uniform(key, shape, dtype))

    return init


class LRU(nn.Module):
    config: LRUConfig

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        *,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
        cache: SSMCache | None = None,
    ) -> tuple[jax.Array, SSMCache]:
        del positions  # no position embedding
        c = self.config
        modes, width = c.state_size, c.width
        nu_log = real_param(
            self, "nu_log", ring_nu_log_init(c.r_min, c.r_max), (modes,), ("state",)
        )
        theta_log = real_param(self, "theta_log", phase_log_init(c.max_phase), (modes,), ("state",))

        def gamma_log_init(key, shape, dtype=jnp.float32):
            del key
            magnitude = jnp.exp(-jnp.exp(nu_log))
            return jnp.broadcast_to(jnp.log(jnp.sqrt(1 - magnitude**2)), shape).astype(dtype)

        gamma_log = real_param(self, "gamma_log", gamma_log_init, (modes,), ("state",))
        B = complex_param(
            self,
            "B",
            nn.initializers.normal((2 * width) ** -0.5),
            (modes, width),
            ("state", "embed"),
        )
        C = complex_param(
            self, "C", nn.initializers.normal(modes**-0.5), (width, modes), ("embed", "state")
        )
        D = real_param(self, "D", nn.initializers.normal(1.0), (width,), ("embed",))
        args = (nu_log, theta_log, B, C, D, gamma_log)
        state = None if cache is None else cache.state
        if cache is not None and x.shape[1] == 1:
            y, state = lru_step(x[:, 0], *args, state)
            y = y[:, None]
        else:
            y, state = lru(
                x, *args, state, segment_ids=segment_ids, impl=c.impl, chunk_size=c.chunk_size
            )
        return glu_output(y, width), SSMCache(state)

    def init_cache(self, batch_size: int, max_length: int, dtype=jnp.float32) -> SSMCache:
        del max_length, dtype  # the state does not grow and is complex64
        return SSMCache(jnp.zeros((batch_size, self.config.state_size), jnp.complex64))
