"""Study 6: in-context language learning (RegBench). Which architectures infer a regular
language from a prompt of its strings, and do n-gram heads close the gap?

    python -m experiments.regbench [--config=configs/studies/regbench.py:quick] [--seeds=0,1,2]

Protocol (Akyürek, Wang, Kim and Andreas, "In-Context Language Learning: Architectures and
Algorithms", ICML 2024; the generator and metric of berlino/seq_icl, `seqjax.data.regbench`):
each prompt is 10-19 strings of a random DFA (4-12 states, alphabet of 4-18 of 18 letters,
out-degree 1-3) joined by "|"; a language model over the 20 tokens is trained with next-token
cross-entropy on prompts of `num_dfas` training automata (one prompt each, as the reference's
fixed dataset, repeated for `train_steps` steps: AdamW, warmup and cosine decay), then scored on
`eval_examples` prompts of held-out automata (the "test" split: automata whose minimal form
differs from every training one). The score is validity: the fraction of letter positions
where the greedy (argmax) next token, given the true prefix, is a letter the automaton allows
from the current state ("|" targets are not scored); accuracy (the argmax equals the sampled
next letter) is reported beside it. Rows longer than `length` tokens are cut (`packing="pad"`).

Models: `depth` layers of one mixer at `width` (`MODELS`: softmax attention with RoPE, linear
attention, GLA, DeltaNet, SSD (Mamba-2), LSTM), each without and with n-gram heads
(`seqjax.nn.ngram`: one layer of heads of orders `ngram_orders`, placed first, where its
inputs are the token embeddings). The paper tunes each architecture by a grid search; one
shared size is used here. The registry has no plain linear-attention layer: linear attention
is seqjax's Based layer without its window (normalized linear attention with the Taylor map of
exp), where the paper's is unnormalized with the identity map.
"""

from __future__ import annotations

import math

import ml_collections
import numpy as np

from experiments.study import (
    Study,
    Summary,
    beats,
    check_choices,
    fail,
    fit_and_evaluate,
    main,
    train_config,
)

# The study's model names and the registry mixer each one is.
MODELS = {
    "attention": "attention",
    "linear_attention": "based",
    "gla": "gla",
    "delta_net": "delta_net",
    "ssd": "mamba2",
    "lstm": "lstm",
}
VOCAB_SIZE = 20  # 18 letters, "|" and the pad


def layers(config: ml_collections.ConfigDict, model: str, ngram_heads: bool) -> tuple[str, ...]:
    """The model's layers: `depth` of its mixer, after one n-gram layer when `ngram_heads`."""
    return ("ngram",) * ngram_heads + (MODELS[model],) * config.depth


def mixer_options(config: ml_collections.ConfigDict) -> dict:
    """`config.mixer_options` (every model gets all of them, so that the model config checks
    them all) and the n-gram heads' orders."""
    options = {name: dict(value) for name, value in config.mixer_options.items()}
    options["ngram"] = {**options.get("ngram", {}), "orders": tuple(config.ngram_orders)}
    return options


def model_train_config(
    config: ml_collections.ConfigDict, model: str, ngram_heads: bool, seed: int
) -> ml_collections.ConfigDict:
    """The `seqjax.train` config of one model: RegBench train automata in, test split out."""
    heldout = {"num_heldout_dfas": config.num_heldout_dfas}
    train = train_config(
        task="regbench",
        options={"num_dfas": config.num_dfas, "num_examples": config.num_dfas, **heldout},
        # The same generator seed: the held-out automata are those the train split excludes.
        eval_options={"seed": seed, "split": "test", "num_examples": config.eval_examples},
        length=config.length,
        layers=layers(config, model, ngram_heads),
        mixer_options=mixer_options(config),
        width=config.width,
        steps=config.train_steps,
        batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        seed=seed,
    )
    train.data.packing = "pad"
    train.optimizer.warmup_steps = config.train_steps // 10  # the reference's 10% warmup
    train.optimizer.weight_decay = config.weight_decay
    train.train.eval_batches = math.ceil(config.eval_examples / config.batch_size)
    return train


def run(config: ml_collections.ConfigDict, seed: int) -> tuple[list[dict], None]:
    rows = []
    for model in config.models:
        for ngram_heads in config.ngram_heads:
            train = model_train_config(config, model, ngram_heads, seed)
            # The loop's final evaluation is on the test split (`data.eval_options`).
            _, summary = fit_and_evaluate(train, {})
            rows.append(
                dict(
                    model=model,
                    ngram_heads=ngram_heads,
                    validity=summary["eval"]["validity"],
                    accuracy=summary["eval"]["accuracy"],
                )
            )
            print(f"regbench: {model} ngram_heads={ngram_heads}: {rows[-1]}")
    return rows, None


