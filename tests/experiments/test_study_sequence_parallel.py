"""Study 8 (`experiments/sequence_parallel.py`): bad configs fail at start, and `run` measures on
8 emulated devices from a process that has only one."""

from __future__ import annotations

import pytest

from benchmarks.communication import received_bytes
from experiments import sequence_parallel
from experiments.study import load_config, run_study


def quick_config():
    return load_config("sequence_parallel", "quick")


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(methods=("ring", "zigzag")), r"config\.methods: unknown entry 'zigzag'"),
        (dict(heads=6), r"config\.heads: Ulysses splits heads .* 6 heads .* 8 devices"),
        (dict(lengths=(32, 60)), r"config\.lengths: T = 60 is not a positive multiple"),
        (dict(lengths=(64,)), r"config\.lengths: the scaling in T needs at least two lengths"),
        (dict(devices=1), r"config\.devices: sequence parallelism needs at least 2 devices"),
    ],
)
def test_a_bad_config_fails_at_start(tmp_path, change, message):
    config = quick_config()
    config.update(change)
    with pytest.raises(ValueError, match=message):
        run_study(sequence_parallel.STUDY, config, [0], tmp_path)
    assert not any(tmp_path.iterdir())


def test_run_measures_lasp2_on_eight_devices_from_a_one_device_process():
    config = quick_config()
    config.methods, config.lengths = ("lasp2_linear_attention",), (16,)
    rows, corpus_hash = sequence_parallel.run(config, seed=0)
    assert corpus_hash is None
    (row,) = rows
    assert row["value_error"] < 1e-5 and row["grad_error"] < 1e-5, row
    # LASP-2: one all-gather of the shard states forward, its transpose backward, and the
    # all-reduce that replicates the final state (and the initial state's gradient).
    assert row["collectives"] == "all-gather x1, all-reduce x1, reduce-scatter x1"


def test_received_bytes_counts_synchronous_and_asynchronous_collectives():
    """An accelerator's `-start`/`-done` pair counts once, by the done's result (the start's
    tuple also holds the operand); a loop body counts once per trip."""
    hlo = """
%body (p: f32[4]) -> f32[4] {
  %cps = (f32[4]{0}, f32[4]{0}, u32[], u32[]) collective-permute-start(f32[4]{0} %x)
  ROOT %cpd = f32[4]{0} collective-permute-done((f32[4]{0}, f32[4]{0}, u32[], u32[]) %cps)
}

ENTRY %main (p: f32[2,64]) -> f32[8,2,64] {
  %ags = (f32[2,64]{1,0}, f32[8,2,64]{2,1,0}) all-gather-start(f32[2,64]{1,0} %p)
  %agd = f32[8,2,64]{2,1,0} all-gather-done((f32[2,64]{1,0}, f32[8,2,64]{2,1,0}) %ags)
  %ag = bf16[8,2,64]{2,1,0} all-gather(bf16[2,64]{1,0} %q), dimensions={0}
  %w = f32[4]{0} while(f32[4]{0} %x), body=%body, backend_config={"known_trip_count":{"n":"3"}}
}
"""
    gathered = 8 * 2 * 64 * (4 + 2) * 7 / 8
    assert received_bytes(hlo, 8) == {"all-gather": (2, gathered), "collective-permute": (3, 48)}
