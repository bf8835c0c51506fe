"""Study 3, just read twice (`experiments/jrt.py`): bad configs fail at start, JRT-RNN's
prefix is the context before the first question of each task, and the verdict does not read a
direction into a task the linear attention never learned."""

from __future__ import annotations

import numpy as np
import pytest

from experiments.jrt import STUDY, VARIANTS, train_config
from experiments.study import Summary, load_config, run_study
from seqjax.data import IGNORE, make_source


def quick_config():
    return load_config("jrt", "quick")


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(models=("based", "mamba9")), r"config\.models: unknown entry 'mamba9'"),
        (dict(tasks=("mqar", "parity")), r"config\.tasks: unknown entry 'parity'"),
        (dict(mqar=dict(length=10)), r"config\.mqar: two_passes: length: expected at least .* 12"),
        (dict(sd=dict(small_set=6)), r"config\.sd\.small_set: expected fewer elements"),
        (dict(short_conv=("based", "lstm")), r"config\.short_conv: unknown entry 'lstm'"),
    ],
)
def test_a_bad_config_fails_at_start(tmp_path, change, message):
    config = quick_config()
    config.update(change)
    with pytest.raises(ValueError, match=message):
        run_study(STUDY, config, [0], tmp_path)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("task, variant", [(t, v) for t, vs in VARIANTS.items() for v in vs])
def test_jrt_rnn_reads_the_whole_context_before_the_first_question_as_its_prefix(task, variant):
    train = train_config(quick_config(), task, variant, "jrt_rnn", seed=0)
    prefix = train.model.mixer_options.jrt_rnn.prefix_length
    source = make_source(task, **train.data.options.to_dict())
    for index in range(20):
        example = source[index]
        assert len(example["inputs"]) == train.data.length
        first_question = int(np.flatnonzero(example["targets"] != IGNORE)[0])
        assert first_question >= prefix
    if task == "mqar":  # the key-value block(s), whatever the queries' positions
        assert prefix == 2 * train.data.options.num_kv_pairs * train.data.options.num_passes
    else:  # both sets: everything but the question
        assert prefix == first_question == train.data.length - 1


def jrt_summary(accuracies):
    """A one-seed summary from `{(task, variant, model): accuracy}`."""
    rows = [
        dict(task=t, variant=v, model=m, accuracy=(a, 0.0, 1))
        for (t, v, m), a in accuracies.items()
    ]
    return Summary(rows, [0], {})


def test_verdict_calls_a_task_at_chance_untested_and_reads_the_others():
    accuracies = {
        ("mqar", "one_pass", "based"): 0.55,
        ("mqar", "two_passes", "based"): 0.70,
        ("set_disjointness", "small_first", "based"): 0.52,
        ("set_disjointness", "small_second", "based"): 0.49,
    }
    text = STUDY.verdict(jrt_summary(accuracies))
    assert (
        "mqar (two passes minus one): based +0.150; for linear attention (based) the "
        "direction reproduces" in text
    )
    assert "no better than chance (0.5) in either variant, so the direction is untested" in text
    accuracies[("set_disjointness", "small_first", "based")] = 0.60
    text = STUDY.verdict(jrt_summary(accuracies))
    assert (
        "small second): based +0.110; for linear attention (based) the direction reproduces" in text
    )
    accuracies[("set_disjointness", "small_second", "based")] = 0.62
    assert "direction does NOT reproduce" in STUDY.verdict(jrt_summary(accuracies))