def validate(config: ml_collections.ConfigDict) -> None:
    from seqjax.data.regbench import RegBench
    from seqjax.models import LanguageModelConfig

    check_choices("models", config.models, tuple(MODELS))
    if not config.models:
        fail("models", "expected at least one model")
    if not config.ngram_heads or any(not isinstance(v, bool) for v in config.ngram_heads):
        fail("ngram_heads", f"expected a non-empty tuple of bools, got {config.ngram_heads}")
    for field in (
        "width",
        "depth",
        "length",
        "batch_size",
        "train_steps",
        "num_dfas",
        "eval_examples",
    ):
        if not isinstance(config[field], int) or config[field] < 1:
            fail(field, f"expected a positive integer, got {config[field]!r}")
    if not config.learning_rate > 0:
        fail("learning_rate", f"expected > 0, got {config.learning_rate}")
    if config.length < 2:
        fail("length", f"a prompt needs at least 2 tokens, got {config.length}")
    if config.num_heldout_dfas < 2:
        fail("num_heldout_dfas", "expected at least 2 (the test and validation splits)")
    mixers = (*MODELS.values(), "ngram")
    check_choices("mixer_options", tuple(config.mixer_options), mixers)
    for model in config.models:
        for ngram_heads in config.ngram_heads:
            try:
                LanguageModelConfig(
                    vocab_size=VOCAB_SIZE,
                    width=config.width,
                    layers=layers(config, model, ngram_heads),
                    mixer_options=mixer_options(config),
                )
            except ValueError as error:
                raise ValueError(f"config.{error}") from None
    RegBench(num_dfas=config.num_dfas, num_heldout_dfas=config.num_heldout_dfas)


def plot(summary: Summary, figure) -> None:
    ax = figure.subplots()
    models = [m for m in MODELS if any(r["model"] == m for r in summary.rows)]
    variants = sorted({r["ngram_heads"] for r in summary.rows})
    width = 0.8 / len(variants)
    for i, ngram_heads in enumerate(variants):
        rows = {r["model"]: r for r in summary.rows if r["ngram_heads"] == ngram_heads}
        means = [rows[m]["validity"][0] if m in rows else np.nan for m in models]
        spread = [rows[m]["validity"][1] if m in rows else 0.0 for m in models]
        positions = np.arange(len(models)) + (i - (len(variants) - 1) / 2) * width
        label = "with n-gram heads" if ngram_heads else "without"
        ax.bar(positions, means, width, yerr=spread, capsize=2, label=label)
    ax.set_xticks(np.arange(len(models)), models, rotation=20)
    ax.set(ylabel="validity (held-out DFAs)", ylim=(0, 1), title="RegBench")
    ax.legend()


def verdict(summary: Summary) -> str:
    """Whether attention beats every recurrent model (without n-gram heads), and whether the
    heads raise the recurrent models' validity, from the means over seeds; a difference within
    noise (`experiments.study.beats`) counts as none."""
    summaries = {(r["model"], r["ngram_heads"]): r["validity"] for r in summary.rows}
    validity = {key: value[0] for key, value in summaries.items()}
    recurrent = [m for m in MODELS if m != "attention" and (m, False) in validity]
    parts = []
    if ("attention", False) in validity and recurrent:
        attention = validity["attention", False]
        best = max(recurrent, key=lambda m: validity[m, False])
        beaten = [m for m in recurrent if beats(summaries["attention", False], summaries[m, False])]
        outcome = "reproduces" if len(beaten) == len(recurrent) else "does NOT reproduce"
        parts.append(
            f"attention ({attention:.3f}) beats {len(beaten)} of {len(recurrent)} recurrent "
            f"models (best: {best}, {validity[best, False]:.3f}): the paper's ordering {outcome}"
        )
    else:
        parts.append("attention vs recurrent models: not measured")
    gains = {m: validity[m, True] - validity[m, False] for m in recurrent if (m, True) in validity}
    if gains:
        helped = [m for m in gains if beats(summaries[m, True], summaries[m, False])]
        outcome = "reproduces" if len(helped) == len(gains) else "does NOT reproduce"
        listed = ", ".join(f"{m} {gain:+.3f}" for m, gain in gains.items())
        parts.append(
            f"n-gram heads raise validity for {len(helped)} of {len(gains)} recurrent models "
            f"({listed}): the paper's direction {outcome}"
        )
    else:
        parts.append("n-gram heads on recurrent models: not measured")
    return "; ".join(parts) + "."


STUDY = Study(
    number=6,
    name="regbench",
    title="In-context language learning (RegBench)",
    claim=(
        "Akyürek et al. (2024): on in-context learning of regular languages from random DFAs, "
        "Transformers significantly outperform recurrent and convolutional models (greedy "
        "next-token validity on held-out automata); the gap is explained by n-gram heads, and "
        "hard-wiring static n-gram heads into recurrent models improves them."
    ),
    keys=("model", "ngram_heads"),
    metrics=("validity", "accuracy"),
    run=run,
    validate=validate,
    plot=plot,
    verdict=verdict,
)

if __name__ == "__main__":
    main(STUDY)
