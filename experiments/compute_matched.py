"""Study 10: compute-matched comparison. Several mixers trained for the same wall-clock budget
on the local text corpus; loss against training time and against tokens seen (Stanić et al.,
"The Languini Kitchen: Enabling Language Modelling Research at Different Scales of Compute",
2023; PAPERS.md B.3).

    python -m experiments.compute_matched [--config=configs/studies/compute_matched.py:quick]
        [--seeds=0,1,2]

Protocol (Languini's): models are compared at equal accelerator time, not at equal steps or
parameters, so a faster model sees more tokens. For each mixer:

1. Calibration: a short run of `calibration_steps` steps measures the step time `s` (the median
   over its steps, timed by the train loop's clock: compilation, evaluation and saving
   excluded).
2. The steps are set from it, `N = budget_seconds / s` (rounded to a multiple of `num_evals`),
   so that the learning-rate schedule (warmup, then cosine decay to `final_fraction` of the
   peak over `N` steps) completes within the budget, as Languini fixes its step counts from a
   measured throughput.
3. The run trains `N` steps with `train.max_seconds = budget_seconds` as the safety net (a
   machine slower than at calibration stops there), evaluating `num_evals` times at equal step
   intervals: bits per byte of the held-out split (the mean cross-entropy in nats / ln 2).

Data: byte-level language modelling (vocabulary 256) on the Python standard library's source
(`seqjax.data.text.StdlibCorpus`: files split by a hash of their path), documents packed into
rows of `length` bytes. The models are `embed -> num_layers x [mixer, MLP] -> head` of one
`width`; a mixer whose block has no MLP (Mamba-2) gets twice the layers, the Mamba papers'
convention for matching a Transformer's parameters. `mixer_options` set the heads so that the
parameter counts stay within about 15% of attention's (the table's `parameters`). Every mixer
trains with the same optimizer and peak learning rate (Languini tuned each model; this study
does not).

Each row is one evaluation: `budget_fraction` is its place in the planned steps (1.0: the
last, at the budget, whether the schedule completed or the budget stopped it), `seconds` the
training time and `tokens_seen` the tokens trained on by then, `tokens_per_second` the
throughput so far, `planned_steps` the calibrated `N`. Wall-clock results depend on the
machine: the config records it (`machine`, checked against the machine that runs it), so
seeds from different machines never average together.

Claims (Languini): the GPT (attention) baseline reaches a lower loss than the LSTM at every
compute level tested, and the quasi-LSTM has about ten times the throughput of a naive LSTM.
seqjax has no quasi-LSTM (an LSTM whose gates do not see the previous output); its `lstm` is
the naive head-wise LSTM, so the study reports every mixer's throughput relative to it. The
verdict checks attention against the LSTM at the budget and at every evaluation, and whether
attention reaches the lowest loss of all the mixers at the budget.
"""

from __future__ import annotations

import math
import os
import platform
import tempfile
from pathlib import Path

import jax
import ml_collections
import numpy as np
from matplotlib.ticker import FuncFormatter

from experiments.study import (
    Study,
    Summary,
    beats,
    check_choices,
    fail,
    main,
    plot_series,
    train_config,
)
from seqjax.models import MIXERS
from seqjax.models.backbone import WITHOUT_MLP
from seqjax.train.config import validate as validate_train
from seqjax.train.loop import fit, model_config
from seqjax.train.metrics import read_metrics

TASK = "stdlib_text"
VOCAB_SIZE = 256  # bytes
# The smallest difference of two losses (bits per byte) that the verdict calls a difference:
# two thirds of the seed-to-seed standard deviation of a byte-level transformer's held-out
# loss on the same corpus (study 9's teacher at its default size: 5.36 +- 0.11 perplexity,
# 0.03 bits); with several seeds, `beats` also asks for more than twice the standard error.
BITS_MARGIN = 0.02
ATTENTION, LSTM = "attention", "lstm"


def machine() -> str:
    """What wall-clock results depend on: JAX's backend with its devices, the host's processor
    and the CPUs this process may use."""
    devices = jax.devices()
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (
        f"{jax.default_backend()}: {len(devices)} x {devices[0].device_kind}; "
        f"host: {processor()}, {cpus} CPUs"
    )


