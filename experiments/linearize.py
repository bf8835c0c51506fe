"""Study 9: linearizing a softmax transformer. A trained softmax-attention language model is
converted into a linear-time one by four methods with the same fine-tuning budget, and each
student's held-out perplexity is compared with the teacher's.

    python -m experiments.linearize [--config=configs/studies/linearize.py:quick] [--seeds=0,1,2]

Protocol (PAPERS.md B.1.9, "small checks"). The teacher is a byte-level transformer
(`num_layers` blocks of RoPE softmax attention and SwiGLU, `seqjax.models`) trained from
scratch on the Python standard library's source (`stdlib_text`, train split, documents packed
into rows of `length` bytes). Each method keeps every teacher parameter (the linearized layers
keep attention's q, k, v, o; `seqjax.train.distill.transfer_parameters`) and then trains for
`finetune_steps` steps of `batch_size` rows of `length` bytes, the same bytes in the same
order for every method:

- `elu_swap`: the naive swap, normalized linear attention of `elu(x) + 1` of the same rotated
  queries and keys (`Hedgehog` with `feature_map="elu_plus_one"`, no new parameters), then
  LoRA fine-tuning on the language-modelling loss for all the steps;
- `hedgehog`: learned Hedgehog maps (`seqjax.nn.linearized_attention.Hedgehog`), first
  trained alone (`distill_fraction` of the steps) to match the teacher's attention weights
  with Hedgehog's per-row cross-entropy, then LoRA for the rest;
- `lolcats`: the same maps plus sliding-window softmax attention over `window` tokens with a
  learned per-head factor (`LoLCATs`); first the maps and window factors are trained alone
  on LoLCATs' attention transfer (MSE x 1000 of each head's attention output before the
  output projection), then LoRA;
- `liger`: no new parameters (`Liger`: gated linear attention from the softmaxed q and k with
  a gate from the key projection, averaged with sliding-window attention), LoRA for all the
  steps.

Attention transfer fits each layer independently on the teacher's own input to that layer
(`seqjax.train.distill.capture_calls`); the per-layer losses are averaged, as in LoLCATs'
trainer, and everything but the maps and window factors is frozen (`optimizer(frozen=...)`).
LoRA (`seqjax.train.lora`, rank `lora_rank`, alpha `lora_alpha`) adapts the q, k, v and o
kernels of every layer, and nothing else is trained. Both stages are AdamW without weight
decay, 10% warmup then cosine decay, clipping at norm 1.

Perplexity is `exp` of the mean cross-entropy per byte over `eval_batches` held-out batches of
the validation split, the same bytes for every model; `converted_perplexity` is before the
language-model fine-tuning (after attention transfer for the two-stage methods), `perplexity`
after it, `gap` the final perplexity minus the teacher's, `trainable_params` what each
method trains (the teacher: all its parameters, from scratch). The papers expect the gap
ordering LoLCATs ~ Liger < Hedgehog < naive swap; the verdict reads it from the gaps.
"""

from __future__ import annotations

import copy
import functools
import math
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from experiments.study import Study, Summary, beats, check_choices, fail, main, train_config
from seqjax.models import MIXERS, build
from seqjax.nn.layers import rotary
from seqjax.train import distill
from seqjax.train.config import validate as validate_train
from seqjax.train.loop import data_stream, evaluate, fit, model_config, sources
from seqjax.train.lora import init_lora, merge_lora
from seqjax.train.optimizer import optimizer
from seqjax.train.step import eval_sums, forward, token_sums

