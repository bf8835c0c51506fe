"""The training loop: config in, trained and checkpointed model out, on one device or a mesh.

    state = restore(workdir) or init(config)
    while step < train.steps and the time budget (train.max_seconds) lasts:
        batch = next(data)                      # this host's rows of the global batch
        state, metrics = train_step(state, batch)
        log / evaluate / checkpoint on their cadence
    save, evaluate, summarize

Restarting with the same workdir continues from the last checkpoint: parameters, optimizer
state and the data iterator's position, so the run sees the same batches as an uninterrupted
one. SIGTERM (a preempted job) saves a checkpoint at the current step and returns cleanly.

Time is training time (`TrainClock`): the train steps of this call but its first, which
compiles, without evaluations and checkpoint saves. Every train record of the metrics carries
`seconds` (that time so far) and `tokens_seen` (`step * batch_size * length`, padding
included), and every evaluation has a train record at its step, so that loss can be drawn
against time and tokens; `step_time` and `tokens_per_second` are over the steps since the
previous record. A budget (`train.max_seconds`) stops training after the step during which it
runs out, which is then evaluated and saved as the last step would be. The learning-rate
schedule runs over `train.steps` regardless: Languini's protocol sets the steps from a
measured throughput so that the schedule completes within the budget, which is then only
the safety net.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from seqjax.data import make_source
from seqjax.data.pipeline import host_batches
from seqjax.models import LanguageModelConfig, build
from seqjax.parallel import BATCH_AXES, SEQUENCE, batch_sharding, make_mesh
from seqjax.train.checkpoint import Checkpointer
from seqjax.train.config import validate
from seqjax.train.metrics import MetricsWriter
from seqjax.train.optimizer import learning_rate_schedule, optimizer
from seqjax.train.state import abstract_state, init_state
from seqjax.train.step import compile_steps


def model_config(config: ml_collections.ConfigDict, vocab_size: int) -> LanguageModelConfig:
    """The model of `config.model` over the data's vocabulary."""
    fields = config.model.to_dict()
    try:
        return LanguageModelConfig(vocab_size=vocab_size, **fields)
    except (TypeError, ValueError) as error:
        raise ValueError(f"config.model.{error}") from None


def sources(config: ml_collections.ConfigDict):
    """`(train, eval)` sources of `config.data`: eval is train's options updated by
    `eval_options`."""
    options = config.data.options.to_dict()
    held_out = {**options, **config.data.eval_options.to_dict()}
    return make_source(config.data.task, **options), make_source(config.data.task, **held_out)


def check_batch(config: ml_collections.ConfigDict, mesh) -> None:
    """Checks that the global batch splits evenly over the data's shards and (per
    micro-batch) over the mesh's data-parallel devices, and that every row length splits
    over the sequence devices, all of which one host feeds."""
    batch = config.data.batch_size
    ways = int(np.prod([mesh.shape[axis] for axis in BATCH_AXES]))
    micro = batch // config.train.accumulation_steps
    if micro % ways:
        axes = " x ".join(str(mesh.shape[axis]) for axis in BATCH_AXES)
        raise ValueError(
            f"config.data.batch_size: {batch} rows (/ train.accumulation_steps = "
            f"{config.train.accumulation_steps}) do not split over the {ways} data-parallel "
            f"devices of the mesh (data x fsdp = {axes})"
        )
    check_sequence_axis(config, mesh)
    shards = config.data.num_shards or jax.process_count()
    if shards % jax.process_count():
        raise ValueError(
            f"config.data.num_shards: {shards} shards do not split over {jax.process_count()} hosts"
        )
    if batch % shards:
        raise ValueError(
            f"config.data.batch_size: {batch} rows do not split into {shards} data shards"
        )


def check_sequence_axis(config: ml_collections.ConfigDict, mesh) -> None:
    """Every row length (data.length; data.min_length too when decomposing) must split over
    the `sequence` devices, and each group of them must sit on one host, which reads whole
    rows."""
    devices = mesh.shape[SEQUENCE]
    fields = ["length"] + (["min_length"] if config.data.packing == "decompose" else [])
    for field in fields:
        length = config.data[field]
        if length % devices:
            raise ValueError(
                f"config.data.{field}: {length} tokens do not split over the {devices} devices "
                f"of the mesh's sequence axis (mesh.sequence)"
            )
    if isinstance(mesh, Mesh):
        groups = np.vectorize(lambda d: d.process_index)(mesh.devices).reshape(-1, devices)
        if np.any(groups != groups[:, :1]):
            raise ValueError(
                f"config.mesh.sequence: {devices} devices span several hosts; a host reads "
                f"whole rows, so the sequence axis must fit in one host's devices"
            )


def corpus_record(source) -> dict[str, Any]:
    """What identifies the training data: a text corpus's content hash and file list (the
    standard library differs between Python versions); empty for generated tasks, whose
    options say everything."""
    if not hasattr(source, "content_hash"):
        return {}
    return {"content_hash": source.content_hash, "files": list(source.files)}


