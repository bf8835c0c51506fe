"""Study 1: state tracking with negative eigenvalues. Linear RNNs whose state transitions have
only non-negative eigenvalues cannot track parity; letting them reach -1 can (Grazzi et al.,
"Unlocking State-Tracking in Linear RNNs Through Negative Eigenvalues", 2024).

    python -m experiments.state_tracking [--config=configs/studies/state_tracking.py:quick]
        [--seeds=0,1,2]

Protocol (the paper's formal-language experiments, `../shared/PAPERS.md` B.1.4 and B.3, from
their xLSTM configs): every model is trained from scratch on one task with inputs of
`train_min_length` to `train_max_length` tokens (3 to 40) and a single supervised answer on the
last token (`seqjax.data.state_tracking`), then scored on held-out examples of exactly each
test length (40, 128 and 256 tokens): accuracy of the answer token and its cross-entropy (the
test at the training length is the training run's own final evaluation). Training is AdamW
with linear warmup over the first tenth of the steps, then cosine decay; the seed draws the
initialization, the training examples and the held-out ones. The tasks are

- `parity`: the parity of the ones in a bit string (chance 1/2);
- `modular_counting`: the number of ones modulo 3 (chance 1/3);
- `modular_arithmetic`: `n_0 op n_1 .. op n_k =` modulo 5 with `+ - *` and no brackets
  (chance about 1/5).

The models differ only in their mixer (`MODELS`), `num_layers` layers of it:

- `diag_lrnn[0,1]` / `diag_lrnn[-1,1]`: the diagonal linear RNN `h_t = a_t * h_{t-1} + b_t`
  with `a_t = sigmoid(s z_t)` in (0, 1) or `a_t = tanh(s z_t)` in (-1, 1)
  (`seqjax.nn.diagonal_lrnn`);
- `delta_net(0,1)` / `delta_net(0,2)`: DeltaNet, `S_t = (I - beta_t k_t k_t^T) S_{t-1} +
  beta_t k_t v_t^T` with `beta_t = sigmoid(.)` in (0, 1) (eigenvalues of the transition in
  [0, 1]) or `2 sigmoid(.)` in (0, 2) (eigenvalues in (-1, 1]);
- controls: `lstm` and `slstm` (non-linear RNNs, which can track state) and `attention`
  (causal softmax attention with RoPE, which is not expected to extrapolate in length).

The paper's theory predicts that the extended ranges help on parity for both families; for
counting modulo 3 a diagonal (hence triangular) real transition cannot count in finite
precision in either range, while products of generalized Householder matrices (DeltaNet with
beta in (0, 2)) can. The verdict compares each extended model with its restricted counterpart
on parity and modular counting, from the mean accuracy over seeds and test lengths.
"""

from __future__ import annotations

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
    plot_series,
    train_config,
)

# Each task's options beside the lengths, and the accuracy of a uniform guess (the figure's
# dotted line).
TASKS: dict[str, dict] = {
    "parity": {},
    "modular_counting": {"modulus": 3},
    "modular_arithmetic": {"modulus": 5},
}
CHANCE = {"parity": 1 / 2, "modular_counting": 1 / 3, "modular_arithmetic": 1 / 5}

# name -> (mixer of `seqjax.models.MIXERS`, the options that make the variant).
MODELS: dict[str, tuple[str, dict]] = {
    "diag_lrnn[0,1]": ("diagonal_lrnn", {"allow_neg_eigval": False}),
    "diag_lrnn[-1,1]": ("diagonal_lrnn", {"allow_neg_eigval": True}),
    "delta_net(0,1)": ("delta_net", {"allow_neg_eigval": False}),
    "delta_net(0,2)": ("delta_net", {"allow_neg_eigval": True}),
    "lstm": ("lstm", {}),
    "slstm": ("slstm", {}),
    "attention": ("attention", {}),
}
# (extended, restricted) pairs whose comparison is the paper's claim, and the tasks it is on.
PAIRS = (("diag_lrnn[-1,1]", "diag_lrnn[0,1]"), ("delta_net(0,2)", "delta_net(0,1)"))
CLAIMED_TASKS = ("parity", "modular_counting")