# name -> (mixer of `seqjax.models.MIXERS`, options that make the method, attention-transfer
# loss or None when the method has no such stage).
METHODS: dict[str, tuple[str, dict, str | None]] = {
    "elu_swap": ("hedgehog", {"feature_map": "elu_plus_one"}, None),
    "hedgehog": ("hedgehog", {}, "attention_cross_entropy"),
    "lolcats": ("lolcats", {}, "output_mse"),
    "liger": ("liger", {}, None),
}
TEACHER = "teacher"
# The smallest difference of two perplexity gaps that the verdict calls a difference, as a
# fraction of the teacher's perplexity (0.05 at the default size, where the teacher's own
# perplexity is 5.36 +- 0.11 over seeds); with several seeds, `beats` also asks for more than
# twice the standard error of the difference.
GAP_MARGIN = 0.01
LABELS = {
    TEACHER: "softmax teacher",
    "elu_swap": "(i) elu+1 swap",
    "hedgehog": "(ii) Hedgehog",
    "lolcats": "(iii) LoLCATs",
    "liger": "(iv) Liger",
}
# What attention transfer leaves as it is: everything but the feature maps and window factors.
FROZEN_IN_TRANSFER = (r"^backbone/embed/", r"^head/", r"norm/", r"/mlp/", r"/mixer/(q|k|v|o)/")
# LoRA's kernels: q, k, v `[D, H, K]` (one input axis) and o `[H, K, D]` (two).
LORA_TARGETS = {r"/mixer/(q|k|v)/kernel$": 1, r"/mixer/o/kernel$": 2}
MIXER_PATH = "backbone/groups_{}/block_0/mixer"  # layer i's mixer in an unscanned model


def teacher_config(config: ml_collections.ConfigDict, seed: int) -> ml_collections.ConfigDict:
    """The teacher's `seqjax.train` config: the stdlib corpus packed into rows, its train split
    for training and its validation split for every evaluation."""
    training = train_config(
        task="stdlib_text",
        options={},
        length=config.length,
        layers=("attention",) * config.num_layers,
        mixer_options={"attention": {"num_heads": config.num_heads}},
        width=config.width,
        steps=config.teacher_steps,
        batch_size=config.batch_size,
        learning_rate=config.teacher_learning_rate,
        seed=seed,
        scan_layers=False,  # LoRA and the captures address each layer by its path
    )
    # The corpus has no generator seed: its split is its only option.
    training.data.options = {"split": "train"}
    training.data.eval_options = {"split": "validation"}
    training.data.packing = "pack"
    training.train.eval_batches = config.eval_batches
    return training


def student_config(
    config: ml_collections.ConfigDict, teacher: ml_collections.ConfigDict, method: str
) -> ml_collections.ConfigDict:
    """The teacher's config with every attention layer replaced by `method`'s mixer."""
    mixer, options, _ = METHODS[method]
    fields = {"num_heads": config.num_heads}
    if mixer in ("lolcats", "liger"):
        fields["window"] = config.window
    if mixer in ("hedgehog", "lolcats"):
        fields["feature_dim"] = config.feature_dim
    student = copy.deepcopy(teacher)
    student.model.layers = (mixer,) * config.num_layers
    student.model.mixer_options = {mixer: {**fields, **options}}
    return student


def build_model(training: ml_collections.ConfigDict):
    """The byte-level language model of a `seqjax.train` config."""
    return build(model_config(training, 256))


def count(tree: Any) -> int:
    """The number of values in a tree of arrays."""
    return int(sum(np.size(leaf) for leaf in jax.tree.leaves(tree)))


def batches(training: ml_collections.ConfigDict, seed: int) -> Iterator[dict[str, jax.Array]]:
    """The corpus's training batches in the order of `seed`."""
    ordered = copy.deepcopy(training)
    ordered.data.seed = seed
    for batch in data_stream(ordered, sources(ordered)[0], shuffle=True):
        yield {key: jnp.asarray(value) for key, value in batch.items()}


def language_model_loss(model, params, batch) -> jax.Array:
    """Mean cross-entropy per supervised byte (the train step's loss)."""
    logits, _ = forward(model, params, batch)
    sums = token_sums(logits, batch)
    return sums["loss"] / jnp.maximum(sums["count"], 1)


def perplexity(training: ml_collections.ConfigDict, model) -> Callable[[Any], float]:
    """`params -> exp` of the held-out loss per byte of `model`, on the batches and by the
    evaluation of the training loop (one compiled step for all the calls)."""
    step = jax.jit(functools.partial(eval_sums, model=model))
    held_out = sources(training)[1]
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return lambda params: math.exp(evaluate(step, params, training, held_out, device)["loss"])