def run_metadata(config: ml_collections.ConfigDict, source) -> dict[str, Any]:
    """What a resumed run must share with the run that saved the checkpoint: the model, the
    data and its order (not the step count, which a resume may raise)."""
    data = config.data
    return {
        "model": config.model.to_dict(),
        "data": {
            "task": data.task,
            "options": data.options.to_dict(),
            "seed": data.seed,
            "batch_size": data.batch_size,
            "length": data.length,
            "packing": data.packing,
            "content_hash": getattr(source, "content_hash", None),
        },
    }


class Preemption:
    """Turns SIGTERM into a flag the loop polls, so a preempted job saves before it exits."""

    def __init__(self):
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def restore(self):
        signal.signal(signal.SIGTERM, self._previous)


class TrainClock:
    """The training wall time of one `fit` call: the time of its train steps but the first
    (which compiles the train step), without evaluations and checkpoint saves.

    Steps run asynchronously, so `lap` waits for the latest step before reading the time: the
    time since the clock last (re)started then holds every step up to it and nothing else.
    `resume` restarts the clock after the bookkeeping that follows a lap."""

    def __init__(self):
        self.seconds = 0.0
        self._since: float | None = None

    def lap(self, metrics: Any) -> None:
        """Waits for the step that returned `metrics`, then adds the time since the clock
        (re)started; the first lap, after the compiling step, only starts it."""
        jax.block_until_ready(metrics)
        now = time.perf_counter()
        if self._since is not None:
            self.seconds += now - self._since
        self._since = now

    def resume(self) -> None:
        self._since = time.perf_counter()


def evaluate(evaluate_step, params, config, eval_source, sharding) -> dict:
    """Mean loss, accuracy (and RegBench's validity) over `train.eval_batches` held-out
    batches, the same batches at every evaluation."""
    iterator = iter(data_stream(config, eval_source, shuffle=False))
    totals: dict[str, float] = {}
    for _ in range(config.train.eval_batches):
        sums = evaluate_step(params, to_global(next(iterator), sharding))
        for key, value in jax.device_get(sums).items():
            totals[key] = totals.get(key, 0.0) + float(value)
    count = max(totals.pop("count"), 1.0)
    metrics = {"loss": totals["loss"] / count, "accuracy": totals["correct"] / count}
    if "valid" in totals:
        metrics["validity"] = totals["valid"] / count
    return metrics


def data_stream(config: ml_collections.ConfigDict, source, *, shuffle: bool):
    """This host's rows of the global batches of `config.data` (endless; see `host_batches`).
    Evaluation (`shuffle=False`) packs where training decomposes: the same held-out rows at
    every evaluation, without reading the whole held-out source for its lengths."""
    data = config.data
    packing = "pack" if data.packing == "decompose" and not shuffle else data.packing
    return host_batches(
        source,
        batch_size=data.batch_size,
        num_shards=data.num_shards or None,
        length=data.length,
        seed=data.seed,
        packing=packing,
        shuffle=shuffle,
        min_length=data.min_length,
        worker_count=data.worker_count,
    )


def to_global(local: dict[str, np.ndarray], sharding) -> dict[str, jax.Array]:
    """This host's rows as one global array per field, split over the data axes."""
    return {
        key: jax.make_array_from_process_local_data(sharding, value) for key, value in local.items()
    }


