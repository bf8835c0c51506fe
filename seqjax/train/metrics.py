"""Training metrics to a JSON-lines file, TensorBoard event files and the terminal.

    <directory>/metrics.jsonl               {"step": 100, "train/loss": 2.31, ...} per write
    <directory>/events.out.tfevents.*       the same scalars, tag "<prefix>/<name>" (tensorboardX:
                                            no TensorFlow); one file per writer, so a resumed
                                            run adds a file that TensorBoard reads with the rest

The JSONL file is the record that experiment scripts read back (`read_metrics`); it is opened
for appending and flushed after every line, so a killed run keeps what it wrote and a resumed
run continues the same file (steps logged after the last checkpoint then appear twice, the
resumed run's after the killed run's).

On an interactive terminal (stderr a TTY) training steps move a tqdm progress bar that shows
the latest metrics, and other writes (evaluation) print a line above it; otherwise (a log
file, a batch job) each write prints one line, training steps only every `log_every` steps and
at the last:

    train step 100/1000: loss 2.31, tokens_per_second 1.23e+04, learning_rate 0.001
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
import tensorboardX
from tqdm import tqdm

METRICS_FILE = "metrics.jsonl"
TRAIN = "train"


def _scalar(name: str, value: Any) -> float:
    """`value` (a Python, NumPy or JAX real scalar) as a float."""
    array = np.asarray(value)
    if array.shape != () or array.dtype.kind not in "biuf":
        raise ValueError(
            f"metrics[{name!r}]: expected a real scalar, got {array.dtype} of shape {array.shape}"
        )
    return float(array)


def _positive(value: Any, argument: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{argument}: expected a positive int, got {value!r}")


class MetricsWriter:
    """Writes each call's scalars to `<directory>/metrics.jsonl`, to TensorBoard event files in
    `directory`, and to the terminal (module docstring). `total_steps` is the run's length,
    for the progress bar and the log lines; `log_every` how often a non-interactive run prints
    a training line. Only process 0 of a multi-host run writes anything. Use as a context
    manager, or call `close()`."""

    def __init__(self, directory: str | Path, *, total_steps: int, log_every: int):
        _positive(total_steps, "total_steps")
        _positive(log_every, "log_every")
        self.directory = Path(directory)
        self.total_steps = total_steps
        self.log_every = log_every
        self.interactive = sys.stderr.isatty()
        self._bar: tqdm | None = None
        # The metrics are global: in a multi-host run, process 0's copy is everyone's.
        self.active = jax.process_index() == 0
        if not self.active:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lines = (self.directory / METRICS_FILE).open("a", encoding="utf-8")
        # tensorboardX names event files by the second: number them so that a run restarted
        # within the same second does not overwrite the previous run's file.
        existing = len(list(self.directory.glob("events.out.tfevents.*")))
        self._events = tensorboardX.SummaryWriter(
            logdir=str(self.directory), filename_suffix=f".{existing}"
        )

    def write(self, step: int, metrics: Mapping[str, Any], prefix: str = TRAIN) -> None:
        """Records `metrics` (name -> real scalar) at `step` as `<prefix>/<name>`."""
        step = int(step)
        values = {name: _scalar(name, value) for name, value in metrics.items()}
        if not self.active:
            return
        scalars = {f"{prefix}/{name}": value for name, value in values.items()}
        self._lines.write(json.dumps({"step": step, **scalars}) + "\n")
        self._lines.flush()
        for tag, value in scalars.items():
            self._events.add_scalar(tag, value, step)
        self._events.flush()
        self._show(step, values, prefix)

    def _show(self, step: int, values: dict[str, float], prefix: str) -> None:
        summary = ", ".join(f"{name} {value:.4g}" for name, value in values.items())
        line = f"{prefix} step {step}/{self.total_steps}: {summary}"
        if not self.interactive:
            if prefix != TRAIN or step % self.log_every == 0 or step == self.total_steps:
                print(line, flush=True)
        elif prefix != TRAIN:
            tqdm.write(line)
        else:
            if self._bar is None:
                self._bar = tqdm(
                    total=self.total_steps, initial=step, unit="step", dynamic_ncols=True
                )
            self._bar.update(step - self._bar.n)
            self._bar.set_postfix_str(summary)

    def close(self) -> None:
        """Closes the progress bar and the files (flushing them)."""
        if not self.active:
            return
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self._events.close()
        self._lines.close()

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def read_metrics(directory: str | Path) -> list[dict[str, Any]]:
    """The records of `<directory>/metrics.jsonl`, one dict per line, in order written."""
    path = Path(directory) / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"directory: expected {METRICS_FILE} in {directory}, found none")
    with path.open(encoding="utf-8") as lines:
        return [json.loads(line) for line in lines if line.strip()]


__all__ = ["METRICS_FILE", "MetricsWriter", "read_metrics"]