def train(
    loss: Callable,
    trainable: Any,
    fixed: Any,
    data: Iterator,
    steps: int,
    learning_rate: float,
    frozen: tuple[str, ...] = (),
) -> Any:
    """`steps` steps of `seqjax.train.optimizer.optimizer` (no weight decay, a tenth of the
    steps of warmup, cosine decay) on `loss(trainable, fixed, batch)`, nothing trained where
    `frozen` matches; returns the trained `trainable`."""
    tx = optimizer(
        learning_rate=learning_rate,
        weight_decay=0.0,
        warmup_steps=steps // 10,
        total_steps=steps,
        frozen=frozen,
    )

    @jax.jit
    def step(trainable, fixed, state, batch):
        grads = jax.grad(loss)(trainable, fixed, batch)
        updates, state = tx.update(grads, state, trainable)
        return optax.apply_updates(trainable, updates), state

    state = tx.init(trainable)
    for _ in range(steps):
        trainable, state = step(trainable, fixed, state, next(data))
    return trainable


def layer_calls(layer: nn.Module, params, x, keywords: dict) -> dict:
    """The calls of a student layer's feature maps and output projection on input `x`."""

    def apply():
        return layer.apply(
            {"params": params},
            x,
            segment_ids=keywords["segment_ids"],
            positions=keywords["positions"],
        )

    return distill.capture_calls(apply, {"phi_q", "phi_k", "o"})[1]


def transfer_loss(teacher_model, student_model, kind: str) -> Callable:
    """Attention transfer, `(student params, teacher params, batch) -> loss`: the mean over
    layers of `kind` (Hedgehog's "attention_cross_entropy" of the attention weights, or
    LoLCATs' "output_mse" of the heads' outputs before W_o), each student layer on the
    teacher's input to that layer (`seqjax.train.distill`)."""
    specs = teacher_model.config.layer_specs()
    name, mixer = student_model.config.layer_specs()[0]
    layer = MIXERS[name][1](mixer)

    def loss(student, teacher, batch):
        _, calls = distill.capture_calls(
            lambda: teacher_model.apply(
                {"params": teacher},
                batch["inputs"],
                segment_ids=batch["segment_ids"],
                positions=batch["positions"],
            ),
            {"mixer", "q", "k", "o"},
        )
        calls = jax.lax.stop_gradient(calls)
        losses = []
        for index, (_, attention) in enumerate(specs):
            path = MIXER_PATH.format(index)
            x, keywords = calls[path].inputs[0], calls[path].keywords
            params = student["backbone"][f"groups_{index}"]["block_0"]["mixer"]
            own = layer_calls(layer, params, x, keywords)
            if kind == "output_mse":
                teacher_heads = calls[f"{path}/o"].inputs[0]
                losses.append(distill.output_mse(own["o"].inputs[0], teacher_heads))
                continue
            positions, segment_ids = keywords["positions"], keywords["segment_ids"]
            q, k = (
                rotary(calls[f"{path}/{n}"].output, positions, attention.rope_base) for n in "qk"
            )
            a = distill.softmax_attention_weights(q, k, segment_ids=segment_ids)
            a_hat = distill.linear_attention_weights(
                own["phi_q"].output, own["phi_k"].output, segment_ids=segment_ids
            )
            losses.append(distill.attention_cross_entropy(a, a_hat))
        return sum(losses) / len(losses)

    return loss


