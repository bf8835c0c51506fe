"""Feature maps that linear attention applies to queries and keys.

Each map acts on the last axis of an array of any leading shape (`[B, T, H, K] -> [B, T, H, F]`),
so that `phi(q_i) . phi(k_j)` stands in for the softmax weight `exp(q_i . k_j / sqrt(d))`:

    elu_plus_one(x) = elu(x) + 1                                    (Katharopoulos et al., 2020)
    relu(x)         = max(x, 0)
    taylor_exp(x)   = [1, x / d^{1/4}, vec(x x^T) / (sqrt(2) sqrt(d))]     (Based; JRT-RNN)
    hedgehog(x)     = [softmax(x W + b), softmax(-(x W + b))]       (Hedgehog, in LoLCATs' form)

with `d = x.shape[-1]`. The maps compute in float32 (float64 for float64 inputs) and return
the dtype of `x`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from seqjax import checks
from seqjax.scan.linear_recurrence import accumulation_dtype


def elu_plus_one(x: jax.Array) -> jax.Array:
    """`elu(x) + 1`, positive everywhere (Katharopoulos et al., "Transformers are RNNs")."""
    checks.check_floating("x", x)
    return (jax.nn.elu(x.astype(accumulation_dtype(x.dtype))) + 1).astype(x.dtype)


def relu(x: jax.Array) -> jax.Array:
    """`max(x, 0)`."""
    checks.check_floating("x", x)
    return jax.nn.relu(x)


def taylor_exp(x: jax.Array, *, symmetric: bool = False) -> jax.Array:
    """Based's 2nd-order Taylor map of `exp(q . k / sqrt(d))`: `[..., d] -> [..., F]`.

        phi(x) = [1, x / d^{1/4}, vec(x x^T) / (sqrt(2) sqrt(d))]
        phi(q) . phi(k) = 1 + q.k / sqrt(d) + (q.k)^2 / (2 d)

    The `1 / sqrt(d)` of the softmax is inside the map, so linear attention over these features
    needs no further scale (`scale=1.0`).

    Args:
      x: `[..., d]` queries or keys.
      symmetric: False (the default, as Based's `TaylorExp`) keeps all of `vec(x x^T)`:
        `F = 1 + d + d^2`. True keeps its upper triangle, off-diagonal entries times `sqrt(2)`:
        `F = 1 + d + d (d + 1) / 2` features with the same inner products.

    Returns:
      `phi(x): [..., F]` in the dtype of `x`.
    """
    _check_features("x", x)
    d = x.shape[-1]
    xf = x.astype(accumulation_dtype(x.dtype))
    if symmetric:
        rows, cols = np.triu_indices(d)
        weights = np.where(rows == cols, 1.0, math.sqrt(2.0)).astype(xf.dtype)
        second = xf[..., rows] * xf[..., cols] * weights
    else:
        second = (xf[..., :, None] * xf[..., None, :]).reshape(*x.shape[:-1], d * d)
    features = (jnp.ones_like(xf[..., :1]), xf / d**0.25, second / math.sqrt(2.0 * d))
    return jnp.concatenate(features, axis=-1).astype(x.dtype)


def hedgehog(x: jax.Array, weight: jax.Array, bias: jax.Array | None = None) -> jax.Array:
    """Hedgehog's learnable map, in the form of the LoLCATs code: `[..., K] -> [..., 2F]`.

        z = x W + b,    phi(x) = [softmax(z), softmax(-z)]      (each softmax over the F axis)

    This is the map of LoLCATs' code (`src/model/feature_map.py`). The Hedgehog paper writes
    `[exp(z), exp(-z)]`, and fla's `HedgehogFeatureMap` takes one softmax over both halves of
    doubled logits, `softmax([2z, -2z])`. They are not the same map: here each half is divided
    by its own per-token sum, in the paper by none, in fla by one sum over both; on the key side
    of linear attention such per-token normalisers do not cancel.

    Args:
      x: `[..., K]`, or `[..., H, K]` with a per-head `weight`.
      weight: `[K, F]`, shared by all heads, or `[H, K, F]`, one per head (LoLCATs' layout).
      bias: None, or `[F]` / `[H, F]` to match `weight`.

    Returns:
      `phi(x): [..., 2F]` (`[..., H, 2F]`) in the dtype of `x`.
    """
    _check_features("x", x)
    checks.check_floating("weight", weight)
    if weight.ndim == 3:
        if x.ndim < 2:
            raise ValueError(f"x: expected shape [..., H, K] for a per-head weight, got {x.shape}")
        dims = checks.Dims(H=x.shape[-2], K=x.shape[-1])
        weight_layout, bias_layout, subscripts = "H K F", "H F", "...hk,hkf->...hf"
    elif weight.ndim == 2:
        dims = checks.Dims(K=x.shape[-1])
        weight_layout, bias_layout, subscripts = "K F", "F", "...k,kf->...f"
    else:
        raise ValueError(f"weight: expected shape [K, F] or [H, K, F], got {weight.shape}")
    dims.check("weight", weight, weight_layout)
    if bias is not None:
        checks.check_floating("bias", bias)
        dims.check("bias", bias, bias_layout)
    acc = accumulation_dtype(x.dtype, weight.dtype)
    z = jnp.einsum(subscripts, x.astype(acc), weight.astype(acc))
    if bias is not None:
        z = z + bias.astype(acc)
    features = (jax.nn.softmax(z, axis=-1), jax.nn.softmax(-z, axis=-1))
    return jnp.concatenate(features, axis=-1).astype(x.dtype)


def _check_features(name: str, x: jax.Array) -> None:
    """A float array with a feature axis (its last)."""
    checks.check_floating(name, x)
    if np.ndim(x) < 1:
        raise ValueError(f"{name}: expected shape [..., K], got a scalar")
