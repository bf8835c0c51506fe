"""The training config: an `ml_collections.ConfigDict` with every field and its default, and
the validation that runs before anything is built.

A config file in `configs/` defines `get_config()`, which starts from `default_config()` and
sets what differs; the command line overrides any field (`--config.train.steps=100`). The
defaults are locked, so a misspelt override fails at parse time instead of being ignored.

    seed                  initialization seed
    data.task             a name of `seqjax.data.TASKS`; data.options its settings (the train
                          source); data.eval_options what the held-out source changes (a
                          different seed, a split, longer lengths)
    data.seed             the order in which the training examples are read (shuffling)
    data.batch_size       the global batch (all hosts together), in rows of data.length tokens
    data.packing          "pad" (one example per row), "pack" (documents packed with
                          segment ids) or "decompose" (Dataset Decomposition: each step one
                          length bucket, rows of data.min_length to data.length tokens, the
                          same data.batch_size * data.length tokens per step; evaluation packs)
    data.num_shards       the data's shards (0: one per host); the global batches depend on
                          it, not on the number of hosts reading them
    model                 the fields of `seqjax.models.LanguageModelConfig` but vocab_size,
                          which comes from the data
    optimizer             AdamW with warmup and decay, clipping, weight-decay mask;
                          optimizer.frozen: regular expressions of the parameters' '/'-joined
                          paths that are not trained (`seqjax.train.optimizer`)
    train                 steps, accumulation, logging, evaluation and checkpoint cadence
    train.max_seconds     a wall-clock budget for training (0 or None: none): the run stops
                          after the step during which it runs out, then evaluates and saves
                          as at the last step. The clock counts train steps only, from the end
                          of the run's first step (which compiles) and without evaluations and
                          checkpoint saves; a resumed run starts it again. The learning-rate
                          schedule still runs over train.steps: set the steps from a measured
                          throughput, steps = max_seconds * tokens_per_second / (batch_size *
                          length) (Languini's protocol), so that the schedule completes and
                          the budget is only the safety net
    mesh                  data x fsdp x tensor x sequence (-1: the remaining devices);
                          sequence > 1 splits every row's time axis over that many devices,
                          and the mixers run the sequence-parallel forms of their ops
                          (`seqjax.parallel.dispatch`)
"""

from __future__ import annotations

import ml_collections

from seqjax.data.pipeline import PACKINGS as ROW_PACKINGS
from seqjax.train.optimizer import DECAYS, compile_patterns

PACKINGS = (*ROW_PACKINGS, "decompose")


def default_config() -> ml_collections.ConfigDict:
    """Every field with its default (a small GLA on MQAR)."""
    config = ml_collections.ConfigDict()
    config.seed = 0

    config.data = ml_collections.ConfigDict()
    config.data.task = "mqar"
    config.data.options = ml_collections.ConfigDict({"seed": 0})
    config.data.eval_options = ml_collections.ConfigDict({"seed": 1})
    config.data.seed = 0
    config.data.batch_size = 64
    config.data.length = 128
    config.data.packing = "pad"
    config.data.min_length = 32
    config.data.num_shards = 0
    config.data.worker_count = 0

    config.model = ml_collections.ConfigDict()
    config.model.width = 64
    config.model.layers = ("gla", "gla")
    config.model.mixer_options = ml_collections.ConfigDict()
    config.model.mlp = ml_collections.FieldReference(None, field_type=bool)
    config.model.mlp_hidden = ml_collections.FieldReference(None, field_type=int)
    config.model.mlp_multiple_of = 64
    config.model.norm_eps = 1e-6
    config.model.scan_layers = True
    config.model.remat = "none"
    config.model.tie_embeddings = False

    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.learning_rate = 1e-3
    config.optimizer.weight_decay = 0.1
    config.optimizer.b1 = 0.9
    config.optimizer.b2 = 0.95
    config.optimizer.eps = 1e-8
    config.optimizer.clip_norm = 1.0
    config.optimizer.warmup_steps = 100
    config.optimizer.decay = "cosine"
    config.optimizer.final_fraction = 0.1
    config.optimizer.frozen = ()

    config.train = ml_collections.ConfigDict()
    config.train.steps = 1000
    config.train.accumulation_steps = 1
    config.train.log_every = 10
    config.train.eval_every = 200
    config.train.eval_batches = 8
    config.train.checkpoint_every = 200
    config.train.keep_checkpoints = 2
    config.train.best_metric = "eval/loss"
    config.train.max_seconds = 0.0

    config.mesh = ml_collections.ConfigDict()
    config.mesh.data = -1
    config.mesh.fsdp = 1
    config.mesh.tensor = 1
    config.mesh.sequence = 1
    return config


