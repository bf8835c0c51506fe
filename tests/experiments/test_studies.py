"""The studies of `experiments/`: a representative one end to end in-process (results record,
table, figure, verdict, the docs page), bad configs failing at start, and every study's
`--quick` command (slow job)."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from experiments import report
from experiments.study import beats, fit_and_evaluate, load_config, run_study

ROOT = Path(__file__).resolve().parents[2]


def test_a_study_records_tabulates_plots_and_reports(tmp_path):
    study = importlib.import_module("experiments.forms").STUDY
    config = load_config("forms", "quick")
    config.ops, config.lengths = ("decayed_linear_attention",), (40,)
    summary = run_study(study, config, [0, 1], tmp_path)
    records = [json.loads(line) for line in (tmp_path / "forms" / "quick.jsonl").open()]
    assert [r["seed"] for r in records] == [0, 1]
    assert {"commit", "config_hash", "config", "corpus_hash", "seconds"} <= set(records[0])
    assert records[0]["config"]["ops"] == ["decayed_linear_attention"]
    # The forms compute one function: a real check, not a formality of the plumbing.
    for row in summary.rows:
        assert row["value_error"][0] < 1e-4 and row["grad_error"][0] < 1e-4, row
        assert row["fwd_ms"][2] == 2  # both seeds aggregated
    assert summary.seeds == [0, 1]
    table = (tmp_path / "forms" / "quick.md").read_text()
    assert "| op | form | length |" in table and "--seeds=0,1" in table
    assert "Verdict: the forms agree" in table
    assert (tmp_path / "forms" / "quick.png").stat().st_size > 1000

    # A recorded seed is not rerun; the table is rebuilt from the records.
    run_study(study, config, [1], tmp_path)
    assert len((tmp_path / "forms" / "quick.jsonl").read_text().splitlines()) == 2

    page = report.build(tmp_path, tmp_path / "docs" / "results.md")
    assert "## 7. Forms of the same layer" in page and table.strip() in page
    assert "](../forms/quick.png)" in page
    assert "Reading" not in page
    (tmp_path / "forms" / "quick.reading.md").write_text("The quick size means nothing.\n")
    page = report.build(tmp_path, tmp_path / "docs" / "results.md")
    assert (
        "![Forms of the same layer, quick](../forms/quick.png)\n\n**Reading** (by hand): "
        "The quick size means nothing." in page
    )


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(ops=("gla", "mamba3")), r"config\.ops: unknown entry 'mamba3'"),
        (dict(forms=("parallel", "chunked")), r"config\.forms: must include 'recurrent'"),
        (dict(heads=0), r"config\.heads: expected a positive integer"),
        (dict(size="huge"), r"config\.size: expected one of"),
    ],
)
def test_a_bad_config_fails_at_start(tmp_path, change, message):
    study = importlib.import_module("experiments.forms").STUDY
    config = load_config("forms", "quick")
    config.update(change)
    with pytest.raises(ValueError, match=message):
        run_study(study, config, [0], tmp_path)
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("name", report.STUDIES)
def test_every_study_runs_its_quick_command(tmp_path, name):
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    command = [
        sys.executable,
        "-m",
        f"experiments.{name}",
        f"--config=configs/studies/{name}.py:quick",
        "--seeds=0",
        f"--results={tmp_path}",
    ]
    subprocess.run(command, cwd=ROOT, env=env, check=True, timeout=300)
    assert (tmp_path / name / "quick.md").exists() and (tmp_path / name / "quick.png").exists()


def test_beats_needs_a_difference_beyond_the_margin_and_the_seeds_spread():
    assert beats(0.56, 0.5) and not beats(0.54, 0.5) and not beats(0.5, 0.56)
    assert beats((0.7, 0.05, 3), (0.5, 0.05, 3))  # 0.2 against 2 x 0.041
    assert not beats((0.7, 0.2, 3), (0.5, 0.2, 3))  # 0.2 against 2 x 0.163
    assert beats(0.5, 0.45, margin=0.01) and not beats(0.5, 0.45, margin=0.1)


def test_a_preempted_training_stops_the_study(monkeypatch):
    """SIGTERM makes `fit` save and return early; a study must not record that model."""
    import seqjax.train.loop

    monkeypatch.setattr(
        seqjax.train.loop, "fit", lambda config, workdir: (None, {"preempted": True})
    )
    with pytest.raises(SystemExit, match="SIGTERM"):
        fit_and_evaluate(load_config("recall", "quick"), {})
