"""Study 1 (`experiments/state_tracking.py`): bad configs fail at start; the verdict reads the
direction of the paper's claim from the numbers."""

from __future__ import annotations

import pytest

from experiments.state_tracking import STUDY, verdict
from experiments.study import Summary, load_config, run_study


def quick_config():
    return load_config("state_tracking", "quick")


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(models=("diag_lrnn[0,1]", "mamba3")), r"config\.models: unknown entry 'mamba3'"),
        (dict(tasks=("parity", "sorting")), r"config\.tasks: unknown entry 'sorting'"),
        (
            dict(tasks=("modular_arithmetic",), test_lengths=(8, 15)),
            r"config\.test_lengths: modular_arithmetic at 15: .*even",
        ),
        (
            dict(models=("attention",), mixer_options={"attention": {"num_heads": 5}}),
            r"config\.mixer_options\.attention\.num_heads: .* must divide width",
        ),
    ],
)
def test_a_bad_config_fails_at_start(tmp_path, change, message):
    config = quick_config()
    config.update(change)
    with pytest.raises(ValueError, match=message):
        run_study(STUDY, config, [0], tmp_path)
    assert not any(tmp_path.iterdir())


def summary_of(accuracy: dict[tuple[str, str], float]) -> Summary:
    rows = [
        dict(task=task, model=model, test_length=length, accuracy=(value, 0.0, 1))
        for (task, model), value in accuracy.items()
        for length in (40, 256)
    ]
    return Summary(rows, [0], {})


def test_the_verdict_follows_the_mean_accuracies():
    paper_accuracies = {
        ("parity", "diag_lrnn[-1,1]"): 1.0,
        ("parity", "diag_lrnn[0,1]"): 0.5,
        ("parity", "delta_net(0,2)"): 0.9,
        ("parity", "delta_net(0,1)"): 0.5,
    }
    paper = summary_of(paper_accuracies)
    assert verdict(paper).startswith("the paper's direction reproduces:")
    reversed_ = summary_of({("parity", "diag_lrnn[-1,1]"): 0.5, ("parity", "diag_lrnn[0,1]"): 0.6})
    assert verdict(reversed_).startswith("the paper's direction does NOT reproduce")
    assert "0.500 vs 0.600" in verdict(reversed_)
    within_noise = summary_of(
        {
            ("parity", "diag_lrnn[-1,1]"): 0.54,
            ("parity", "diag_lrnn[0,1]"): 0.5,
            ("parity", "lstm"): 0.9,
        }
    )
    assert verdict(within_noise).startswith("the paper's direction does NOT reproduce")
    # Nothing learned modular counting, not even the control: it is named, not counted.
    at_chance = {
        ("modular_counting", m): 0.35 for m in ("diag_lrnn[-1,1]", "diag_lrnn[0,1]", "lstm")
    }
    text = verdict(summary_of({**at_chance, **dict(paper_accuracies)}))
    assert text.startswith("the paper's direction reproduces: parity")
    assert text.endswith(
        "no model, the controls included, beats chance on it: modular_counting (chance 0.333)."
    )
    assert verdict(summary_of(at_chance)).startswith("nothing to compare; untested")
