"""The training loop end to end: the same losses on any mesh and on several hosts, exact
resumption after SIGKILL, a clean save on SIGTERM, and clear errors for bad configs."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from jax.sharding import AbstractMesh, AxisType
from run_config import get_config

from seqjax.data import make_source
from seqjax.parallel import MESH_AXES
from seqjax.train.config import validate
from seqjax.train.loop import check_batch, train
from seqjax.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]
CONFIG_FILE = Path(__file__).with_name("run_config.py")


def losses(workdir) -> dict[int, float]:
    """The last logged train loss of every step (a resumed run logs its steps again)."""
    return {m["step"]: m["train/loss"] for m in read_metrics(workdir) if "train/loss" in m}


@pytest.fixture(scope="module")
def compilation_cache(tmp_path_factory):
    """A persistent compilation cache the runs of this module share: a resumed run reuses the
    programs its first run compiled."""
    return tmp_path_factory.mktemp("compilation_cache")


def run(args, workdir, cache, *, devices=1, wait=True, variant=""):
    env = {
        **os.environ,
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
        "JAX_COMPILATION_CACHE_DIR": str(cache),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    config = f"--config={CONFIG_FILE}" + (f":{variant}" if variant else "")
    command = [sys.executable, "-m", "experiments.train", config]
    process = subprocess.Popen([*command, f"--workdir={workdir}", *args], cwd=ROOT, env=env)
    if wait:
        assert process.wait(timeout=600) == 0
    return process


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
    """The reference run: 30 steps on this process's one device."""
    workdir = tmp_path_factory.mktemp("one_device")
    summary = train(get_config(), workdir)
    assert summary["steps"] == 30
    return losses(workdir)


MESHES = {
    "data x fsdp x tensor": pytest.param((2, 2, 2, 1)),
    "data": pytest.param((8, 1, 1, 1), marks=pytest.mark.slow),
    "fsdp": pytest.param((1, 8, 1, 1), marks=pytest.mark.slow),
    "data x tensor": pytest.param((2, 1, 4, 1), marks=pytest.mark.slow),
    "data x sequence": pytest.param((2, 1, 1, 4), marks=pytest.mark.slow),
}


@pytest.mark.parametrize("mesh", MESHES.values(), ids=MESHES.keys())
def test_a_mesh_gives_the_one_device_losses(mesh, one_device, compilation_cache, tmp_path):
    sizes = [f"--config.mesh.{axis}={size}" for axis, size in zip(MESH_AXES, mesh, strict=True)]
    run(sizes, tmp_path, compilation_cache, devices=8)
    sharded = losses(tmp_path)
    assert sorted(sharded) == list(range(1, 31))
    np.testing.assert_allclose(
        [sharded[step] for step in one_device], list(one_device.values()), rtol=1e-4
    )


@pytest.fixture(scope="module")
def hybrid_one_device(tmp_path_factory, compilation_cache):
    """The hybrid run (DeltaNet and attention, 20 steps) on one device."""
    workdir = tmp_path_factory.mktemp("hybrid_one_device")
    run([], workdir, compilation_cache, variant="hybrid")
    return losses(workdir)


SEQUENCE_MESHES = {
    "data x sequence": pytest.param((2, 1, 1, 4)),
    "sequence": pytest.param((1, 1, 1, 8), marks=pytest.mark.slow),
    "fsdp x tensor x sequence": pytest.param((1, 2, 2, 2), marks=pytest.mark.slow),
}


@pytest.mark.parametrize("mesh", SEQUENCE_MESHES.values(), ids=SEQUENCE_MESHES.keys())
def test_a_sequence_sharded_hybrid_trains_to_the_one_device_losses(
    mesh, hybrid_one_device, compilation_cache, tmp_path
):
    sizes = [f"--config.mesh.{axis}={size}" for axis, size in zip(MESH_AXES, mesh, strict=True)]
    run(sizes, tmp_path, compilation_cache, devices=8, variant="hybrid")
    sharded = losses(tmp_path)
    assert sorted(sharded) == list(range(1, 21))
    np.testing.assert_allclose(
        [sharded[step] for step in hybrid_one_device],
        list(hybrid_one_device.values()),
        rtol=1e-4,
    )