def _fail(field: str, message: str):
    raise ValueError(f"config.{field}: {message}")


def _positive(config: ml_collections.ConfigDict, *fields: str) -> None:
    for field in fields:
        section, name = field.split(".")
        value = config[section][name]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            _fail(field, f"expected a positive int, got {value!r}")


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks every field's type and range (a `ValueError` naming `config.<field>`); the model
    and data fields are checked again, in full, by their own configs when they are built."""
    _positive(
        config,
        "data.batch_size",
        "data.length",
        "train.steps",
        "train.accumulation_steps",
        "train.log_every",
        "train.eval_every",
        "train.eval_batches",
        "train.checkpoint_every",
        "train.keep_checkpoints",
        "model.width",
    )
    if config.data.packing not in PACKINGS:
        _fail("data.packing", f"expected one of {list(PACKINGS)}, got {config.data.packing!r}")
    if config.data.packing == "decompose":
        for field in ("length", "min_length"):
            value = config.data[field]
            if not isinstance(value, int) or value < 1 or value & (value - 1):
                _fail(f"data.{field}", f"decompose needs a power of two, got {value!r}")
        if config.data.min_length > config.data.length:
            _fail("data.min_length", f"expected <= data.length = {config.data.length}")
    if config.optimizer.decay not in DECAYS:
        _fail("optimizer.decay", f"expected one of {list(DECAYS)}, got {config.optimizer.decay!r}")
    if not config.optimizer.learning_rate > 0:
        _fail("optimizer.learning_rate", f"expected > 0, got {config.optimizer.learning_rate!r}")
    if not config.optimizer.weight_decay >= 0:
        _fail("optimizer.weight_decay", f"expected >= 0, got {config.optimizer.weight_decay!r}")
    if not 0 <= config.optimizer.final_fraction <= 1:
        _fail("optimizer.final_fraction", "expected a fraction in [0, 1]")
    compile_patterns(config.optimizer.frozen, "config.optimizer.frozen")
    if not 0 <= config.optimizer.warmup_steps <= config.train.steps:
        _fail(
            "optimizer.warmup_steps",
            f"expected 0 <= warmup_steps <= train.steps = {config.train.steps}, "
            f"got {config.optimizer.warmup_steps!r}",
        )
    max_seconds = config.train.max_seconds
    if max_seconds is not None and (
        not isinstance(max_seconds, int | float)
        or isinstance(max_seconds, bool)
        or not 0 <= max_seconds < float("inf")
    ):
        _fail(
            "train.max_seconds",
            f"expected finite seconds >= 0 (0 or None: no budget), got {max_seconds!r}",
        )
    if config.data.worker_count < 0:
        _fail("data.worker_count", f"expected >= 0, got {config.data.worker_count!r}")
    if config.data.batch_size % config.train.accumulation_steps:
        _fail(
            "train.accumulation_steps",
            f"{config.train.accumulation_steps} does not divide data.batch_size = "
            f"{config.data.batch_size}",
        )
    if not config.model.layers:
        _fail("model.layers", "expected at least one mixer name")
