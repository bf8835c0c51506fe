"""Checkpoints of a run: the train state, the data position and the run's metadata, through an
Orbax `CheckpointManager`.

A checkpoint is one folder per step under the run's checkpoint directory:

    <directory>/<step>/state      the train state (`StandardSave`: sharded arrays, OCDBT)
                      /data       the grain iterator's position, one JSON file per host
                      /metadata   the run's metadata (config, corpus hash), JSON
                      /metrics    the metrics that rank it, when a best metric is tracked

Saves are asynchronous: `save` returns once the arrays are copied off the devices and the
iterator position is read, so the caller may donate the state to its next step; the files are
written in the background. `wait` blocks until they are on disk (call it before exiting, e.g.
after the save that a SIGTERM asks for).

Orbax writes each step into a temporary folder and renames it when complete, so a run killed
mid-save leaves a `<step>.orbax-checkpoint-tmp-*` folder that is never taken for a checkpoint;
a `Checkpointer` opening the directory clears such leftovers in the background, at the latest
before its first save.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import orbax.checkpoint as ocp
from grain.checkpoint import CheckpointHandler as DataHandler
from grain.checkpoint import CheckpointRestore as DataRestore
from grain.checkpoint import CheckpointSave as DataSave

_STATE, _DATA, _METADATA = "state", "data", "metadata"


def _handler_registry() -> ocp.handlers.DefaultCheckpointHandlerRegistry:
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    items = (
        (
            _STATE,
            ocp.args.StandardSave,
            ocp.args.StandardRestore,
            ocp.handlers.StandardCheckpointHandler,
        ),
        (_DATA, DataSave, DataRestore, DataHandler),
        (_METADATA, ocp.args.JsonSave, ocp.args.JsonRestore, ocp.handlers.JsonCheckpointHandler),
    )
    for name, save_args, restore_args, handler_class in items:
        handler = handler_class()
        registry.add(name, save_args, handler)
        registry.add(name, restore_args, handler)
    return registry


def _preservation_policy(
    keep: int, best_metric: str | None, best_mode: Literal["min", "max"]
) -> ocp.checkpoint_managers.PreservationPolicy:
    """The last `keep` steps, and the best one by `best_metric` if it is set."""
    latest = ocp.checkpoint_managers.LatestN(n=keep)
    if best_metric is None:
        return latest
    best = ocp.checkpoint_managers.BestN(
        get_metric_fn=_ranking(best_metric, best_mode),
        reverse=best_mode == "min",
        n=1,
        keep_checkpoints_without_metrics=False,
    )
    return ocp.checkpoint_managers.AnyPreservationPolicy([latest, best])


def _ranking(best_metric: str, best_mode: Literal["min", "max"]):
    """`metrics -> value`, a non-finite value (a diverged run's NaN) ranking worst."""
    worst = math.inf if best_mode == "min" else -math.inf

    def rank(metrics: Mapping[str, float]) -> float:
        value = float(metrics[best_metric])
        return value if math.isfinite(value) else worst

    return rank


def _as_json(name: str, value: Any) -> Any:
    """`value` as it reads back from JSON (tuples become lists), or a `ValueError`."""
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name}: expected JSON-serializable values ({error})") from None


def _cause(error: BaseException, limit: int = 300) -> str:
    """`error` in one line, cut to `limit` characters."""
    text = " ".join(str(error).split())
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(error).__name__}: {text}"


def _unreadable_metrics(directory: Path) -> list[Path]:
    """Step folders whose metrics (Orbax's `<step>/metrics/metrics`) are not JSON."""
    damaged = []
    for path in sorted(directory.glob("*/metrics/metrics")):
        try:
            json.loads(path.read_text())
        except (OSError, ValueError):
            damaged.append(path.parent.parent)
    return damaged


