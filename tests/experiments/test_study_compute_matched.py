"""Study 10 (`experiments/compute_matched.py`): bad configs fail at start; the evaluation rows
come from the metrics the loop writes; the verdict reads the direction of the paper's claim
from the numbers."""

from __future__ import annotations

import pytest

from experiments.compute_matched import STUDY, curve_rows, verdict
from experiments.study import Summary, load_config, run_study


def quick_config():
    return load_config("compute_matched", "quick")


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(mixers=("attention", "qlstm")), r"config\.mixers: unknown entry 'qlstm'"),
        (dict(budget_seconds=0.0), r"config\.budget_seconds: expected a positive number"),
        (dict(calibration_steps=1), r"config\.calibration_steps: expected an integer >= 2"),
        (dict(machine="tpu: 8 x TPU v5"), r"config\.machine: the config is for 'tpu: 8 x TPU v5'"),
        (
            dict(mixer_options={"attention": {"num_heads": 5}}),
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


def test_each_evaluation_is_a_row_and_the_last_is_at_the_budget():
    # A run planned for 100 steps that the budget stopped at step 70, evaluated every 25.
    records = [
        {"step": 25, "train/seconds": 1.0, "train/tokens_seen": 2500},
        {"step": 25, "eval/loss": 2.0},
        {"step": 50, "train/seconds": 2.0, "train/tokens_seen": 5000},
        {"step": 50, "eval/loss": 1.5},
        {"step": 60, "train/seconds": 2.4, "train/tokens_seen": 6000},
        {"step": 70, "train/seconds": 2.8, "train/tokens_seen": 7000},
        {"step": 70, "eval/loss": 1.4},
    ]
    rows = curve_rows(records, last_step=70, steps=100, tokens_per_step=100)
    assert [r["budget_fraction"] for r in rows] == [0.25, 0.5, 1.0]
    assert [r["seconds"] for r in rows] == [1.0, 2.0, 2.8]
    assert rows[-1]["tokens_seen"] == 7000
    assert rows[-1]["tokens_per_second"] == pytest.approx(69 * 100 / 2.8)
    assert rows[0]["bits_per_byte"] == pytest.approx(2.0 / 0.6931471805599453)


def summary_of(losses: dict[tuple[str, float], float], speed: dict[str, float]) -> Summary:
    rows = [
        dict(
            mixer=mixer,
            budget_fraction=fraction,
            bits_per_byte=(loss, 0.0, 1),
            tokens_per_second=(speed[mixer], 0.0, 1),
        )
        for (mixer, fraction), loss in losses.items()
    ]
    return Summary(rows, [0], {"machine": "cpu: 1 x cpu"})


def test_the_verdict_follows_the_losses_and_the_throughputs():
    speed = {"attention": 3000.0, "lstm": 1000.0, "gla": 2000.0}
    paper = summary_of(
        {
            ("attention", 0.5): 2.0,
            ("lstm", 0.5): 2.5,
            ("attention", 1.0): 1.5,
            ("lstm", 1.0): 2.0,
            ("gla", 1.0): 1.7,
        },
        speed,
    )
    text = verdict(paper)
    assert text.startswith("the paper's direction reproduces: at the budget attention beats")
    assert "at 2 of 2 evaluations" in text and "attention reaches the lowest loss" in text
    assert "attention 3.00x, lstm 1.00x, gla 2.00x" in text
    within_noise = summary_of({("attention", 1.0): 1.99, ("lstm", 1.0): 2.0}, speed)
    assert verdict(within_noise).startswith("the paper's direction does NOT reproduce")
    assert "does not beat the LSTM (1.990 vs 2.000" in verdict(within_noise)
    reversed_ = summary_of({("attention", 1.0): 2.1, ("lstm", 1.0): 2.0}, speed)
    assert verdict(reversed_).startswith("the paper's direction does NOT reproduce")
    assert "2.100 vs 2.000" in verdict(reversed_)
