"""Attention distillation: the losses that fit a linear attention layer to a frozen softmax one
(Hedgehog, LoLCATs), and the means of reading a layer's inputs and outputs inside a model.

Attention weights, `[B, H, T, T]` (row i: query i over keys j), causal and within a segment
(tokens of equal `segment_ids`), from `q, k: [B, T, H, K]` (RoPE already applied) and the maps
`phi_q, phi_k: [B, T, H, F]`:

    softmax:  a_ij = exp(s_ij) / sum_{j' <= i} exp(s_ij'),    s_ij = q_i . k_j / sqrt(K)
    linear:   â_ij = phi(q_i) . phi(k_j) / sum_{j' <= i} phi(q_i) . phi(k_j')

Hedgehog's loss (Zhang et al., "The Hedgehog & the Porcupine: Expressive Linear Attentions
with Softmax Mimicry"), a soft-label cross-entropy per query row, its mean over batch, heads
and queries as in LoLCATs' trainer (`src/trainer/distill_attention_xent_mse.py`, which takes
the log of â clamped at 1e-12):

    L_CE = mean_{b, h, i}  - sum_j a_ij log â_ij

LoLCATs' attention transfer (Zhang et al., "LoLCATs: On Low-Rank Linearizing of Large Language
Models"; the same trainer): the mean squared error between the linearized layer's attention
output and the softmax layer's, per head before the output projection (`[B, T, H, K]`), times
their `mse_factor` of 1000:

    L_MSE = 1000 * mean_{b, t, h, k} (y_student - y_teacher)^2

Both trainers average the per-layer losses over the distilled layers; each layer reads the
teacher's input to that layer, so the layers are fitted independently.

`capture_calls` records what submodules of a Flax model receive and return (a layer's input,
its queries and keys, the input of its output projection) without changing any module;
`transfer_parameters` loads a softmax model's parameters into a linearized one.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from seqjax import checks
from seqjax.train.optimizer import path_name

# LoLCATs' `mse_factor`.
LOLCATS_MSE_SCALE = 1000.0


def visible_pairs(length: int, segment_ids: jax.Array | None) -> jax.Array:
    """`[B or 1, 1, T, T]` bool: key j is visible to query i (j <= i, the same segment)."""
    causal = jnp.tril(jnp.ones((length, length), bool))[None, None]
    if segment_ids is None:
        return causal
    same = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
    return causal & same


def _check_pairs(q_name: str, q: jax.Array, k_name: str, k: jax.Array, segment_ids) -> None:
    dims = checks.Dims()
    dims.check(q_name, q, "B T H K")
    dims.check(k_name, k, "B T H K")
    checks.check_floating(q_name, q)
    checks.check_floating(k_name, k)
    checks.check_segment_ids(segment_ids, *q.shape[:2])


def _check_student(student: jax.Array, teacher: jax.Array) -> None:
    if student.shape != teacher.shape:
        message = f"expected the teacher's shape {teacher.shape}, got {student.shape}"
        raise ValueError(f"student: {message}")


def softmax_attention_weights(
    q: jax.Array, k: jax.Array, *, scale: float | None = None, segment_ids: jax.Array | None = None
) -> jax.Array:
    """The teacher's `a: [B, H, T, T]` float32 (module docstring); `scale=None` is `K^-1/2`."""
    _check_pairs("q", q, "k", k, segment_ids)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = scale * jnp.einsum("bihk,bjhk->bhij", q.astype(jnp.float32), k.astype(jnp.float32))
    visible = visible_pairs(q.shape[1], segment_ids)
    return jax.nn.softmax(jnp.where(visible, scores, -jnp.inf), axis=-1)


def linear_attention_weights(
    phi_q: jax.Array, phi_k: jax.Array, *, segment_ids: jax.Array | None = None
) -> jax.Array:
    """The student's `â: [B, H, T, T]` float32 from positive features (module docstring)."""
    _check_pairs("phi_q", phi_q, "phi_k", phi_k, segment_ids)
    products = jnp.einsum("bihf,bjhf->bhij", phi_q.astype(jnp.float32), phi_k.astype(jnp.float32))
    products = jnp.where(visible_pairs(phi_q.shape[1], segment_ids), products, 0.0)
    return products / jnp.sum(products, axis=-1, keepdims=True)


def attention_cross_entropy(
    teacher: jax.Array, student: jax.Array, *, floor: float = 1e-12
) -> jax.Array:
    """Hedgehog's `L_CE`: `mean_{b,h,i} -sum_j a_ij log max(â_ij, floor)` of weights
    `[B, H, T, T]` (teacher `a`, student `â`)."""
    checks.Dims().check("teacher", teacher, "B H T S")
    _check_student(student, teacher)
    log_student = jnp.log(jnp.maximum(student.astype(jnp.float32), floor))
    return jnp.mean(-jnp.sum(teacher.astype(jnp.float32) * log_student, axis=-1))


def output_mse(
    student: jax.Array, teacher: jax.Array, *, scale: float = LOLCATS_MSE_SCALE
) -> jax.Array:
    """LoLCATs' `L_MSE`: `scale * mean((student - teacher)^2)` over every element."""
    _check_student(student, teacher)
    error = student.astype(jnp.float32) - teacher.astype(jnp.float32)
    return scale * jnp.mean(error**2)


class Call(NamedTuple):
    """One call of a submodule: its positional `inputs`, `keywords` and `output`."""

    inputs: tuple
    keywords: dict[str, Any]
    output: Any


def capture_calls(fn: Callable[[], Any], names: Collection[str]) -> tuple[Any, dict[str, Call]]:
    """Runs `fn()` (e.g. `lambda: model.apply(variables, tokens)`) and records each `__call__`
    of a submodule named in `names`, keyed by the module's '/'-joined path
    (`backbone/groups_0/block_0/mixer`). Returns `(fn's result, calls)`; the records are traced
    values of the same computation, so gradients flow through them."""
    calls: dict[str, Call] = {}

    def record(next_fun, args, kwargs, context):
        output = next_fun(*args, **kwargs)
        module = context.module
        if context.method_name == "__call__" and module.name in names:
            calls["/".join(module.path)] = Call(tuple(args), dict(kwargs), output)
        return output

    with nn.intercept_methods(record):
        result = fn()
    return result, calls


def transfer_parameters(source: Any, target: Any) -> Any:
    """`target`'s tree with `source`'s value wherever the two have a parameter at the same path
    (a softmax model's parameters loaded into its linearized form, whose new parameters keep
    their initialization). A shared path whose shapes differ is a ValueError naming `source`."""
    values = {path_name(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(source)}

    def take(path, leaf):
        name = path_name(path)
        if name not in values:
            return leaf
        if jnp.shape(values[name]) != jnp.shape(leaf):
            raise ValueError(
                f"source: {name!r} has shape {jnp.shape(values[name])}, the target's "
                f"{jnp.shape(leaf)}"
            )
        return values[name]

    return jax.tree_util.tree_map_with_path(take, target)


__all__ = [
    "LOLCATS_MSE_SCALE",
    "Call",
    "attention_cross_entropy",
    "capture_calls",
    "linear_attention_weights",
    "output_mse",
    "softmax_attention_weights",
    "transfer_parameters",
    "visible_pairs",
]
