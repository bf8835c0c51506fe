"""Runs the checks on a mesh (`*_cases.py` here: the sequence-parallel forms, the mixers under
a sequence mesh, generation with sharded parameters) on 8 fake CPU devices.

The device count is fixed when JAX starts, so the cases files run in one more pytest process
with `--xla_force_host_platform_device_count=8`: the default suite runs their representative
cases, the slow job the rest."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
CASE_FILES = sorted(HERE.glob("*_cases.py"))


def run_cases(marker: str) -> None:
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
        "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]),
    }
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", marker]
    result = subprocess.run(
        [*command, *map(str, CASE_FILES)],
        env=env,
        capture_output=True,
        text=True,
        cwd=HERE.parent.parent,
    )
    # 5: nothing collected under this marker.
    assert result.returncode in (0, 5), result.stdout[-8000:] + result.stderr[-3000:]


def test_on_eight_devices():
    run_cases("not slow")


@pytest.mark.slow
def test_on_eight_devices_full_matrix():
    run_cases("slow")
