"""LoRA (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models") as a transformation of
the parameter tree: no module is rewritten; the loss applies the model to merged parameters.

A kernel of `seqjax.nn.layers.dense` is `W: [*in, *out]`, its input axes then its feature axes
(attention's `q` is `[D, H, K]`: one input axis; its `o` is `[H, K, D]`: two). Its adapter is

    A: [*in, r]   (Gaussian, std 1 / sqrt(prod(in)); the paper's "random Gaussian" A)
    B: [r, *out]  (zeros)
    W' = W + (alpha / r) A B                  (the contraction over r)

so at initialization `W' = W` exactly. Training only the adapters: differentiate the loss of the
merged parameters with respect to the adapters, the base parameters held fixed,

    grads = jax.grad(lambda adapters: loss(merge_lora(params, adapters, alpha=alpha)))(adapters)

which by the chain rule, with `G = dL/dW'` flattened to `[prod(in), prod(out)]`, is
`dL/dA = (alpha / r) G B^T` and `dL/dB = (alpha / r) A^T G`. Parameters are plain arrays
(`nn.unbox` a freshly initialized tree) of an unscanned model (`scan_layers=False`): a scanned
stack puts a layer axis in front of every kernel, which would count as an input axis.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from seqjax.train.optimizer import compile_patterns, path_name


class LoRAAdapter(NamedTuple):
    """The low-rank update of one kernel `[*in, *out]`: `lora_a: [*in, r]`, `lora_b: [r, *out]`."""

    lora_a: jax.Array
    lora_b: jax.Array


Adapters = dict[str, LoRAAdapter]  # by the kernel's path, `seqjax.train.optimizer.path_name`


def _split(name: str, shape: tuple[int, ...], axes: Any, rank: int) -> tuple[tuple, tuple]:
    """`(in, out)` axes of the kernel `name` of `shape` with `axes` input axes, which must leave
    an output axis; `rank` must not exceed the sizes of either side."""
    if not isinstance(axes, int) or not 1 <= axes < len(shape):
        raise ValueError(
            f"targets: {name!r} has shape {shape}; expected 1 to {len(shape) - 1} input axes, "
            f"got {axes!r}"
        )
    inputs, outputs = shape[:axes], shape[axes:]
    limit = min(math.prod(inputs), math.prod(outputs))
    if rank > limit:
        raise ValueError(f"rank: expected at most min(in, out) = {limit} for {name!r}, got {rank}")
    return inputs, outputs


def init_lora(key: jax.Array, params: Any, *, targets: Mapping[str, int], rank: int) -> Adapters:
    """Adapters of rank `rank` for the kernels of `params` whose path matches a pattern of
    `targets` (a regular expression searched in the '/'-joined path -> the number of the
    kernel's leading input axes), e.g. `{r"mixer/(q|k|v)/kernel$": 1, r"mixer/o/kernel$": 2}`.

    Raises a ValueError naming `rank` (not a positive int, or above a kernel's input or output
    size) or `targets` (empty, a pattern that matches nothing, patterns that disagree on a
    kernel, or input axes that leave it no output axis), or `params` (a boxed parameter).
    """
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"rank: expected a positive int, got {rank!r}")
    if not targets:
        raise ValueError("targets: expected at least one pattern")
    expressions = dict(zip(targets, compile_patterns(list(targets), "targets"), strict=True))
    leaves = jax.tree_util.tree_leaves_with_path(
        params, is_leaf=lambda x: isinstance(x, nn.Partitioned)
    )
    adapters, used = {}, set()
    for path, kernel in leaves:
        name = path_name(path)
        matched = {pattern for pattern, e in expressions.items() if e.search(name)}
        if not matched:
            continue
        used |= matched
        if isinstance(kernel, nn.Partitioned):
            raise ValueError(
                f"params: expected plain arrays (nn.unbox them), got a box at {name!r}"
            )
        counts = {targets[pattern] for pattern in matched}
        if len(counts) > 1:
            raise ValueError(f"targets: patterns give {name!r} different input axes {counts}")
        inputs, outputs = _split(name, kernel.shape, counts.pop(), rank)
        key, draw = jax.random.split(key)
        a = jax.random.normal(draw, (*inputs, rank), jnp.float32) / math.sqrt(math.prod(inputs))
        adapters[name] = LoRAAdapter(a, jnp.zeros((rank, *outputs), jnp.float32))
    for pattern in targets:
        if pattern not in used:
            raise ValueError(f"targets: pattern {pattern!r} matches no parameter")
    return adapters


def _delta(adapter: LoRAAdapter, alpha: float) -> jax.Array:
    """`(alpha / r) A B: [*in, *out]`, float32."""
    rank = adapter.lora_a.shape[-1]
    return (alpha / rank) * jnp.tensordot(adapter.lora_a, adapter.lora_b, axes=1)


def merge_lora(params: Any, adapters: Adapters, *, alpha: float) -> Any:
    """`params` with every adapted kernel replaced by `W + (alpha / r) A B` (in W's dtype).

    Raises a ValueError naming `alpha` (not positive) or `adapters` (a path that is not in
    `params`, or an update whose shape is not the kernel's)."""
    if not alpha > 0:
        raise ValueError(f"alpha: expected a positive scale, got {alpha!r}")
    merged = set()

    def merge(path, kernel):
        name = path_name(path)
        if name not in adapters:
            return kernel
        delta = _delta(adapters[name], alpha)
        if delta.shape != kernel.shape:
            raise ValueError(
                f"adapters: {name!r} gives an update of shape {delta.shape} to a kernel of "
                f"shape {kernel.shape}"
            )
        merged.add(name)
        return (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)

    result = jax.tree_util.tree_map_with_path(merge, params)
    missing = sorted(set(adapters) - merged)
    if missing:
        raise ValueError(f"adapters: no parameter at {missing}")
    return result


__all__ = ["Adapters", "LoRAAdapter", "init_lora", "merge_lora"]
