"""What every study of `experiments/` shares: its command line, its results file, the table, the
figure and its section of `docs/results.md`.

A study is a module `experiments/<name>.py` that defines `STUDY = Study(...)` and ends with
`if __name__ == "__main__": main(STUDY)`. Its configs are `configs/studies/<name>.py`, whose
`get_config(size)` takes `"quick"` (under a minute: the tests run it), `"default"` (a CPU laptop,
about 15 minutes per seed) or `"full"` (the paper's protocol, for a GPU or TPU):

    python -m experiments.<name>                                  # default size, seeds 0, 1, 2
    python -m experiments.<name> --config=configs/studies/<name>.py:quick --seeds=0
    python -m experiments.<name> --config.train_steps=2000        # any field overridden

Each seed's run appends one record to `results/studies/<name>/<size>.jsonl`:

    {"study", "size", "seed", "config", "config_hash", "commit", "corpus_hash", "finished",
     "seconds", "rows": [{<key columns>, <metrics>}, ...]}

so results accumulate across runs and a grid can be filled over several days: a seed already
recorded for the same config (by hash) is skipped unless `--rerun`. After every run the study's
table (`<size>.md`) and figure (`<size>.png`) are regenerated from all records of that config,
the mean and spread over seeds of every metric; `python -m experiments.report` then rebuilds
`docs/results.md` from the tables, never from typed numbers. The command line keeps JAX's
persistent compilation cache in `~/.cache/seqjax/jax`: further seeds reuse the first one's
programs.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import importlib.util
import json
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

RESULTS = Path("results/studies")
CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "studies"
COMPILATION_CACHE = Path.home() / ".cache" / "seqjax" / "jax"
SIZES = ("quick", "default", "full")
Row = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Summary:
    """The records of one study config, aggregated over seeds.

    Attributes:
      rows: one per distinct key; each key column's value, and for each metric `(mean, std, n)`.
      seeds: the seeds that contributed.
      config: the config they share.
    """

    rows: list[Row]
    seeds: list[int]
    config: dict

    def value(self, metric: str, **keys: Any) -> float:
        """The mean of `metric` over seeds in the row whose key columns equal `keys`."""
        for row in self.rows:
            if all(row[k] == v for k, v in keys.items()):
                return row[metric][0]
        raise KeyError(f"no row with {keys}")


@dataclasses.dataclass(frozen=True)
class Study:
    """One study: how to run a seed, how to read the results.

    Attributes:
      number: the study's number in issue 12's list (the docs page's order).
      name: the module and config name (`experiments/<name>.py`, `configs/studies/<name>.py`).
      title: the docs page's heading.
      claim: the paper's claim this study tests, with the reference.
      keys: the columns that identify a row (`("mixer", "test_length")`).
      metrics: the measured columns, aggregated over seeds.
      run: `(config, seed) -> (rows, corpus_hash or None)`.
      validate: `config -> None`, raising ValueError naming the bad field (before any work).
      plot: `(summary, figure) -> None`: draws on a matplotlib figure.
      verdict: `summary -> str`: whether the claim's direction reproduces, computed from the
        numbers (the docs page prints it).
    """

    number: int
    name: str
    title: str
    claim: str
    keys: tuple[str, ...]
    metrics: tuple[str, ...]
    run: Callable[[ml_collections.ConfigDict, int], tuple[list[Row], str | None]]
    validate: Callable[[ml_collections.ConfigDict], None]
    plot: Callable[[Summary, Any], None]
    verdict: Callable[[Summary], str]

    def command(self, size: str) -> str:
        config = f"configs/studies/{self.name}.py" + ("" if size == "default" else f":{size}")
        return f"python -m experiments.{self.name} --config={config}"


def load_config(name: str, size: str = "default") -> ml_collections.ConfigDict:
    """`get_config(size)` of `configs/studies/<name>.py`, loaded from its path as the command
    line's `--config` loads it."""
    spec = importlib.util.spec_from_file_location(f"study_config_{name}", CONFIGS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(size)


def train_config(
    *,
    task: str,
    options: dict,
    length: int,
    layers: Sequence[str],
    mixer_options: dict,
    width: int,
    steps: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    eval_options: dict | None = None,
    mesh: dict | None = None,
    **model: Any,
) -> ml_collections.ConfigDict:
    """A `seqjax.train` config for one model of a study: `config.model` from `layers`,
    `mixer_options`, `width` and any other `LanguageModelConfig` field in `model`; evaluation
    and a checkpoint only at the end; the seed drives initialization and data order, and the
    task's own generator seed when `options` has none."""
    from seqjax.train.config import default_config

    config = default_config()
    config.seed = seed
    config.data.task = task
    config.data.options = {"seed": seed, **options}
    config.data.eval_options = {"seed": 10_000 + seed, **(eval_options or {})}
    config.data.seed = seed
    config.data.length = length
    config.data.batch_size = batch_size
    config.model.width = width
    config.model.layers = tuple(layers)
    config.model.mixer_options = mixer_options
    for field, value in model.items():
        config.model[field] = value
    config.optimizer.learning_rate = learning_rate
    config.optimizer.warmup_steps = min(config.optimizer.warmup_steps, steps // 10)
    config.train.steps = steps
    config.train.log_every = max(steps // 10, 1)
    config.train.eval_every = steps
    config.train.checkpoint_every = steps
    config.train.keep_checkpoints = 1
    for axis, size in (mesh or {}).items():
        config.mesh[axis] = size
    return config


def fit_and_evaluate(
    config: ml_collections.ConfigDict, evaluations: dict[str, dict], workdir: Path | None = None
) -> tuple[dict[str, dict[str, float]], dict]:
    """Trains `config` (in `workdir`, or a temporary folder removed afterwards), then evaluates
    the trained parameters once per entry of `evaluations`: name -> changes to `config.data`
    (e.g. `{"length": 256, "eval_options": {"min_length": 256, "max_length": 256}}`).
    Returns `({name: metrics}, training summary)`; exits if SIGTERM stopped the training."""
    from seqjax.train.loop import evaluate_params, fit

    with tempfile.TemporaryDirectory() as scratch:
        state, summary = fit(config, workdir or scratch)
    if summary["preempted"]:
        # A half-trained model must not enter the record as if it were the protocol's.
        raise SystemExit("SIGTERM during training: this seed is not recorded")
    results = {}
    for name, changes in evaluations.items():
        evaluation = copy.deepcopy(config)
        for field, value in changes.items():
            if isinstance(value, dict):
                evaluation.data[field].update(value)
            else:
                evaluation.data[field] = value
        results[name] = evaluate_params(evaluation, state.params)
    return results, summary


ACCURACY_MARGIN = 0.05
"""The smallest difference of two accuracies that a verdict calls a difference. The CPU sizes
score a few hundred held-out answers, whose accuracy near 1/2 has a binomial standard error of
about 0.02, so the difference of two has one of about 0.03: 0.05 is nearly two of those."""

Value = float | tuple[float, float, int]


def beats(a: Value, b: Value, margin: float = ACCURACY_MARGIN) -> bool:
    """Whether `a` exceeds `b` by more than noise: by more than `margin` and, for summaries
    `(mean, std, n)` over seeds, by more than twice the standard error of the difference of
    their means (`sqrt(std_a^2 / n_a + std_b^2 / n_b)`; zero with one seed each)."""
    (mean_a, std_a, n_a), (mean_b, std_b, n_b) = (
        value if isinstance(value, tuple) else (value, 0.0, 1) for value in (a, b)
    )
    error = float(np.sqrt(std_a**2 / max(n_a, 1) + std_b**2 / max(n_b, 1)))
    return mean_a - mean_b > max(margin, 2 * error)


def relative_error(actual, expected) -> float:
    """Worst over the leaves of max |actual - expected| / max |expected|."""
    errors = [
        float(jnp.max(jnp.abs(a - e)) / jnp.maximum(jnp.max(jnp.abs(e)), 1e-30))
        for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True)
    ]
    return max(errors)


def median_ms(fn, args, repeats: int) -> list[float]:
    """Median wall time in ms of each function of `fn` (a list) on `args`, after one warm-up
    call each, interleaved over `repeats` so that a noisy machine slows them alike."""
    for f in fn:
        jax.block_until_ready(f(*args))
    times = [[] for _ in fn]
    for _ in range(repeats):
        for f, samples in zip(fn, times, strict=True):
            start = time.perf_counter()
            jax.block_until_ready(f(*args))
            samples.append(time.perf_counter() - start)
    return [1e3 * float(np.median(samples)) for samples in times]


def fail(field: str, message: str) -> None:
    raise ValueError(f"config.{field}: {message}")


def check_choices(field: str, values: Sequence[str], choices: Sequence[str]) -> None:
    """Every entry of `config.<field>` is one of `choices`."""
    for value in values:
        if value not in choices:
            fail(field, f"unknown entry {value!r}; expected one of {tuple(choices)}")


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def commit() -> str:
    """The checked-out commit, `+dirty` when the tree has changes; "unknown" outside git."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if status else "")


def results_path(results: Path, name: str, size: str) -> Path:
    return results / name / f"{size}.jsonl"


def load(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def summarize(study: Study, records: list[dict]) -> Summary:
    """Mean, standard deviation (ddof 0) and count over seeds of every metric, per key; the
    last record of each seed counts."""
    by_seed = {record["seed"]: record for record in records}
    grouped: dict[tuple, dict[str, list[float]]] = {}
    for record in by_seed.values():
        for row in record["rows"]:
            key = tuple(row[k] for k in study.keys)
            values = grouped.setdefault(key, {m: [] for m in study.metrics})
            for metric in study.metrics:
                if row.get(metric) is not None:
                    values[metric].append(float(row[metric]))
    rows = []
    for key, values in grouped.items():
        row: Row = dict(zip(study.keys, key, strict=True))
        for metric, samples in values.items():
            samples = np.asarray(samples)
            row[metric] = (
                (float(samples.mean()), float(samples.std()), len(samples))
                if len(samples)
                else (float("nan"), float("nan"), 0)
            )
        rows.append(row)
    config = records[-1]["config"] if records else {}
    return Summary(rows, sorted(by_seed), config)


def format_value(mean: float, std: float, count: int) -> str:
    """Three decimals (one from 100 up), scientific below 1e-3 so that small errors show."""
    spec = ".2e" if 0 < abs(mean) < 1e-3 else ".3f" if abs(mean) < 100 else ".1f"
    if count <= 1:
        return f"{mean:{spec}}"
    return f"{mean:{spec}} ± {std:{spec}}"


def plot_series(ax, rows: list[Row], x: str, metric: str, label: str) -> None:
    """One line on `ax`: the mean of `metric` against `x` (a key, or a metric's mean), with
    the spread over seeds as error bars; nothing when `rows` is empty."""

    def position(row: Row) -> float:
        return row[x][0] if isinstance(row[x], tuple) else row[x]

    rows = sorted(rows, key=position)
    if rows:
        means = [row[metric][0] for row in rows]
        spread = [row[metric][1] for row in rows]
        xs = [position(row) for row in rows]
        ax.errorbar(xs, means, yerr=spread, marker="o", capsize=2, label=label)


def table(study: Study, summary: Summary) -> str:
    """Markdown: the key columns, then each metric as mean ± std over the seeds."""
    headers = [*study.keys, *study.metrics]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in summary.rows:
        cells = [str(row[k]) for k in study.keys]
        cells += [format_value(*row[m]) for m in study.metrics]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_outputs(study: Study, summary: Summary, directory: Path, size: str) -> None:
    """`<size>.md` (the table, the seeds, the command and the verdict) and `<size>.png`."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    seeds = ", ".join(map(str, summary.seeds))
    text = [
        f"{table(study, summary)}",
        "",
        f"Seeds: {seeds} (mean ± standard deviation over seeds). Command: "
        f"`{study.command(size)} --seeds={','.join(map(str, summary.seeds))}`.",
        "",
        f"Verdict: {study.verdict(summary)}",
        "",
    ]
    (directory / f"{size}.md").write_text("\n".join(text))
    figure = plt.figure(figsize=(7, 4.5))
    study.plot(summary, figure)
    figure.tight_layout()
    figure.savefig(directory / f"{size}.png", dpi=110)
    plt.close(figure)


def run_study(
    study: Study,
    config: ml_collections.ConfigDict,
    seeds: Sequence[int],
    results: Path = RESULTS,
    rerun: bool = False,
) -> Summary:
    """Runs the seeds not yet recorded for `config` (all of them with `rerun`), appends their
    records, and regenerates the table and the figure; returns the summary."""
    if config.get("size") not in SIZES:
        fail("size", f"expected one of {SIZES}, got {config.get('size')!r}")
    study.validate(config)
    as_dict = config.to_dict()
    digest = config_hash(as_dict)
    path = results_path(results, study.name, config.size)
    path.parent.mkdir(parents=True, exist_ok=True)
    done = {r["seed"] for r in load(path) if r["config_hash"] == digest}
    for seed in seeds:
        if seed in done and not rerun:
            print(f"{study.name}: seed {seed} already recorded for this config; skipped")
            continue
        started = time.perf_counter()
        rows, corpus_hash = study.run(config, seed)
        record = {
            "study": study.name,
            "size": config.size,
            "seed": seed,
            "config": as_dict,
            "config_hash": digest,
            "commit": commit(),
            "corpus_hash": corpus_hash,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "seconds": round(time.perf_counter() - started, 1),
            "rows": rows,
        }
        with path.open("a") as file:
            file.write(json.dumps(record) + "\n")
        print(f"{study.name}: seed {seed} done in {record['seconds']} s")
    summary = summarize(study, [r for r in load(path) if r["config_hash"] == digest])
    write_outputs(study, summary, path.parent, config.size)
    print(table(study, summary))
    print(f"Verdict: {study.verdict(summary)}")
    return summary


def main(study: Study) -> None:
    """The command line of a study script (see the module docstring)."""
    from absl import app, flags, logging
    from ml_collections import config_flags

    config_flag = config_flags.DEFINE_config_file(
        "config", f"configs/studies/{study.name}.py", "the study's config file[:size]"
    )
    seeds_flag = flags.DEFINE_string("seeds", "0,1,2", "comma-separated seeds")
    results_flag = flags.DEFINE_string("results", str(RESULTS), "where results accumulate")
    rerun_flag = flags.DEFINE_bool("rerun", False, "rerun seeds already recorded")

    def run(argv):
        del argv
        # Orbax logs every checkpoint save at INFO; the runs' own lines are printed.
        logging.set_verbosity(logging.WARNING)
        # Seeds and sizes compile the same programs again: compilation dominates on CPU.
        jax.config.update("jax_compilation_cache_dir", str(COMPILATION_CACHE))
        seeds = [int(s) for s in seeds_flag.value.split(",") if s]
        run_study(study, config_flag.value, seeds, Path(results_flag.value), rerun_flag.value)

    app.run(run)