def make_optimizer(
    config: ml_collections.ConfigDict,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optimizer of `config.optimizer` over `config.train.steps`, and its schedule."""
    opt = config.optimizer
    schedule_args = dict(
        warmup_steps=opt.warmup_steps,
        total_steps=config.train.steps,
        decay=opt.decay,
        final_fraction=opt.final_fraction,
    )
    tx = optimizer(
        learning_rate=opt.learning_rate,
        weight_decay=opt.weight_decay,
        b1=opt.b1,
        b2=opt.b2,
        eps=opt.eps,
        clip_norm=opt.clip_norm,
        frozen=tuple(opt.frozen),
        **schedule_args,
    )
    return tx, learning_rate_schedule(peak=opt.learning_rate, **schedule_args)


def train(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, Any]:
    """Trains (or resumes) the run of `config` in `workdir`; returns the final summary, also
    written to `workdir/summary.json`."""
    return fit(config, workdir)[1]


def evaluate_params(config: ml_collections.ConfigDict, params) -> dict[str, float]:
    """Held-out metrics of `params` on the eval source of `config.data`, as the loop computes
    them: e.g. a trained model's at another length (set `config.data.length` and the task's
    options first)."""
    validate(config)
    _, eval_source = sources(config)
    model = build(model_config(config, eval_source.vocab_size))
    mesh = make_mesh(**config.mesh.to_dict())
    check_batch(config, mesh)
    tx, schedule = make_optimizer(config)
    _, shardings = abstract_state(model, tx, config.data.length, mesh)
    _, evaluate_step = compile_steps(model, tx, schedule, mesh, shardings)
    return evaluate(evaluate_step, params, config, eval_source, batch_sharding(mesh))


def fit(config: ml_collections.ConfigDict, workdir: str | Path) -> tuple[Any, dict[str, Any]]:
    """`train`, returning the final `TrainState` beside the summary (for scripts that go on
    to use the trained model). The summary holds the `steps` reached, the training `seconds`
    of this call (compilation, evaluation and saving excluded; see the module docstring),
    `tokens_seen`, whether the time budget stopped training early (`stopped_by_budget`), and
    the last train and eval metrics."""
    validate(config)
    workdir = Path(workdir)
    train_source, eval_source = sources(config)
    length, steps = config.data.length, config.train.steps
    model = build(model_config(config, train_source.vocab_size))
    mesh = make_mesh(**config.mesh.to_dict())
    check_batch(config, mesh)
    data_sharding = batch_sharding(mesh)
    tx, schedule = make_optimizer(config)
    abstract, shardings = abstract_state(model, tx, length, mesh)
    train_step, evaluate_step = compile_steps(
        model, tx, schedule, mesh, shardings, accumulation_steps=config.train.accumulation_steps
    )

    def evaluate_now(params):
        return evaluate(evaluate_step, params, config, eval_source, data_sharding)

    data = iter(data_stream(config, train_source, shuffle=True))
    checkpointer = Checkpointer(
        workdir / "checkpoints",
        metadata=run_metadata(config, train_source),
        save_every=config.train.checkpoint_every,
        keep=config.train.keep_checkpoints,
        best_metric=config.train.best_metric or None,
    )
    restored = checkpointer.restore(abstract, data_iterator=data)
    if restored is None:
        state = init_state(model, tx, jax.random.key(config.seed), length, shardings)
    else:
        state, _ = restored
    start = step = int(state.step)
    tokens_per_step = config.data.batch_size * length
    budget = config.train.max_seconds or None
    cadences = (config.train.log_every, config.train.eval_every, config.train.checkpoint_every)
    eval_metrics, last, stop, out_of_time = {}, {}, False, False
    clock, logged_seconds, logged_steps = TrainClock(), 0.0, 0
    preemption = Preemption()
    writer = MetricsWriter(workdir, total_steps=steps, log_every=config.train.log_every)
    try:
        while step < steps and not stop and not out_of_time:
            # Read once: a signal during this step stops the loop after this step's save.
            stop = preemption.requested
            state, metrics = train_step(state, to_global(next(data), data_sharding))
            step += 1
            timed_steps = step - start - 1  # the first step compiles: the clock starts after it
            on_cadence = any(step % every == 0 for every in cadences)
            lap = budget is not None or not timed_steps or on_cadence or step == steps or stop
            if lap:
                clock.lap(metrics)
            out_of_time = budget is not None and clock.seconds >= budget
            final = step == steps or out_of_time
            evaluated = step % config.train.eval_every == 0 or final
            # Every evaluation has a train record at its step: its time and tokens seen.
            if step % config.train.log_every == 0 or evaluated:
                last = {k: float(v) for k, v in jax.device_get(metrics).items()}
                if timed_steps > logged_steps:
                    last["step_time"] = (clock.seconds - logged_seconds) / (
                        timed_steps - logged_steps
                    )
                    last["tokens_per_second"] = tokens_per_step / last["step_time"]
                last["seconds"] = clock.seconds
                last["tokens_seen"] = step * tokens_per_step
                writer.write(step, last)
                logged_seconds, logged_steps = clock.seconds, timed_steps
            if evaluated:
                eval_metrics = evaluate_now(state.params)
                writer.write(step, eval_metrics, prefix="eval")
            checkpointer.save(
                step,
                state,
                data_iterator=data,
                metrics={f"eval/{k}": v for k, v in eval_metrics.items()} if evaluated else None,
                force=final or stop,
            )
            if lap:
                clock.resume()
        if not eval_metrics and not stop:
            # Resumed at the last step: report the model it holds.
            eval_metrics = evaluate_now(state.params)
            writer.write(step, eval_metrics, prefix="eval")
        checkpointer.wait()
    finally:
        preemption.restore()
        writer.close()
        checkpointer.close()
    summary = {
        "steps": step,
        "started_at_step": start,
        "preempted": stop,
        "stopped_by_budget": out_of_time and step < steps,
        "seconds": clock.seconds,
        "tokens_seen": step * tokens_per_step,
        "train": last,
        "eval": eval_metrics,
        "parameters": int(sum(x.size for x in jax.tree.leaves(abstract.params))),
        "data": {"task": config.data.task, **corpus_record(train_source)},
        "workdir": str(workdir),
        "latest_checkpoint": checkpointer.latest_step,
    }
    if jax.process_index() == 0:
        (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    return state, summary
