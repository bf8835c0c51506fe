"""The pieces the mixers share: projections, norms, rotary embeddings, the SwiGLU MLP.

Parameters carry logical axis names (`embed`, `heads`, `kv`, `mlp`, `vocab`, `state`) through
`nn.with_logical_partitioning`, so a module runs unsharded in a notebook and sharded under a
mesh and rules (`seqjax.parallel`) without change. Computation is float32 where it normalizes
(norms, gates); matmuls run in the input dtype with float32 parameters cast to it (`Dense`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Initializer = Callable[..., jax.Array]
LECUN_NORMAL = nn.initializers.lecun_normal()


class Dense(nn.Module):
    """`y = x W (+ b)` over the input axes `axis`, computed in `x`'s dtype (float32 parameters
    are cast to it, so bfloat16 activations stay bfloat16). The kernel `[*in, *features]` is
    initialized as the flattened `[prod(in), prod(features)]` matrix (its fan-in is the whole
    input), then reshaped; `axes` names its axes, inputs first."""

    features: int | tuple[int, ...]
    axes: tuple[str | None, ...]
    axis: int | tuple[int, ...] = -1
    use_bias: bool = False
    kernel_init: Initializer = LECUN_NORMAL
    bias_init: Initializer = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
        axis = (self.axis,) if isinstance(self.axis, int) else tuple(self.axis)
        axis = tuple(a % x.ndim for a in axis)
        if len(self.axes) != len(axis) + len(features):
            raise ValueError(
                f"axes: expected {len(axis) + len(features)} names (inputs then features), "
                f"got {self.axes}"
            )
        inputs = tuple(x.shape[a] for a in axis)

        def kernel_init(key, shape, dtype=jnp.float32):
            flat = (math.prod(inputs), math.prod(features))
            return self.kernel_init(key, flat, dtype).reshape(shape)

        kernel = self.param(
            "kernel", nn.with_logical_partitioning(kernel_init, self.axes), inputs + features
        )
        y = jax.lax.dot_general(
            x, kernel.astype(x.dtype), ((axis, tuple(range(len(axis)))), ((), ()))
        )
        if self.use_bias:
            bias_axes = self.axes[len(axis) :]
            bias = self.param(
                "bias", nn.with_logical_partitioning(self.bias_init, bias_axes), features
            )
            y = y + bias.astype(x.dtype)
        return y


def dense(
    features: int | tuple[int, ...],
    axes: tuple[str | None, ...],
    name: str,
    *,
    axis: int | tuple[int, ...] = -1,
    use_bias: bool = False,
    kernel_init: Initializer = LECUN_NORMAL,
    bias_init: Initializer = nn.initializers.zeros,
) -> Dense:
    """A projection of the `axis` axes (the last by default) to `features`, its kernel's axes
    named `axes` (input axes first), e.g. `dense((H, K), ("embed", "heads", "kv"), "q")` or
    `dense(D, ("heads", "kv", "embed"), "o", axis=(-2, -1))`."""
    return Dense(features, axes, axis, use_bias, kernel_init, bias_init, name=name)


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """`x / sqrt(sum x^2 + eps)` over the last axis (fla's `l2_norm`), computed in float32."""
    xf = x.astype(jnp.float32)
    return (xf * jax.lax.rsqrt(jnp.sum(xf * xf, axis=-1, keepdims=True) + eps)).astype(x.dtype)


def rms_normalize(x: jax.Array, eps: float) -> jax.Array:
    """`x / sqrt(mean x^2 + eps)` over the last axis, in float32."""
    xf = x.astype(jnp.float32)
    return xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)


class RMSNorm(nn.Module):
    """RMSNorm over the last axis (Zhang & Sennrich): `x / rms(x) * weight`.

    `group_size` splits the last axis into groups normalized separately (Mamba-2's grouped
    norm; a per-head norm is `group_size = head dim`). `axis_name` names the weight's axis.
    """

    eps: float = 1e-6
    group_size: int | None = None
    axis_name: str | None = "embed"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        weight = self.param(
            "weight",
            nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,)),
            (width,),
        )
        return (self.normalized(x) * weight).astype(x.dtype)

    def normalized(self, x: jax.Array) -> jax.Array:
        group = self.group_size or x.shape[-1]
        if x.shape[-1] % group:
            raise ValueError(f"group_size: {group} does not divide the width {x.shape[-1]}")
        grouped = x.reshape(*x.shape[:-1], x.shape[-1] // group, group)
        return rms_normalize(grouped, self.eps).reshape(x.shape)


class GatedRMSNorm(nn.Module):
    """RMSNorm with a SiLU gate `z`: `norm(x) * silu(z)` (`norm_before_gate=True`, GLA's and
    fla's fused norm-gate) or `norm(x * silu(z))` (False: Mamba-2's `RMSNormGated`)."""

    eps: float = 1e-6
    group_size: int | None = None
    norm_before_gate: bool = True
    axis_name: str | None = "embed"

    @nn.compact
    def __call__(self, x: jax.Array, z: jax.Array) -> jax.Array:
        norm = RMSNorm(self.eps, self.group_size, self.axis_name, name="norm")
        gate = jax.nn.silu(z.astype(jnp.float32))
        xf = x.astype(jnp.float32)  # one rounding, at the end
        y = norm(xf) * gate if self.norm_before_gate else norm(xf * gate)
        return y.astype(x.dtype)


def rotary(
    x: jax.Array, positions: jax.Array, base: float = 10000.0, fraction: float = 1.0
) -> jax.Array:
    """Rotary position embedding (Su et al., RoFormer) of `x: [B, T, H, D]` at
    `positions: [B, T]`, in the "rotate half" layout of Llama and fla: channel `i < D'/2`
    pairs with `i + D'/2`, at frequency `base^(-2i / D')`, over the first
    `D' = fraction * D` channels (the rest pass through)."""
    dim = int(x.shape[-1] * fraction) // 2 * 2
    half = dim // 2
    frequencies = base ** (-jnp.arange(half, dtype=jnp.float32) * 2 / dim)
    angles = positions.astype(jnp.float32)[..., None, None] * frequencies  # [B, T, 1, D'/2]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    xf = x.astype(jnp.float32)
    x1, x2, rest = xf[..., :half], xf[..., half:dim], xf[..., dim:]
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], axis=-1)
    return rotated.astype(x.dtype)


class SwiGLU(nn.Module):
    """The gated MLP of Llama (Shazeer, "GLU Variants"): `W_down(silu(W_gate x) * W_up x)`."""

    hidden: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        gate = dense(self.hidden, ("embed", "mlp"), "gate")(x)
        up = dense(self.hidden, ("embed", "mlp"), "up")(x)
        return dense(width, ("mlp", "embed"), "down")(jax.nn.silu(gate) * up)


class LowRankProjection(nn.Module):
    """`x -> W_2 (W_1 x) (+ b)` through a rank-`rank` bottleneck: GLA's gate projections."""

    features: int | tuple[int, ...]
    rank: int
    axes: tuple[str | None, ...]
    use_bias: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        low = dense(self.rank, (self.axes[0], None), "down")(x)
        return dense(self.features, (None, *self.axes[1:]), "up", use_bias=self.use_bias)(low)
