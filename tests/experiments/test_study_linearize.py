"""Study 9 (`experiments/linearize.py`): bad configs fail at start; the verdict reads the papers'
ordering of the perplexity gaps from the numbers."""

from __future__ import annotations

import pytest

from experiments.linearize import STUDY, verdict
from experiments.study import Summary, load_config, run_study


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(methods=("hedgehog", "mamba")), r"config\.methods: unknown entry 'mamba'"),
        (dict(num_heads=3), r"config\.num_heads: 3 heads do not divide width = 32"),
        (dict(lora_rank=64), r"config\.lora_rank: expected at most width = 32"),
        (dict(distill_fraction=0.1), r"config\.distill_fraction: .* need at least one step"),
        (dict(window=0), r"config\.window: expected a positive integer"),
        (dict(lora_alpha=0.0), r"config\.lora_alpha: expected a positive scale"),
    ],
)
def test_a_bad_config_fails_at_start(tmp_path, change, message):
    config = load_config("linearize", "quick")
    config.update(change)
    with pytest.raises(ValueError, match=message):
        run_study(STUDY, config, [0], tmp_path)
    assert not any(tmp_path.iterdir())


def summary_of(gaps: dict[str, float]) -> Summary:
    """A one-seed summary of the methods' gaps, with a teacher of perplexity 10 (so a verdict
    margin of 0.1)."""
    rows = [dict(method="teacher", perplexity=(10.0, 0.0, 1), gap=(0.0, 0.0, 1))]
    rows += [dict(method=method, gap=(gap, 0.0, 1)) for method, gap in gaps.items()]
    return Summary(rows, [0], {})


@pytest.mark.slow  # pure Python, but the default suite holds one test per study
def test_the_verdict_follows_the_gaps():
    paper = summary_of({"elu_swap": 3.0, "hedgehog": 1.0, "lolcats": 0.2, "liger": 0.25})
    assert verdict(paper).startswith("the papers' ordering (iii) ~ (iv) < (ii) < (i) reproduces")
    apart = summary_of({"elu_swap": 3.0, "hedgehog": 1.0, "lolcats": 0.1, "liger": 0.8})
    assert verdict(apart).startswith("the papers' strict ordering (iii), (iv) < (ii) < (i)")
    assert "LoLCATs and Liger are not close" in verdict(apart)
    part = summary_of({"elu_swap": 3.0, "hedgehog": 1.0, "lolcats": 1.5, "liger": 0.5})
    assert verdict(part).startswith("the papers' ordering reproduces in part (2 of 3")
    within_noise = summary_of({"elu_swap": 1.05, "hedgehog": 1.0, "lolcats": 0.2, "liger": 0.25})
    assert verdict(within_noise).startswith("the papers' ordering reproduces in part (2 of 3")
    assert "(ii) Hedgehog >= (i) elu+1 swap" in verdict(within_noise)
    reversed_ = summary_of({"elu_swap": 0.5, "hedgehog": 1.0, "lolcats": 2.0, "liger": 3.0})
    assert verdict(reversed_).startswith("the papers' ordering does NOT reproduce")
    assert verdict(summary_of({"hedgehog": 1.0})).startswith("not all four methods were run")
