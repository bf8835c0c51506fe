"""The metrics writer: JSON lines appended across runs, TensorBoard scalars, log lines or a
progress bar depending on the terminal."""

from __future__ import annotations

import io
import json
import struct
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from seqjax.train.metrics import METRICS_FILE, MetricsWriter, read_metrics


def event_scalars(directory: Path) -> dict[tuple[str, int], float]:
    """`(tag, step) -> value` of every scalar in the directory's event files, read from their
    TFRecord framing (length, its CRC, the `Event` proto, its CRC)."""
    scalars = {}
    for path in sorted(directory.glob("events.out.tfevents.*")):
        data, offset = path.read_bytes(), 0
        while offset < len(data):
            (length,) = struct.unpack_from("<Q", data, offset)
            event = event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                scalars[value.tag, event.step] = value.simple_value
    return scalars


def test_each_write_appends_one_json_line(tmp_path):
    with MetricsWriter(tmp_path, total_steps=10, log_every=1) as writer:
        writer.write(1, {"loss": 2.5, "learning_rate": 1e-3})
        writer.write(2, {"loss": 2.0, "accuracy": 0.25}, prefix="eval")
    lines = (tmp_path / METRICS_FILE).read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"step": 1, "train/loss": 2.5, "train/learning_rate": 1e-3},
        {"step": 2, "eval/loss": 2.0, "eval/accuracy": 0.25},
    ]
    assert read_metrics(tmp_path) == [json.loads(line) for line in lines]


def test_a_resumed_run_appends_to_the_same_file(tmp_path):
    with MetricsWriter(tmp_path, total_steps=10, log_every=1) as writer:
        writer.write(1, {"loss": 3.0})
        writer.write(2, {"loss": 2.0})
    with MetricsWriter(tmp_path, total_steps=10, log_every=1) as writer:
        writer.write(3, {"loss": 1.0})
    assert [record["step"] for record in read_metrics(tmp_path)] == [1, 2, 3]
    assert event_scalars(tmp_path) == {
        ("train/loss", 1): 3.0,
        ("train/loss", 2): 2.0,
        ("train/loss", 3): 1.0,
    }


def test_event_files_hold_the_scalars(tmp_path):
    with MetricsWriter(tmp_path, total_steps=10, log_every=1) as writer:
        writer.write(5, {"loss": 1.5, "grad_norm": 0.75})
        writer.write(6, {"loss": 0.5}, prefix="eval")
    assert event_scalars(tmp_path) == {
        ("train/loss", 5): 1.5,
        ("train/grad_norm", 5): 0.75,
        ("eval/loss", 6): 0.5,
    }


def test_jax_and_numpy_scalars_are_written_as_floats(tmp_path):
    metrics = {"loss": jnp.float32(1.25), "count": np.int64(7), "lr": jnp.asarray(0.5)}
    with MetricsWriter(tmp_path, total_steps=10, log_every=1) as writer:
        writer.write(jnp.int32(4), metrics)
    (record,) = read_metrics(tmp_path)
    assert record == {"step": 4, "train/loss": 1.25, "train/count": 7.0, "train/lr": 0.5}
    assert all(type(record[key]) is float for key in ("train/loss", "train/count", "train/lr"))


def test_a_metric_that_is_not_a_scalar_is_rejected_by_name(tmp_path):
    with MetricsWriter(tmp_path, total_steps=10, log_every=1) as writer:
        with pytest.raises(ValueError, match=r"metrics\['loss'\]: expected a real scalar"):
            writer.write(1, {"loss": jnp.ones(3)})


def test_without_a_terminal_a_line_is_printed_every_log_every_steps(tmp_path, capsys):
    with MetricsWriter(tmp_path, total_steps=25, log_every=10) as writer:
        for step in range(1, 26):
            writer.write(step, {"loss": 1.0 / step, "tokens_per_second": 1000.0})
        writer.write(25, {"loss": 0.5}, prefix="eval")
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        "train step 10/25: loss 0.1, tokens_per_second 1000",
        "train step 20/25: loss 0.05, tokens_per_second 1000",
        "train step 25/25: loss 0.04, tokens_per_second 1000",
        "eval step 25/25: loss 0.5",
    ]


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_on_a_terminal_training_steps_move_a_progress_bar(tmp_path, capsys, monkeypatch):
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    with MetricsWriter(tmp_path, total_steps=20, log_every=5) as writer:
        for step in range(1, 11):
            writer.write(step, {"loss": 2.0})
    assert capsys.readouterr().out == ""
    assert "10/20" in terminal.getvalue()
    assert "loss 2" in terminal.getvalue()


def test_only_process_zero_writes(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    with MetricsWriter(tmp_path / "run", total_steps=10, log_every=1) as writer:
        writer.write(1, {"loss": 1.0})
    assert not (tmp_path / "run").exists()
    assert capsys.readouterr().out == ""


def test_reading_a_directory_without_metrics_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"directory: expected metrics\.jsonl"):
        read_metrics(tmp_path)


def test_bad_arguments_are_rejected_by_name(tmp_path):
    with pytest.raises(ValueError, match=r"^log_every: expected a positive int"):
        MetricsWriter(tmp_path, total_steps=10, log_every=0)
