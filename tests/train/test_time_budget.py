"""A wall-clock budget for training (`config.train.max_seconds`): the loop stops after the step
during which it runs out, evaluates and saves that step, and records training time and tokens
seen in the summary and at every logged step."""

import math

import pytest
from run_config import get_config

from seqjax.train.config import validate
from seqjax.train.loop import fit
from seqjax.train.metrics import read_metrics


def test_a_budget_stops_training_early_and_says_so(tmp_path):
    config = get_config()
    config.train.steps = 100_000
    config.optimizer.warmup_steps = 0
    config.train.log_every = 20
    config.train.eval_every = 50
    config.train.checkpoint_every = 100_000
    config.train.max_seconds = 0.5
    _, summary = fit(config, tmp_path)

    steps = summary["steps"]
    assert summary["stopped_by_budget"] and 1 < steps < config.train.steps
    # The step that ran out of time ends the run: the clock passed the budget during it.
    assert 0.5 <= summary["seconds"] < 1.5
    assert summary["tokens_seen"] == steps * config.data.batch_size * config.data.length
    assert summary["latest_checkpoint"] == steps

    records = read_metrics(tmp_path)
    train = {r["step"]: r for r in records if "train/seconds" in r}
    evals = [r["step"] for r in records if "eval/loss" in r]
    assert evals[-1] == steps and set(evals) <= set(train)
    assert train[steps]["train/seconds"] == summary["seconds"]
    times = [train[s]["train/seconds"] for s in sorted(train)]
    assert times == sorted(times)
    for step, record in train.items():
        assert record["train/tokens_seen"] == step * config.data.batch_size * config.data.length


@pytest.mark.parametrize("value", [-1.0, math.nan, math.inf])
def test_a_bad_budget_is_named(value):
    config = get_config()
    config.train.max_seconds = value
    with pytest.raises(ValueError, match=r"config\.train\.max_seconds: expected finite seconds"):
        validate(config)


@pytest.mark.parametrize("value", [0.0, None, 30])
def test_zero_none_or_a_number_of_seconds_is_a_valid_budget(value):
    config = get_config()
    config.train.max_seconds = value
    validate(config)
