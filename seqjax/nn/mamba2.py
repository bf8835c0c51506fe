"""The Mamba-2 layer (Dao & Gu, "Transformers are SSMs: Generalized Models and Efficient
Algorithms Through Structured State Space Duality", 2024; `mamba_ssm/modules/mamba2.py` of
state-spaces/mamba), with Stuffed Mamba's inference-time mitigations as options.

With `E = expand * d` inner channels in `H = E / P` heads of `P = head_dim`, `G` groups of
`B, C` and state size `N`:

    z, x, B, C, dt = u W_in                  [B, T, E], [B, T, E], [B, T, G, N] x 2, [B, T, H]
    x, B, C  = SiLU(conv(x, B, C))           (depthwise causal, width 4, with bias)
    delta    = softplus(dt + dt_bias)        [B, T, H]
    A        = -exp(A_log)                   [H], A uniform in [1, 16] at init
    H_t      = exp(delta_t A) H_{t-1} + B_t (delta_t x_t)^T     (ssd; per head, H_t: [N, P])
    y_t      = H_t^T C_t + D x_t             (D per head, 1 at init)
    out      = RMSNorm(y * SiLU(z)) W_out    (norm_before_gate=False, one norm per group of
                                              E / G channels: mamba_ssm's RMSNormGated)

`dt_bias` is the inverse softplus of a step log-uniform in [dt_min, dt_max] (floored at
dt_init_floor), as in Mamba. The paper's block is this mixer alone: no MLP after it.

Stuffed Mamba (Chen et al., "Stuffed Mamba: State Collapse and State Capacity of RNN-Based
Long-Context Modeling", 2024) finds that a model trained on contexts short for its state size
never learns to forget, and its state blows up past the training length; it proposes
training-free mitigations, two of which are options here:

- `max_decay` ("forget more"): the per-token decay `a_t = exp(delta_t A_h)` is clamped to at
  most `max_decay`. What is clamped is the step size: `delta_t` is raised to at least
  `log(max_decay) / A_h`, the step at which `a_t = max_decay` (as mamba_ssm's `dt_limit`
  clamps it), so a token whose step grows also writes `delta_t x_t` more strongly.
- `max_state_norm` (state normalization): after every update each head's state is scaled
  down to Frobenius norm at most `max_state_norm`,
  `H_t <- H_t * min(1, max_state_norm / ||H_t||_F)`, and `y_t` reads the scaled state. This
  is not linear in the past, so the chunked `ssd` cannot compute it: the layer then runs a
  token loop (`lax.scan` of `ssd_step` and the scaling, rematerialized by chunks) at any
  length.

Both are inference-time changes: they apply on calls with a cache (prefill and decoding).
Calls without a cache (training, parallel scoring) ignore them unless
`mitigate_without_cache` is set, which makes every call mitigated (and decoding again equal
to the parallel pass).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from seqjax.nn.conv import ShortConvolution
from seqjax.nn.layers import GatedRMSNorm, Initializer, dense
from seqjax.nn.mamba import require_step_range, step_bias_init
from seqjax.nn.mixer import divides, frozen, positive, require
from seqjax.ops.common import reset, scan_tokens_chunked
from seqjax.ops.short_conv import init_conv_cache
from seqjax.ops.ssd import SSD_IMPLS, ssd_step
from seqjax.parallel.dispatch import ssd


@frozen
class Mamba2Config:
    width: int
    state_size: int = 128
    conv_size: int = 4
    expand: int = 2
    head_dim: int = 64
    num_groups: int = 1
    a_init_range: tuple[float, float] = (1.0, 16.0)
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    conv_bias: bool = True
    use_bias: bool = False  # on the input and output projections
    norm_eps: float = 1e-5
    max_decay: float | None = None
    max_state_norm: float | None = None
    mitigate_without_cache: bool = False
    impl: str = "auto"
    chunk_size: int = 64

    def __post_init__(self):
        positive(self, "width", "state_size", "conv_size", "expand", "head_dim", "num_groups")
        positive(self, "chunk_size")
        inner = self.inner_width
        require(
            inner % self.head_dim == 0,
            "head_dim",
            f"head_dim = {self.head_dim} must divide expand * width = {inner}",
        )
        divides(self, "num_groups", "num_heads")
        low, high = self.a_init_range
        require(0 < low <= high, "a_init_range", f"expected 0 < low <= high, got {(low, high)}")
        require_step_range(self)
        require(self.norm_eps > 0, "norm_eps", f"must be positive, got {self.norm_eps}")
        if self.max_decay is not None:
            ok = 0 < self.max_decay < 1
            require(ok, "max_decay", f"must lie in (0, 1), got {self.max_decay}")
        if self.max_state_norm is not None:
            ok = self.max_state_norm > 0
            require(ok, "max_state_norm", f"must be positive, got {self.max_state_norm}")
        require(self.impl in SSD_IMPLS, "impl", f"expected one of {SSD_IMPLS}")

    @property
    def inner_width(self) -> int:
        return self.expand * self.width

    @property
    def num_heads(self) -> int:
        return self.inner_width // self.head_dim


class Mamba2Cache(NamedTuple):
    """`state: [B, H, N, P]` float32 and the convolutions' tails of x `[B, W - 1, E]`, B and C
    (`[B, W - 1, G * N]` each)."""

    state: jax.Array
    conv_x: jax.Array
    conv_b: jax.Array
    conv_c: jax.Array


def a_log_init(low: float, high: float) -> Initializer:
    """`A_log = log(A)`, `A` uniform in [low, high] (Mamba-2's `A_init_range`)."""

    def init(key, shape, dtype=jnp.float32):
        return jnp.log(jax.random.uniform(key, shape, dtype, low, high))

    return init


def clamp_step(delta: jax.Array, A: jax.Array, max_decay: float) -> jax.Array:
    """`delta: [..., H]` raised so that `exp(delta A) <= max_decay` for `A: [H] < 0`."""
    return jnp.maximum(delta, math.log(max_decay) / A)


def clip_state_norm(state: jax.Array, max_norm: float) -> tuple[jax.Array, jax.Array]:
    """`(state * scale, scale)`, `scale = min(1, max_norm / ||state||_F)` per `[N, P]` head
    matrix of `state: [B, H, N, P]`; `scale: [B, H]` (its gradient is finite at 0)."""
    squared = jnp.sum(jnp.square(state), axis=(-2, -1))
    scale = max_norm * jax.lax.rsqrt(jnp.maximum(squared, max_norm**2))
    return state * scale[..., None, None], scale


def ssd_with_state_norm(x, delta, A, B, C, D, state, segment_ids, max_norm, chunk_size):
    """`ssd` (step sizes given, no softplus) with the state's norm clipped after every update,
    as a token loop rematerialized by chunks of `chunk_size` (the backward pass keeps only the
    states entering the chunks). Returns `(y [B, T, H, P], final state)`."""
    if state is None:
        batch, _, heads, head_dim = x.shape
        state = jnp.zeros((batch, heads, B.shape[-1], head_dim), jnp.float32)

    def step(state, inputs):
        start, (x_t, delta_t, B_t, C_t) = inputs
        read, state = ssd_step(
            x_t, delta_t, A, B_t, C_t, None, None, reset(start, state), dt_softplus=False
        )
        state, scale = clip_state_norm(state, max_norm)
        y_t = read.astype(jnp.float32) * scale[..., None] + D[:, None] * x_t.astype(jnp.float32)
        return state, y_t.astype(x_t.dtype)

    return scan_tokens_chunked(step, state, (x, delta, B, C), segment_ids, chunk_size)


class Mamba2(nn.Module):
    config: Mamba2Config

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        *,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
        cache: Mamba2Cache | None = None,
    ) -> tuple[jax.Array, Mamba2Cache]:
        del positions  # no position embedding
        c = self.config
        batch, length = x.shape[:2]
        inner, heads, groups = c.inner_width, c.num_heads, c.num_groups
        projected = c.num_groups * c.state_size
        tails = (None, None, None) if cache is None else cache[1:]
        z = dense(inner, ("embed", "heads"), "z_proj", use_bias=c.use_bias)(x)
        streams = []
        for name, features, axis, tail in zip(
            ("x", "B", "C"),
            (inner, projected, projected),
            ("heads", "state", "state"),
            tails,
            strict=True,
        ):
            h = dense(features, ("embed", axis), f"{name}_proj", use_bias=c.use_bias)(x)
            conv = ShortConvolution(c.conv_size, "silu", c.conv_bias, axis, name=f"{name}_conv")
            streams.append(conv(h, segment_ids=segment_ids, cache=tail))
        (u, conv_x), (B, conv_b), (C, conv_c) = streams
        u = u.reshape(batch, length, heads, c.head_dim)
        B = B.reshape(batch, length, groups, c.state_size)
        C = C.reshape(batch, length, groups, c.state_size)
        dt = dense(heads, ("embed", "heads"), "dt_proj", use_bias=c.use_bias)(x)
        dt_bias = self.param(
            "dt_bias",
            nn.with_logical_partitioning(
                step_bias_init(c.dt_min, c.dt_max, c.dt_init_floor), ("heads",)
            ),
            (heads,),
        )
        a_log = self.param(
            "A_log", nn.with_logical_partitioning(a_log_init(*c.a_init_range), ("heads",)), (heads,)
        )
        skip = self.param(
            "D", nn.with_logical_partitioning(nn.initializers.ones, ("heads",)), (heads,)
        )
        A = -jnp.exp(a_log)
        delta = jax.nn.softplus(dt.astype(jnp.float32) + dt_bias)
        mitigate = cache is not None or c.mitigate_without_cache
        if mitigate and c.max_decay is not None:
            delta = clamp_step(delta, A, c.max_decay)
        state = None if cache is None else cache.state
        if mitigate and c.max_state_norm is not None:
            y, state = ssd_with_state_norm(
                u, delta, A, B, C, skip, state, segment_ids, c.max_state_norm, c.chunk_size
            )
        elif cache is not None and length == 1:
            y, state = ssd_step(
                u[:, 0], delta[:, 0], A, B[:, 0], C[:, 0], skip, None, state, dt_softplus=False
            )
            y = y[:, None]
        else:
            y, state = ssd(
                u,
                delta,
                A,
                B,
                C,
                skip,
                None,
                state,
                dt_softplus=False,
                segment_ids=segment_ids,
                impl=c.impl,
                chunk_size=c.chunk_size,
            )
        y = y.reshape(batch, length, inner)
        norm = GatedRMSNorm(
            c.norm_eps, inner // groups, norm_before_gate=False, axis_name="heads", name="norm"
        )
        out = dense(c.width, ("heads", "embed"), "out_proj", use_bias=c.use_bias)(norm(y, z))
        return out, Mamba2Cache(state, conv_x, conv_b, conv_c)

    def init_cache(self, batch_size: int, max_length: int, dtype=jnp.float32) -> Mamba2Cache:
        del max_length  # the state does not grow
        c = self.config
        state = jnp.zeros((batch_size, c.num_heads, c.state_size, c.head_dim), jnp.float32)
        projected = c.num_groups * c.state_size
        return Mamba2Cache(
            state,
            init_conv_cache(batch_size, c.conv_size, c.inner_width, dtype),
            init_conv_cache(batch_size, c.conv_size, projected, dtype),
            init_conv_cache(batch_size, c.conv_size, projected, dtype),
        )