def processor() -> str:
    """The CPU's model name (Linux), else what `platform` knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def num_layers(config: ml_collections.ConfigDict, mixer: str) -> int:
    """`num_layers`, doubled for a mixer whose block has no MLP."""
    return config.num_layers * (2 if mixer in WITHOUT_MLP else 1)


def run_config(
    config: ml_collections.ConfigDict, mixer: str, seed: int, steps: int
) -> ml_collections.ConfigDict:
    """The `seqjax.train` config that trains `mixer` for `steps` steps within the budget,
    evaluating `num_evals` times at equal intervals."""
    options = config.mixer_options.to_dict().get(mixer, {})
    training = train_config(
        task=TASK,
        options={},
        length=config.length,
        layers=(mixer,) * num_layers(config, mixer),
        mixer_options={mixer: options},
        width=config.width,
        steps=steps,
        batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        seed=seed,
        mesh=config.mesh.to_dict(),
    )
    # The corpus has no generator seed: the seed orders the training rows (data.seed).
    training.data.options = {"split": "train"}
    training.data.eval_options = {"split": "validation"}
    training.data.packing = "pack"
    training.optimizer.warmup_steps = int(config.warmup_fraction * steps)
    training.optimizer.weight_decay = config.weight_decay
    training.optimizer.final_fraction = config.final_fraction
    training.train.eval_every = max(steps // config.num_evals, 1)
    training.train.log_every = training.train.eval_every
    training.train.eval_batches = config.eval_batches
    training.train.max_seconds = config.budget_seconds
    return training


def planned_steps(config: ml_collections.ConfigDict, step_time: float) -> int:
    """The steps that fill the budget at `step_time` seconds each, a multiple of `num_evals`
    (at least one evaluation interval of one step)."""
    intervals = max(round(config.budget_seconds / step_time / config.num_evals), 1)
    return intervals * config.num_evals


def calibrate(config: ml_collections.ConfigDict, mixer: str, seed: int) -> float:
    """The median seconds per train step of `mixer` over a short run of `calibration_steps`
    steps, timed as the budgeted run times them (every step waited for; the first, which
    compiles, not timed); the median, so that a moment of load on a shared machine does not
    set the steps. The run is evaluated once, on one batch."""
    calibration = run_config(config, mixer, seed, config.calibration_steps)
    calibration.train.log_every = 1
    calibration.train.eval_every = calibration.train.checkpoint_every = config.calibration_steps
    calibration.train.eval_batches = 1
    with tempfile.TemporaryDirectory() as workdir:
        fit(calibration, workdir)
        records = read_metrics(workdir)
    return float(np.median([r["train/step_time"] for r in records if "train/step_time" in r]))


def curve_rows(records: list[dict], last_step: int, steps: int, tokens_per_step: int) -> list[dict]:
    """One row per evaluation in the metrics `records` of a run that planned `steps` and
    stopped at `last_step`: its place in the plan, the training time and tokens by then, the
    throughput so far and the held-out bits per byte."""
    train = {r["step"]: r for r in records if "train/seconds" in r}
    rows = []
    for record in records:
        if "eval/loss" not in record:
            continue
        step = record["step"]
        seconds = train[step]["train/seconds"]
        rows.append(
            dict(
                budget_fraction=1.0 if step == last_step else round(step / steps, 3),
                step=step,
                seconds=seconds,
                tokens_seen=train[step]["train/tokens_seen"],
                # The first step compiles and is not timed.
                tokens_per_second=(step - 1) * tokens_per_step / seconds if seconds else None,
                bits_per_byte=record["eval/loss"] / math.log(2),
            )
        )
    return rows


def run(config: ml_collections.ConfigDict, seed: int) -> tuple[list[dict], str]:
    """Calibrates and trains every mixer with `seed`; one row per evaluation."""
    rows, corpus_hash = [], None
    for mixer in config.mixers:
        step_time = calibrate(config, mixer, seed)
        steps = planned_steps(config, step_time)
        training = run_config(config, mixer, seed, steps)
        with tempfile.TemporaryDirectory() as workdir:
            _, summary = fit(training, workdir)
            records = read_metrics(workdir)
        constants = dict(
            mixer=mixer,
            planned_steps=steps,
            parameters=summary["parameters"],
            calibrated_step_time=step_time,
        )
        tokens_per_step = config.batch_size * config.length
        for row in curve_rows(records, summary["steps"], steps, tokens_per_step):
            rows.append({**constants, **row})
        corpus_hash = summary["data"]["content_hash"]
    return rows, corpus_hash


def validate(config: ml_collections.ConfigDict) -> None:
    """Unknown mixers, impossible sizes and a config recorded on another machine fail before
    any training."""
    check_choices("mixers", config.mixers, sorted(MIXERS))
    check_choices("mixer_options", tuple(config.mixer_options), sorted(MIXERS))
    for field in ("width", "num_layers", "length", "batch_size", "eval_batches", "num_evals"):
        if not isinstance(config[field], int) or config[field] < 1:
            fail(field, f"expected a positive integer, got {config[field]!r}")
    if not isinstance(config.calibration_steps, int) or config.calibration_steps < 2:
        fail(
            "calibration_steps",
            f"expected an integer >= 2 (the first step is not timed), "
            f"got {config.calibration_steps!r}",
        )
    if not 0 <= config.warmup_fraction < 1:
        fail("warmup_fraction", f"expected a fraction in [0, 1), got {config.warmup_fraction!r}")
    if not 0 < config.budget_seconds < math.inf:
        fail(
            "budget_seconds",
            f"expected a positive number of seconds, got {config.budget_seconds!r}",
        )
    here = machine()
    if config.machine != here:
        fail(
            "machine",
            f"the config is for {config.machine!r} but this machine is {here!r}: wall-clock "
            "results are only comparable on one machine",
        )
    for mixer in config.mixers:
        training = run_config(config, mixer, seed=0, steps=config.num_evals)
        validate_train(training)
        try:
            model_config(training, VOCAB_SIZE)
        except ValueError as error:
            # The model's fields are this config's (`width`, `mixer_options`).
            raise ValueError(str(error).replace("config.model.", "config.", 1)) from None


def plot(summary: Summary, figure) -> None:
    """Held-out bits per byte against training time and against tokens seen (log x), one line
    per mixer."""
    by_time, by_tokens = figure.subplots(1, 2, sharey=True)
    mixers = list(dict.fromkeys(row["mixer"] for row in summary.rows))
    for mixer in mixers:
        rows = [row for row in summary.rows if row["mixer"] == mixer]
        plot_series(by_time, rows, "seconds", "bits_per_byte", mixer)
        plot_series(by_tokens, rows, "tokens_seen", "bits_per_byte", mixer)
    by_time.set(xscale="log", xlabel="training time (s)", ylabel="held-out bits per byte")
    by_tokens.set(xscale="log", xlabel="tokens seen")
    for ax in (by_time, by_tokens):
        # The runs span a decade or two: label the minor ticks at 2, 3 and 5 too.
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: compact(x)))
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda x, _: compact(x, mantissas=(2, 3, 5))))
    figure.suptitle(summary.config.get("machine", ""), fontsize="small")
    by_tokens.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.0, 0.5))


def compact(x: float, mantissas: tuple[int, ...] | None = None) -> str:
    """`x` in at most four characters (`20`, `300k`, `1M`); empty unless its leading digit is
    one of `mantissas` (when given), so that crowded log-axis ticks are labelled sparsely."""
    leading = x / 10 ** math.floor(math.log10(x) + 1e-9)
    if mantissas is not None and round(leading, 6) not in mantissas:
        return ""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if x >= scale:
            return f"{x / scale:.3g}{suffix}"
    return f"{x:.3g}"


def at_budget(summary: Summary, metric: str) -> dict[str, float]:
    """Mixer -> the mean over seeds of `metric` at the budget."""
    return {r["mixer"]: r[metric][0] for r in summary.rows if r["budget_fraction"] == 1.0}


def lower(a: tuple, b: tuple) -> bool:
    """Whether the loss summary `a` is lower than `b` by more than noise."""
    return beats(b, a, BITS_MARGIN)


def verdict(summary: Summary) -> str:
    """Attention against the LSTM at the budget and at every evaluation (the paper's claim;
    a loss counts as lower when it is lower by more than noise, `experiments.study.beats` with
    the margin `BITS_MARGIN`), whether attention is the lowest of all at the budget, and each
    mixer's throughput relative to the LSTM."""
    loss, throughput = at_budget(summary, "bits_per_byte"), at_budget(summary, "tokens_per_second")
    if ATTENTION not in loss or LSTM not in loss:
        return "attention and the LSTM were not both run: nothing to compare."
    curves = {(r["mixer"], r["budget_fraction"]): r["bits_per_byte"] for r in summary.rows}
    fractions = sorted(
        {f for m, f in curves if m == ATTENTION} & {f for m, f in curves if m == LSTM}
    )
    wins = [lower(curves[ATTENTION, f], curves[LSTM, f]) for f in fractions]
    ahead = lower(curves[ATTENTION, 1.0], curves[LSTM, 1.0])
    overall = (
        "the paper's direction reproduces"
        if ahead and all(wins)
        else "the paper's direction reproduces at the budget only"
        if ahead
        else "the paper's direction does NOT reproduce"
    )
    best = min(loss, key=loss.get)
    lowest = (
        "attention reaches the lowest loss of all mixers at the budget"
        if best == ATTENTION
        else f"{best} reaches the lowest loss at the budget ({loss[best]:.3f} bits per byte)"
    )
    ratios = ", ".join(
        f"{mixer} {throughput[mixer] / throughput[LSTM]:.2f}x" for mixer in throughput
    )
    return (
        f"{overall}: at the budget attention {'beats' if ahead else 'does not beat'} the LSTM "
        f"({loss[ATTENTION]:.3f} vs {loss[LSTM]:.3f} bits per byte), and beats it at "
        f"{sum(wins)} of {len(wins)} evaluations; {lowest}. Throughput relative to the LSTM "
        f"(tokens per second): {ratios} (seqjax has no quasi-LSTM, so the paper's tenfold "
        f"quasi-LSTM speed-up is not tested). Machine: {summary.config.get('machine', '?')}."
    )


STUDY = Study(
    number=10,
    name="compute_matched",
    title="Compute-matched comparison (Languini protocol)",
    claim=(
        "Stanić et al. (2023), 'The Languini Kitchen': compared at equal accelerator time "
        "(tokens seen = throughput x compute budget), the GPT (attention) baseline reaches a "
        "lower loss than the LSTM at every compute level tested, and the quasi-LSTM has about "
        "ten times the throughput of a naive LSTM."
    ),
    keys=("mixer", "budget_fraction"),
    metrics=(
        "bits_per_byte",
        "seconds",
        "tokens_seen",
        "tokens_per_second",
        "step",
        "planned_steps",
        "parameters",
    ),
    run=run,
    validate=validate,
    plot=plot,
    verdict=verdict,
)

if __name__ == "__main__":
    main(STUDY)
