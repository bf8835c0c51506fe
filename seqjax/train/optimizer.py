"""The optimizer: clipping by global norm, then AdamW on a warmup-then-decay learning rate, with
weight decay only where it regularizes (`weight_decay_mask`).

    g   <- g * min(1, clip_norm / ||g||_2)                        (over all parameters at once)
    lr(t) = peak * t / W                                          t < W
    lr(t) = final + (peak - final) * s(p),  p = (t - W) / (N - W) clipped to [0, 1]
            s(p) = (1 + cos(pi p)) / 2 (cosine),  1 - p (linear),  1 (constant)
    AdamW (Loshchilov & Hutter): theta <- theta - lr(t) * (m_hat / (sqrt(v_hat) + eps)
                                                           + weight_decay * mask * theta)

with `W = warmup_steps`, `N = total_steps`, `final = final_fraction * peak`. Gradient
accumulation is the train step's (it sums micro-batch gradients before one update).

Frozen parameters (`frozen`: regular expressions searched in each parameter's '/'-joined path,
e.g. `backbone/groups_0/block_0/mixer/q/kernel`) get zero updates: no step, no weight decay,
and their gradients count neither in the clipping norm nor in Adam's moments.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any, Literal, get_args

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

Decay = Literal["cosine", "linear", "constant"]
DECAYS: tuple[str, ...] = get_args(Decay)

# `s(p)` of each decay: the fraction of the way from `final` to `peak` at progress `p`.
DECAY_SHAPES: dict[str, Callable[[jax.Array], jax.Array]] = {
    "cosine": lambda p: 0.5 * (1.0 + jnp.cos(jnp.pi * p)),
    "linear": lambda p: 1.0 - p,
    "constant": jnp.ones_like,
}

# The axis `nn.scan` adds in front of a scanned group's parameters (`seqjax.models.backbone`);
# it counts layers, not a parameter's own dimensions.
STACKED_AXIS = "layers"

# Parameters of the recurrences themselves, kept from weight decay whatever their rank.
RECURRENCE_PARAMETERS = frozenset(
    {
        "A_log",  # Mamba, Mamba-2, Gated DeltaNet, MoM: the log decay rate (with `D`, `dt_bias`)
        "D",  # Mamba, Mamba-2, S4, S4D, S5, LRU: the skip connection
        "log_dt",  # S4, S4D: the step
        "log_A_real",  # S4, S4D: the state matrix's eigenvalues
        "A_imag",
        "B",  # S4, S5, LRU: the input matrix, trained like the state matrix by their authors
        "P",  # S4: the low-rank part of the state matrix
        "Lambda_re",  # S5: the eigenvalues and the step
        "Lambda_im",
        "log_step",
        "nu_log",  # LRU: the eigenvalues and the input normalization
        "theta_log",
        "gamma_log",
        "a_param",  # RG-LRU: the eigenvalues
        "window_factor",  # LoLCATs: the per-head window/linear mixing logit
        "learnable_skip",  # mLSTM: the skip connection
    }
)
# HGRN's and HGRN2's model-level forget-gate lower-bound logits, `lower_bounds_<kind>`.
LOWER_BOUND_PREFIX = "lower_bounds_"


def _require(condition: bool, argument: str, expected: str, value: Any) -> None:
    if not condition:
        raise ValueError(f"{argument}: expected {expected}, got {value!r}")


def learning_rate_schedule(
    *,
    peak: float,
    warmup_steps: int,
    total_steps: int,
    decay: Decay = "cosine",
    final_fraction: float = 0.1,
) -> optax.Schedule:
    """Linear warmup from 0 to `peak` over `warmup_steps`, then `decay` to
    `final_fraction * peak` at `total_steps`, where it stays (`"constant"` stays at `peak`).
    The formula is in the module docstring; the step may be a traced integer."""
    _require(peak > 0, "peak", "a positive learning rate", peak)
    _require(total_steps >= 1, "total_steps", "a positive number of steps", total_steps)
    _require(
        0 <= warmup_steps <= total_steps,
        "warmup_steps",
        "0 <= warmup_steps <= total_steps",
        warmup_steps,
    )
    _require(decay in DECAYS, "decay", f"one of {list(DECAYS)}", decay)
    _require(0 <= final_fraction <= 1, "final_fraction", "a fraction in [0, 1]", final_fraction)
    final = final_fraction * peak
    shape = DECAY_SHAPES[decay]
    decay_steps = max(total_steps - warmup_steps, 1)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warmup = peak * step / max(warmup_steps, 1)
        progress = jnp.clip((step - warmup_steps) / decay_steps, 0.0, 1.0)
        return jnp.where(step < warmup_steps, warmup, final + (peak - final) * shape(progress))

    return schedule


def _decays(path: tuple[str, ...], rank: int) -> bool:
    """Whether the parameter at `path` (module names, then its own name) with `rank` axes per
    layer is weight-decayed."""
    name, modules = path[-1], path[:-1]
    if rank <= 1 or any("norm" in module for module in modules):
        return False
    if name in ("bias", "b") or name.endswith("_bias"):  # `b`: RG-LRU's block-diagonal gates
        return False
    return name not in RECURRENCE_PARAMETERS and not name.startswith(LOWER_BOUND_PREFIX)


def _key_name(key: Any) -> str:
    for attribute in ("key", "name", "idx"):
        if hasattr(key, attribute):
            return str(getattr(key, attribute))
    return str(key)


def _is_box(x: Any) -> bool:
    return isinstance(x, nn.Partitioned)


def path_name(path: tuple) -> str:
    """A tree path as its keys joined by '/': `backbone/groups_0/block_0/mixer/q/kernel`."""
    return "/".join(_key_name(key) for key in path)


def compile_patterns(patterns: Sequence[str], argument: str) -> list[re.Pattern]:
    """`patterns` (a list or tuple of strings) compiled; a ValueError naming `argument` if one
    is not a regular expression."""
    if not isinstance(patterns, list | tuple):
        raise ValueError(f"{argument}: expected a tuple of regular expressions, got {patterns!r}")
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except (re.error, TypeError) as error:
            message = f"{argument}: {pattern!r} is not a regular expression ({error})"
            raise ValueError(message) from None
    return compiled


def frozen_labels(params: Any, frozen: Sequence[str]) -> Any:
    """`"frozen"` where a regular expression of `frozen` is found in the parameter's path
    (`path_name`, `re.search`), else `"trained"`, in a tree shaped like `params` (boxes kept, as
    in `weight_decay_mask`). A pattern that is not an expression or matches no parameter is a
    ValueError naming `optimizer.frozen`."""
    leaves = jax.tree_util.tree_leaves_with_path(params, is_leaf=_is_box)
    paths = [path_name(path) for path, _ in leaves]
    matched = set()
    for expression in compile_patterns(frozen, "optimizer.frozen"):
        found = {path for path in paths if expression.search(path)}
        if not found:
            raise ValueError(
                f"optimizer.frozen: pattern {expression.pattern!r} matches no parameter; the "
                f"paths are like {paths[:3]}"
            )
        matched |= found

    def label(path, leaf):
        name = "frozen" if path_name(path) in matched else "trained"
        return leaf.replace_boxed(name) if _is_box(leaf) else name

    return jax.tree_util.tree_map_with_path(label, params, is_leaf=_is_box)


def weight_decay_mask(params: Any) -> Any:
    """True where AdamW's weight decay applies, in a tree shaped like `params` (an
    `nn.Partitioned` box becomes a box of the same names around its bool).

    A parameter is not decayed when
    - it has at most one axis per layer (a boxed parameter's `"layers"` axis, which `nn.scan`
      stacks in front, is not counted): norm scales, biases, skip and gate vectors;
    - a module on its path has `norm` in its name (multi-head norm scales are `[H, K]`);
    - it is a bias: named `bias`, `b` or `*_bias` (`dt_bias`, `conv_bias`, the RNNs' `[H, 4, K]`);
    - it is one of the recurrences' own parameters, by name (`RECURRENCE_PARAMETERS`): `A_log`
      and `D` (Mamba's `_no_weight_decay`), the eigenvalues, steps and input matrix `B` of S4,
      S5 and the LRU (their authors' no-decay SSM parameter group), RG-LRU's `a_param`, and
      HGRN's `lower_bounds_<kind>` logits.
    Everything else decays: projection and convolution kernels, feature maps, recurrent
    matrices, and the embedding and the output head. Embeddings decay as in fla's flame
    (torchtitan's AdamW) and MaxText (`optax.adamw` without a mask), which decay every
    parameter, and in nanoGPT, which decays every matrix.

    A plain array of a scanned group counts the layer axis in its rank, so the names above
    cover every per-layer vector of the mixers in `seqjax.models.MIXERS`: boxed or plain, the
    mask is the same."""

    def leaf_mask(path, leaf):
        names = tuple(_key_name(key) for key in path)
        if _is_box(leaf):
            rank = np.ndim(leaf.value) - tuple(leaf.names).count(STACKED_AXIS)
            return leaf.replace_boxed(_decays(names, rank))
        return _decays(names, np.ndim(leaf))

    return jax.tree_util.tree_map_with_path(leaf_mask, params, is_leaf=_is_box)


def optimizer(
    *,
    learning_rate: float,
    weight_decay: float,
    b1: float = 0.9,
    b2: float = 0.95,
    eps: float = 1e-8,
    clip_norm: float = 1.0,
    warmup_steps: int,
    total_steps: int,
    decay: Decay = "cosine",
    final_fraction: float = 0.1,
    frozen: Sequence[str] = (),
) -> optax.GradientTransformation:
    """Clipping by global norm to `clip_norm`, then AdamW with `learning_rate_schedule` (peak
    `learning_rate`) and decoupled weight decay `weight_decay` where `weight_decay_mask`, on
    every parameter but the `frozen` ones (`frozen_labels`), whose updates are zero. `init`
    raises a ValueError naming `optimizer.frozen` if a pattern matches no parameter."""
    _require(learning_rate > 0, "learning_rate", "a positive peak learning rate", learning_rate)
    _require(weight_decay >= 0, "weight_decay", "a non-negative rate", weight_decay)
    _require(0 <= b1 < 1, "b1", "a decay rate in [0, 1)", b1)
    _require(0 <= b2 < 1, "b2", "a decay rate in [0, 1)", b2)
    _require(eps > 0, "eps", "a positive epsilon", eps)
    _require(clip_norm > 0, "clip_norm", "a positive norm", clip_norm)
    schedule = learning_rate_schedule(
        peak=learning_rate,
        warmup_steps=warmup_steps,
        total_steps=total_steps,
        decay=decay,
        final_fraction=final_fraction,
    )
    compile_patterns(frozen, "optimizer.frozen")
    adamw = optax.chain(
        optax.clip_by_global_norm(clip_norm),
        optax.adamw(
            schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=weight_decay_mask
        ),
    )
    if not frozen:
        return adamw
    return optax.partition(
        {"trained": adamw, "frozen": optax.set_to_zero()},
        lambda params: frozen_labels(params, frozen),
    )


__all__ = [
    "DECAYS",
    "compile_patterns",
    "frozen_labels",
    "learning_rate_schedule",
    "optimizer",
    "path_name",
    "weight_decay_mask",
]