def task_options(config: ml_collections.ConfigDict, task: str) -> dict:
    """The training source's options: the task's own, the length range and enough examples
    that no training example repeats."""
    return {
        **TASKS[task],
        "min_length": config.train_min_length,
        "max_length": config.train_max_length,
        "num_examples": max(config.steps * config.batch_size, 100_000),
    }


def held_out(length: int) -> dict:
    """The eval source's options for test rows of exactly `length` input tokens."""
    return {"min_length": length, "max_length": length}


def run_config(
    config: ml_collections.ConfigDict, task: str, model: str, seed: int
) -> ml_collections.ConfigDict:
    """The `seqjax.train` config that trains `model` on `task` with this study's protocol. Its
    own final evaluation, on rows of exactly `train_max_length` tokens, is the test at that
    length (one compilation fewer per model)."""
    mixer, variant = MODELS[model]
    options = {**config.mixer_options.to_dict().get(mixer, {}), **variant}
    training = train_config(
        task=task,
        options=task_options(config, task),
        eval_options=held_out(config.train_max_length),
        length=config.train_max_length,
        layers=(mixer,) * config.num_layers,
        mixer_options={mixer: options},
        width=config.width,
        steps=config.steps,
        batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        seed=seed,
        mesh=config.mesh.to_dict(),
    )
    training.optimizer.warmup_steps = int(config.warmup_fraction * config.steps)
    training.optimizer.weight_decay = config.weight_decay
    training.optimizer.final_fraction = config.final_fraction
    training.train.eval_batches = config.eval_batches
    return training


def test_evaluations(config: ml_collections.ConfigDict) -> dict[int, dict]:
    """Per test length `L` but the training length: the eval data's changes for held-out rows
    of exactly `L` tokens."""
    return {
        length: {"length": length, "eval_options": held_out(length)}
        for length in config.test_lengths
        if length != config.train_max_length
    }


def run(config: ml_collections.ConfigDict, seed: int) -> tuple[list[dict], None]:
    """Trains every (task, model) once with `seed`; one row per test length."""
    rows = []
    for task in config.tasks:
        for model in config.models:
            results, summary = fit_and_evaluate(
                run_config(config, task, model, seed), test_evaluations(config)
            )
            results[config.train_max_length] = summary["eval"]
            for length in config.test_lengths:
                metrics = results[length]
                rows.append(
                    dict(
                        task=task,
                        model=model,
                        test_length=length,
                        accuracy=metrics["accuracy"],
                        loss=metrics["loss"],
                    )
                )
    return rows, None


def validate(config: ml_collections.ConfigDict) -> None:
    """Unknown tasks or models, and sizes the sources or models reject, fail before training."""
    from seqjax.data import make_source
    from seqjax.train.config import validate as validate_train
    from seqjax.train.loop import model_config

    check_choices("tasks", config.tasks, tuple(TASKS))
    check_choices("models", config.models, tuple(MODELS))
    for field in ("width", "num_layers", "steps", "batch_size", "eval_batches"):
        if not isinstance(config[field], int) or config[field] < 1:
            fail(field, f"expected a positive integer, got {config[field]!r}")
    if not config.test_lengths or min(config.test_lengths) < 1:
        fail("test_lengths", f"expected positive lengths, got {config.test_lengths}")
    for task in config.tasks:
        try:
            source = make_source(task, **task_options(config, task))
        except ValueError as error:
            fail("train_max_length", f"{task}: {error}")
        for length in config.test_lengths:
            try:
                make_source(task, **{**task_options(config, task), **held_out(length)})
            except ValueError as error:
                fail("test_lengths", f"{task} at {length}: {error}")
        for model in config.models:
            training = run_config(config, task, model, seed=0)
            validate_train(training)
            try:
                model_config(training, source.vocab_size)
            except ValueError as error:
                # The model's fields are this config's (`width`, `mixer_options`).
                raise ValueError(str(error).replace("config.model.", "config.", 1)) from None