class Checkpointer:
    """Saves and restores a run's checkpoints in `directory`.

    Args:
      directory: the run's checkpoint folder; created on first use.
      save_every: `save` writes a checkpoint at steps that are multiples of this.
      keep: how many of the latest checkpoints are kept; older ones are deleted as new ones
        complete, except the best one when `best_metric` is set.
      best_metric: the key of the `metrics` passed to `save` that ranks checkpoints (e.g.
        `"eval/loss"`); the best checkpoint is kept beside the last `keep`.
      best_mode: whether the best checkpoint has the lowest (`"min"`) or highest (`"max"`)
        `best_metric`.
      metadata: JSON-serializable facts about the run that a resume must share (the model and
        data config, the corpus hash); saved with every checkpoint and compared on `restore`.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        save_every: int,
        keep: int,
        best_metric: str | None = None,
        best_mode: Literal["min", "max"] = "min",
        metadata: Mapping[str, Any] | None = None,
    ):
        self.directory = Path(directory).absolute()
        if self.directory.exists() and not self.directory.is_dir():
            raise ValueError(
                f"directory: {self.directory} is a file; expected a folder for checkpoints "
                "(or a path that does not exist yet)"
            )
        if not isinstance(save_every, int) or save_every < 1:
            raise ValueError(f"save_every: expected a positive int, got {save_every!r}")
        if not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep: expected a positive int, got {keep!r}")
        if best_mode not in ("min", "max"):
            raise ValueError(f"best_mode: expected 'min' or 'max', got {best_mode!r}")
        self.save_every = save_every
        self.best_metric = best_metric
        self.metadata = None if metadata is None else _as_json("metadata", dict(metadata))
        options = ocp.CheckpointManagerOptions(
            # `best_fn` makes Orbax store and reload the metrics; `preservation_policy` decides.
            best_fn=None if best_metric is None else _ranking(best_metric, best_mode),
            best_mode=best_mode,
            preservation_policy=_preservation_policy(keep, best_metric, best_mode),
            cleanup_tmp_directories=True,
        )
        try:
            self._manager = ocp.CheckpointManager(
                self.directory, options=options, handler_registry=_handler_registry()
            )
        except Exception as error:
            damaged = ", ".join(str(p) for p in _unreadable_metrics(self.directory))
            raise RuntimeError(
                f"{self.directory}: could not read the checkpoints in this folder "
                f"({_cause(error)}); no checkpoint was deleted. Move the damaged step folders "
                f"{f'({damaged}) ' if damaged else ''}out of it, or use a new directory."
            ) from None

    @property
    def latest_step(self) -> int | None:
        """The newest checkpoint's step (including one still being written), or None."""
        return self._manager.latest_step()

    def save(
        self,
        step: int,
        state: Any,
        *,
        data_iterator: Any = None,
        metrics: Mapping[str, float] | None = None,
        force: bool = False,
    ) -> bool:
        """Starts saving `state` (and `data_iterator`'s position) as the checkpoint of `step`,
        when `step` is a multiple of `save_every` or `force`; returns whether it did.

        A step that already has a checkpoint is not saved again. `metrics` rank the checkpoint
        when `best_metric` is set (and are ignored otherwise); a checkpoint saved without them
        is kept only while it is among the last `keep`.
        """
        if not (force or step % self.save_every == 0) or step in self._manager.all_steps():
            return False
        ranked = None
        if self.best_metric is not None and metrics is not None:
            if self.best_metric not in metrics:
                raise ValueError(
                    f"metrics: expected the best metric {self.best_metric!r}, got keys "
                    f"{sorted(metrics)}"
                )
            ranked = {key: float(value) for key, value in metrics.items()}
        items = {_STATE: ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items[_DATA] = DataSave(data_iterator)
        if self.metadata is not None:
            items[_METADATA] = ocp.args.JsonSave(self.metadata)
        return self._manager.save(
            step, args=ocp.args.Composite(**items), metrics=ranked, force=True
        )

    def restore(self, abstract_state: Any, *, data_iterator: Any = None) -> tuple[Any, int] | None:
        """The latest checkpoint as `(state, step)`, or None when there is none.

        `abstract_state` is the state's pytree of `jax.ShapeDtypeStruct`s whose `sharding`s say
        where each array goes: the mesh may differ from the one that saved it. `data_iterator`
        (a grain iterator) is set to the saved position, so it continues where the saved run
        was.

        Raises `ValueError` when the saved `metadata` differs from this run's. Raises
        `RuntimeError` when the latest checkpoint cannot be read (missing or damaged files, a
        state of another structure): it never falls back to an older step silently, and
        deletes nothing; the message says which step folder to move away to resume from the
        previous one.
        """
        step = self._manager.latest_step()
        if step is None:
            return None
        if self.metadata is not None:
            self._check_metadata(step)
        items = {_STATE: ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            items[_DATA] = DataRestore(data_iterator)
        restored = self._restore(step, items)
        return restored[_STATE], step

    def wait(self) -> None:
        """Blocks until every started save is on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for the saves in flight and releases the manager's threads."""
        self._manager.close()

    def _check_metadata(self, step: int) -> None:
        if not (self.directory / str(step) / _METADATA).exists():
            return
        saved = self._restore(step, {_METADATA: ocp.args.JsonRestore()})[_METADATA]
        differing = sorted(
            key
            for key in saved.keys() | self.metadata.keys()
            if saved.get(key) != self.metadata.get(key)
        )
        if differing:
            details = "; ".join(
                f"{key}: saved {saved.get(key)!r}, now {self.metadata.get(key)!r}"
                for key in differing
            )
            raise ValueError(
                f"metadata: the checkpoint of step {step} in {self.directory} was saved by a "
                f"different run ({details}). Resume with the same settings, or use a new "
                "directory."
            )

    def _restore(self, step: int, items: dict[str, Any]) -> Any:
        try:
            return self._manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as error:
            older = [s for s in self._manager.all_steps() if s < step]
            fallback = f"resume from step {older[-1]}" if older else "start afresh"
            step_folder = self.directory / str(step)
            raise RuntimeError(
                f"{self.directory}: the checkpoint of step {step} could not be restored "
                f"({_cause(error)}); nothing was deleted. If it is damaged (files missing "
                f"or cut short), move {step_folder} out of the directory to {fallback}; if the "
                "model, optimizer or data pipeline changed since it was saved, use a new "
                "directory."
            ) from None
