"""The train and eval steps: token-level cross-entropy over the supervised positions.

A batch is the pipeline's dict of `[B, T]` arrays (`inputs`, `targets` with `IGNORE` where
there is no loss, `segment_ids`, `positions`; RegBench adds `valid: [B, T, V]`). The loss is
the mean over every supervised token of the whole (global) batch, so it does not depend on how
the batch is split over devices or into micro-batches:

    loss = sum_{b,t: targets != IGNORE} -log softmax(logits[b, t])[targets[b, t]] / #supervised

plus the auxiliary losses the layers sow (`"intermediates"/"aux_loss"`, MoM's load balancing),
averaged over micro-batches. Gradient accumulation runs the micro-batches in a `lax.scan`
and sums their gradients before one optimizer update, which equals one step on the full batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from seqjax.data.source import IGNORE
from seqjax.parallel import LOGICAL_RULES, batch_sharding
from seqjax.train.state import TrainState

Batch = dict[str, jax.Array]


def forward(model: nn.Module, params: Any, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """`(logits [B, T, V] float32, summed auxiliary losses)` of one batch."""
    (logits, _), variables = model.apply(
        {"params": params},
        batch["inputs"],
        segment_ids=batch.get("segment_ids"),
        positions=batch.get("positions"),
        mutable=["intermediates"],
    )
    aux = [
        jnp.sum(value)
        for path, value in jax.tree_util.tree_leaves_with_path(variables)
        if any(getattr(key, "key", None) == "aux_loss" for key in path)
    ]
    return logits, sum(aux, jnp.zeros((), jnp.float32))


def token_losses(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`(losses [B, T], supervised [B, T])` from `logits: [B, T, V]` and `targets: [B, T]`:
    the cross-entropy of each token, 0 where `targets` is `IGNORE`."""
    supervised = targets != IGNORE
    losses = optax.softmax_cross_entropy_with_integer_labels(
        logits, jnp.where(supervised, targets, 0)
    )
    return jnp.where(supervised, losses, 0.0), supervised


def token_sums(logits: jax.Array, batch: Batch) -> dict[str, jax.Array]:
    """Sums over the supervised tokens: cross-entropy, correct argmax, count, and (when the
    batch has `valid: [B, T, V]`) the argmax predictions that are a valid continuation."""
    targets = batch["targets"]
    losses, supervised = token_losses(logits, targets)
    predictions = jnp.argmax(logits, axis=-1)
    sums = {
        "loss": jnp.sum(losses),
        "correct": jnp.sum(supervised & (predictions == targets)),
        "count": jnp.sum(supervised),
    }
    if "valid" in batch:
        valid = jnp.take_along_axis(batch["valid"], predictions[..., None], axis=-1)[..., 0]
        sums["valid"] = jnp.sum(supervised & valid)
    return sums


def micro_batches(batch: Batch, count: int) -> Batch:
    """`[B, ...] -> [count, B / count, ...]`, micro-batch `a` holding rows `a, a + count, ...`:
    each device's contiguous block of rows splits evenly, so no data moves between devices."""

    def split(x):
        rows = x.shape[0] // count
        return jnp.swapaxes(x.reshape(rows, count, *x.shape[1:]), 0, 1)

    return jax.tree.map(split, batch)


def train_step(
    state: TrainState,
    batch: Batch,
    *,
    model: nn.Module,
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule,
    accumulation_steps: int,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer update on `batch`, its gradient accumulated over `accumulation_steps`
    micro-batches; returns the new state and the step's metrics."""
    count = jnp.maximum(jnp.sum(batch["targets"] != IGNORE), 1)

    def micro_step(grads, micro):
        def objective(params):
            logits, aux = forward(model, params, micro)
            sums = token_sums(logits, micro)
            return sums["loss"] / count + aux / accumulation_steps, (sums, aux)

        (_, (sums, aux)), micro_grads = jax.value_and_grad(objective, has_aux=True)(state.params)
        return jax.tree.map(jnp.add, grads, micro_grads), (sums, aux)

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    grads, (sums, aux) = jax.lax.scan(micro_step, zeros, micro_batches(batch, accumulation_steps))
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss": jnp.sum(sums["loss"]) / count,
        "accuracy": jnp.sum(sums["correct"]) / count,
        "aux_loss": jnp.mean(aux),
        "grad_norm": optax.tree.norm(grads),
        "learning_rate": schedule(state.step),
        "supervised_tokens": jnp.sum(sums["count"]),
    }
    return TrainState(state.step + 1, params, opt_state), metrics


def eval_sums(params: Any, batch: Batch, *, model: nn.Module) -> dict[str, jax.Array]:
    """`token_sums` of one eval batch (summed over batches, then divided by `count`)."""
    logits, _ = forward(model, params, batch)
    return token_sums(logits, batch)


def compile_steps(
    model: nn.Module,
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule,
    mesh: Mesh,
    state_shardings: TrainState,
    *,
    accumulation_steps: int = 1,
) -> tuple[Callable, Callable]:
    """`(train, evaluate)`: the steps jitted over `mesh` with explicit shardings (state as
    `state_shardings`, batches split over the data axes, metrics replicated), the state
    donated. They trace under the mesh and the logical axis rules, so the modules' activation
    constraints apply."""
    replicated = NamedSharding(mesh, PartitionSpec())
    data = batch_sharding(mesh)

    def under_mesh(jitted):
        # Traced on the first call, inside the mesh and the rules: the modules' logical
        # activation constraints then resolve to this mesh's axes.
        def call(*args):
            with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
                return jitted(*args)

        return call

    def train(state, batch):
        return train_step(
            state,
            batch,
            model=model,
            optimizer=optimizer,
            schedule=schedule,
            accumulation_steps=accumulation_steps,
        )

    def evaluate(params, batch):
        return eval_sums(params, batch, model=model)

    train = jax.jit(
        train,
        in_shardings=(state_shardings, data),
        out_shardings=(state_shardings, replicated),
        donate_argnums=0,
    )
    evaluate = jax.jit(
        evaluate, in_shardings=(state_shardings.params, data), out_shardings=replicated
    )
    return under_mesh(train), under_mesh(evaluate)