def wait_for_checkpoint(workdir: Path, process: subprocess.Popen) -> None:
    checkpoints = workdir / "checkpoints"
    deadline = time.monotonic() + 300
    while not (checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir())):
        assert process.poll() is None, "the run ended before its first checkpoint"
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_a_run_killed_with_sigkill_resumes_to_the_uninterrupted_losses(
    one_device, compilation_cache, tmp_path
):
    process = run([], tmp_path, compilation_cache, wait=False)
    wait_for_checkpoint(tmp_path, process)
    process.kill()
    process.wait()
    assert not (tmp_path / "summary.json").exists(), "killed too late: the run had finished"
    run([], tmp_path, compilation_cache)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert 0 < summary["started_at_step"] < 30
    resumed = losses(tmp_path)
    np.testing.assert_allclose(resumed[30], one_device[30], rtol=1e-6)


@pytest.mark.slow
def test_a_run_killed_on_a_mesh_resumes_on_one_device_to_the_same_losses(
    one_device, compilation_cache, tmp_path
):
    mesh = ["--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2"]
    process = run(mesh, tmp_path, compilation_cache, devices=8, wait=False)
    wait_for_checkpoint(tmp_path, process)
    process.kill()
    process.wait()
    run([], tmp_path, compilation_cache)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert 0 < summary["started_at_step"] < 30
    np.testing.assert_allclose(losses(tmp_path)[30], one_device[30], rtol=1e-4)


@pytest.mark.slow
def test_sigterm_saves_the_current_step_and_exits_cleanly(compilation_cache, tmp_path):
    process = run(["--config.train.steps=2000"], tmp_path, compilation_cache, wait=False)
    wait_for_checkpoint(tmp_path, process)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=300) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["preempted"]
    assert summary["steps"] < 2000
    assert summary["latest_checkpoint"] == summary["steps"]
    assert (tmp_path / "checkpoints" / str(summary["steps"])).is_dir()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


TWO_HOST_RUNS = {
    "data": ([], ""),
    "hybrid on data x sequence": (["--config.mesh.sequence=4"], "hybrid"),
}


@pytest.mark.slow
@pytest.mark.parametrize(("mesh", "variant"), TWO_HOST_RUNS.values(), ids=TWO_HOST_RUNS)
def test_two_hosts_of_four_devices_give_the_one_host_losses(
    mesh, variant, compilation_cache, tmp_path
):
    shards = ["--config.data.num_shards=2", "--config.train.steps=10", *mesh]
    run(shards, tmp_path / "one_host", compilation_cache, devices=8, variant=variant)
    coordinator = f"--coordinator=localhost:{free_port()}"
    hosts = [
        run(
            [*shards, coordinator, "--num_processes=2", f"--process_id={index}"],
            tmp_path / "two_hosts",
            compilation_cache,
            devices=4,
            wait=False,
            variant=variant,
        )
        for index in range(2)
    ]
    assert [host.wait(timeout=600) for host in hosts] == [0, 0]
    one, two = losses(tmp_path / "one_host"), losses(tmp_path / "two_hosts")
    assert sorted(two) == list(range(1, 11))
    np.testing.assert_allclose([two[s] for s in one], list(one.values()), rtol=2e-5)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("train.steps", 0, "config.train.steps: expected a positive int"),
        ("data.packing", "zip", "config.data.packing: expected one of"),
        ("optimizer.decay", "step", "config.optimizer.decay: expected one of"),
        ("train.accumulation_steps", 3, "config.train.accumulation_steps: 3 does not divide"),
    ],
)
def test_a_bad_config_field_is_named(field, value, message):
    config = get_config()
    section, name = field.split(".")
    config[section][name] = value
    with pytest.raises(ValueError, match=message):
        validate(config)


def test_an_unknown_dataset_is_named():
    with pytest.raises(ValueError, match=r"data.task: unknown dataset 'mqr'"):
        make_source("mqr")


def test_a_batch_that_does_not_split_over_the_data_axes_is_named():
    config = get_config()
    config.data.batch_size = 12
    mesh = AbstractMesh((2, 4, 1, 1), MESH_AXES, axis_types=(AxisType.Auto,) * 4)
    with pytest.raises(ValueError, match=r"config.data.batch_size: 12 rows .* 8 data-parallel"):
        check_batch(config, mesh)


def test_a_length_that_does_not_split_over_the_sequence_axis_is_named():
    config = get_config()
    config.data.length = 30
    mesh = AbstractMesh((2, 1, 1, 4), MESH_AXES, axis_types=(AxisType.Auto,) * 4)
    with pytest.raises(ValueError, match=r"config.data.length: 30 tokens .* 4 devices"):
        check_batch(config, mesh)