def plot(summary: Summary, figure) -> None:
    """Accuracy against test length, one line per model, one panel per task."""
    tasks = [t for t in TASKS if any(r["task"] == t for r in summary.rows)]
    axes = figure.subplots(1, len(tasks), sharey=True, squeeze=False)[0]
    for ax, task in zip(axes, tasks, strict=True):
        for model in MODELS:
            rows = [r for r in summary.rows if r["task"] == task and r["model"] == model]
            plot_series(ax, rows, "test_length", "accuracy", model)
        ax.axhline(CHANCE[task], color="gray", linestyle=":", linewidth=1)
        ax.set(xscale="log", title=task, xlabel="test length (tokens)", ylim=(0, 1.02))
        lengths = sorted({r["test_length"] for r in summary.rows if r["task"] == task})
        ax.set_xticks(lengths, [str(length) for length in lengths])
        ax.minorticks_off()
    axes[0].set_ylabel("accuracy of the answer (dotted: chance)")
    axes[-1].legend(fontsize="small", loc="center left", bbox_to_anchor=(1.0, 0.5))


def mean_accuracy(summary: Summary, task: str, model: str) -> float | None:
    """The mean over test lengths of the mean accuracy over seeds; None if not run."""
    values = [r["accuracy"][0] for r in summary.rows if r["task"] == task and r["model"] == model]
    return float(np.mean(values)) if values else None


def learned(summary: Summary, task: str) -> bool:
    """Whether any model run on `task`, the controls included, beats chance (mean accuracy
    over test lengths)."""
    models = {r["model"] for r in summary.rows if r["task"] == task}
    return any(beats(mean_accuracy(summary, task, m), CHANCE[task]) for m in models)


def verdict(summary: Summary) -> str:
    """Whether each extended-range model beats its restricted counterpart on parity and
    modular counting (mean accuracy over seeds and test lengths), by more than
    `experiments.study.ACCURACY_MARGIN`. A task on which no model, the controls included,
    beats chance tests nothing (the training budget did not suffice) and is only named."""
    parts, wins, total, untested = [], 0, 0, []
    for task in CLAIMED_TASKS:
        if any(r["task"] == task for r in summary.rows) and not learned(summary, task):
            untested.append(f"{task} (chance {CHANCE[task]:.3f})")
            continue
        for extended, restricted in PAIRS:
            ext, res = (
                mean_accuracy(summary, task, extended),
                mean_accuracy(summary, task, restricted),
            )
            if ext is None or res is None:
                continue
            total += 1
            won = beats(ext, res)
            wins += won
            relation = "beats" if won else "does not beat"
            parts.append(f"{task}: {extended} {relation} {restricted} ({ext:.3f} vs {res:.3f})")
    unlearned = (
        f"; untested, because no model, the controls included, beats chance on it: "
        f"{', '.join(untested)}"
        if untested
        else ""
    )
    if not total:
        if untested:
            return f"nothing to compare{unlearned}."
        return "no extended/restricted pair was run on parity or modular counting."
    if wins == total:
        overall = "the paper's direction reproduces"
    elif wins:
        overall = f"the paper's direction reproduces in {wins} of {total} comparisons"
    else:
        overall = "the paper's direction does NOT reproduce"
    note = "mean accuracy over test lengths"
    if any(part.startswith("modular_counting: diag_lrnn") for part in parts):
        note += "; the theory expects no diagonal LRNN, in either range, to count modulo 3"
    return f"{overall}: " + "; ".join(parts) + f" ({note}){unlearned}."


STUDY = Study(
    number=1,
    name="state_tracking",
    title="State tracking with negative eigenvalues",
    claim=(
        "Grazzi et al. (2024), 'Unlocking State-Tracking in Linear RNNs Through Negative "
        "Eigenvalues': linear RNNs whose state-transition eigenvalues lie in [0, 1] cannot "
        "solve parity, and extending the range to [-1, 1] (diagonal decays in [-1, 1], "
        "DeltaNet's beta in (0, 2)) lets them solve it and improves their state tracking "
        "(modular counting and arithmetic), trained on lengths up to 40 and tested up to 256."
    ),
    keys=("task", "model", "test_length"),
    metrics=("accuracy", "loss"),
    run=run,
    validate=validate,
    plot=plot,
    verdict=verdict,
)

if __name__ == "__main__":
    main(STUDY)