def convert(
    config: ml_collections.ConfigDict,
    teacher: ml_collections.ConfigDict,
    teacher_params: Any,
    method: str,
    seed: int,
) -> dict:
    """One method's student: the teacher's parameters in its layers, attention transfer (if
    the method has it), then LoRA; its perplexities and what it trained."""
    training = student_config(config, teacher, method)
    model = build_model(training)
    evaluate = perplexity(training, model)
    init_key, lora_key = jax.random.split(jax.random.key(seed))
    # The same bytes in the same order for every method, stage 1 reading the first of them.
    data = batches(training, seed + 1)
    # A method without attention transfer adds no parameter: its layers run on the teacher's.
    params, lora_steps, trained = teacher_params, config.finetune_steps, 0
    kind = METHODS[method][2]
    if kind is not None:
        tokens = jnp.zeros((1, config.length), jnp.int32)
        fresh = jax.jit(model.init)(init_key, tokens)["params"]
        params = distill.transfer_parameters(teacher_params, nn.unbox(fresh))
        distill_steps = round(config.distill_fraction * config.finetune_steps)
        loss = transfer_loss(build_model(teacher), model, kind)
        rate = config.distill_learning_rate
        params = train(loss, params, teacher_params, data, distill_steps, rate, FROZEN_IN_TRANSFER)
        # What transfer trains is what the method adds: the maps and the window factors.
        trained = count(params) - count(teacher_params)
        lora_steps -= distill_steps
    converted = evaluate(params)
    alpha = config.lora_alpha
    adapters = init_lora(lora_key, params, targets=LORA_TARGETS, rank=config.lora_rank)

    def lora_loss(adapters, params, batch):
        return language_model_loss(model, merge_lora(params, adapters, alpha=alpha), batch)

    adapters = train(lora_loss, adapters, params, data, lora_steps, config.lora_learning_rate)
    final = evaluate(merge_lora(params, adapters, alpha=alpha))
    return dict(
        converted_perplexity=converted, perplexity=final, trainable_params=trained + count(adapters)
    )


def run(config: ml_collections.ConfigDict, seed: int) -> tuple[list[dict], str]:
    """Trains the teacher with `seed`, converts it by every method; one row per model."""
    teacher = teacher_config(config, seed)
    with tempfile.TemporaryDirectory() as scratch:
        state, summary = fit(teacher, scratch)
    teacher_perplexity = math.exp(summary["eval"]["loss"])
    rows = [
        dict(
            method=TEACHER,
            perplexity=teacher_perplexity,
            gap=0.0,
            converted_perplexity=teacher_perplexity,
            trainable_params=count(state.params),
        )
    ]
    for method in config.methods:
        row = convert(config, teacher, state.params, method, seed)
        rows.append(dict(method=method, gap=row["perplexity"] - teacher_perplexity, **row))
    return rows, summary["data"]["content_hash"]


def validate(config: ml_collections.ConfigDict) -> None:
    """Unknown methods, impossible sizes and budgets fail before any training."""
    check_choices("methods", config.methods, tuple(METHODS))
    for field in (
        "width",
        "num_layers",
        "num_heads",
        "length",
        "batch_size",
        "teacher_steps",
        "finetune_steps",
        "lora_rank",
        "window",
        "feature_dim",
        "eval_batches",
    ):
        value = config[field]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            fail(field, f"expected a positive integer, got {value!r}")
    if config.width % config.num_heads:
        fail("num_heads", f"{config.num_heads} heads do not divide width = {config.width}")
    if config.lora_rank > config.width:
        fail("lora_rank", f"expected at most width = {config.width}, got {config.lora_rank}")
    for field in ("teacher_learning_rate", "distill_learning_rate", "lora_learning_rate"):
        if not config[field] > 0:
            fail(field, f"expected a positive learning rate, got {config[field]!r}")
    if not config.lora_alpha > 0:
        fail("lora_alpha", f"expected a positive scale, got {config.lora_alpha!r}")
    two_stage = [m for m in config.methods if METHODS[m][2] is not None]
    distill_steps = round(config.distill_fraction * config.finetune_steps)
    if two_stage and not 1 <= distill_steps < config.finetune_steps:
        fail(
            "distill_fraction",
            f"{config.distill_fraction} of finetune_steps = {config.finetune_steps} leaves "
            f"{distill_steps} transfer steps; {two_stage} need at least one step of each stage",
        )
    teacher = teacher_config(config, seed=0)
    validate_train(teacher)
    for training in [teacher] + [student_config(config, teacher, m) for m in config.methods]:
        try:
            build_model(training)
        except ValueError as error:
            raise ValueError(str(error).replace("config.model.", "config.", 1)) from None


def plot(summary: Summary, figure) -> None:
    """Held-out perplexity of each model, right after the conversion and after fine-tuning,
    with the teacher's as a line."""
    ax = figure.subplots()
    rows = [r for r in summary.rows if r["method"] != TEACHER]
    positions = np.arange(len(rows))
    for offset, metric, label in (
        (-0.2, "converted_perplexity", "converted (before LoRA)"),
        (0.2, "perplexity", "after LoRA fine-tuning"),
    ):
        means = [r[metric][0] for r in rows]
        spread = [r[metric][1] for r in rows]
        ax.bar(positions + offset, means, 0.4, yerr=spread, capsize=2, label=label)
    teacher = [r for r in summary.rows if r["method"] == TEACHER]
    if teacher:
        ax.axhline(
            teacher[0]["perplexity"][0], color="black", linestyle="--", label=LABELS[TEACHER]
        )
    ax.set_xticks(positions, [LABELS[r["method"]] for r in rows])
    ax.set(yscale="log", ylabel="held-out perplexity per byte")
    ax.legend(fontsize="small")


def verdict(summary: Summary) -> str:
    """Whether the gaps to the teacher order as the papers expect: (iii) LoLCATs ~ (iv) Liger
    < (ii) Hedgehog < (i) the elu+1 swap. "<" holds when the smaller gap is smaller by more
    than noise (`experiments.study.beats`, with a margin of `GAP_MARGIN` of the teacher's
    perplexity); "~" holds when LoLCATs and Liger are closer to each other than the worse of
    them is to Hedgehog."""
    summaries = {m: r["gap"] for r in summary.rows if (m := r["method"]) in METHODS}
    gaps = {m: value[0] for m, value in summaries.items()}
    listing = ", ".join(f"{LABELS[m]} {gaps[m]:+.3f}" for m in METHODS if m in gaps)
    if set(gaps) != set(METHODS):
        return f"not all four methods were run, so the ordering is not tested (gaps: {listing})."
    margin = GAP_MARGIN * summary.value("perplexity", method=TEACHER)
    comparisons = (("hedgehog", "elu_swap"), ("lolcats", "hedgehog"), ("liger", "hedgehog"))
    holds = [beats(summaries[worse], summaries[better], margin) for better, worse in comparisons]
    worst_hybrid = max(gaps["lolcats"], gaps["liger"])
    close = abs(gaps["lolcats"] - gaps["liger"]) < gaps["hedgehog"] - worst_hybrid
    parts = [
        f"{LABELS[b]} {'<' if ok else '>='} {LABELS[w]}"
        for (b, w), ok in zip(comparisons, holds, strict=True)
    ]
    parts.append(f"LoLCATs and Liger {'are' if close else 'are not'} close")
    if all(holds) and close:
        overall = "the papers' ordering (iii) ~ (iv) < (ii) < (i) reproduces"
    elif all(holds):
        overall = "the papers' strict ordering (iii), (iv) < (ii) < (i) reproduces, but not ~"
    elif any(holds):
        overall = f"the papers' ordering reproduces in part ({sum(holds)} of 3 strict comparisons)"
    else:
        overall = "the papers' ordering does NOT reproduce"
    return f"{overall}: " + "; ".join(parts) + f" (perplexity gaps to the teacher: {listing})."


STUDY = Study(
    number=9,
    name="linearize",
    title="Linearizing a softmax transformer",
    claim=(
        "Hedgehog (Zhang et al., 2024), LoLCATs (Zhang et al., 2025) and Liger (Lan et al., "
        "2025): converting a pretrained softmax transformer into linear attention recovers "
        "most of its quality with little fine-tuning when the linear layer is fitted to the "
        "softmax one; with the same budget, LoLCATs' hybrid (learned maps plus a softmax "
        "window, attention transfer then LoRA) and Liger (gated linear attention from the "
        "attention's own projections plus a window, LoRA only) close more of the perplexity "
        "gap than Hedgehog's learned maps alone, which close more than a naive elu+1 swap."
    ),
    keys=("method",),
    metrics=("perplexity", "gap", "converted_perplexity", "trainable_params"),
    run=run,
    validate=validate,
    plot=plot,
    verdict=verdict,
)

if __name__ == "__main__":
    main(STUDY)
