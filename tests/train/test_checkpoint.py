"""Checkpoints: the state and step round-trip, keep-last-N plus the best, the data position,
run metadata, restoring onto another mesh, and clear errors that delete nothing."""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqjax.train.checkpoint import Checkpointer
from seqjax.train.state import TrainState

REPO = Path(__file__).resolve().parents[2]


def make_state(step: int, scale: float = 1.0) -> TrainState:
    params = {"dense": {"kernel": scale * jnp.arange(6.0).reshape(2, 3)}, "scale": jnp.ones(3)}
    opt_state = {"mu": scale * jnp.full((2, 3), 0.5), "count": jnp.int32(7)}
    return TrainState(jnp.int32(step), params, opt_state)


def abstract_of(state: TrainState) -> TrainState:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), state)


def data_iterator():
    return iter(grain.MapDataset.range(100).shuffle(seed=0).batch(4).to_iter_dataset())


def saved_steps(directory: Path) -> set[int]:
    return {int(p.name) for p in directory.iterdir() if p.name.isdigit()}


def snapshot(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*") if p.is_file()
    }


def assert_trees_equal(actual, expected):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(e))


def test_restore_returns_the_saved_state_and_step(tmp_path):
    state = make_state(6, scale=3.0)
    checkpointer = Checkpointer(tmp_path, save_every=3, keep=2)
    assert checkpointer.save(6, state)
    checkpointer.close()

    restored, step = Checkpointer(tmp_path, save_every=3, keep=2).restore(abstract_of(state))
    assert step == 6
    assert isinstance(restored, TrainState)
    assert_trees_equal(restored, state)


def test_saves_only_at_multiples_of_save_every_unless_forced(tmp_path):
    checkpointer = Checkpointer(tmp_path, save_every=3, keep=5)
    done = [checkpointer.save(step, make_state(step)) for step in range(1, 7)]
    assert done == [False, False, True, False, False, True]
    assert checkpointer.save(7, make_state(7), force=True)
    assert not checkpointer.save(7, make_state(7), force=True)  # already saved
    checkpointer.close()
    assert saved_steps(tmp_path) == {3, 6, 7}


def test_save_returns_before_the_write_and_the_state_may_be_donated(tmp_path):
    state = make_state(1)
    expected = jax.tree.map(np.asarray, state)
    checkpointer = Checkpointer(tmp_path, save_every=1, keep=1)
    assert checkpointer.save(1, state)
    assert checkpointer.latest_step == 1
    for leaf in jax.tree.leaves(state):  # what `donate_argnums` does to the next step's input
        leaf.delete()
    checkpointer.wait()
    assert not any(".orbax-checkpoint-tmp" in p.name for p in tmp_path.iterdir())

    restored, _ = checkpointer.restore(abstract_of(make_state(0)))
    assert_trees_equal(restored, expected)
    checkpointer.close()


@pytest.mark.parametrize("best_mode", ["min", "max"])
def test_keeps_the_last_n_and_the_best(tmp_path, best_mode):
    sign = 1.0 if best_mode == "min" else -1.0
    losses = {1: 5.0, 2: 1.0, 3: 4.0, 4: 3.0, 5: 2.0, 6: 6.0}
    options = dict(save_every=1, keep=2, best_metric="eval/loss", best_mode=best_mode)
    checkpointer = Checkpointer(tmp_path, **options)
    for step, loss in losses.items():
        checkpointer.save(step, make_state(step), metrics={"eval/loss": sign * loss})
    checkpointer.close()
    assert saved_steps(tmp_path) == {2, 5, 6}

    # The best is remembered across a restart; a step saved without metrics is only kept
    # while it is among the last two.
    checkpointer = Checkpointer(tmp_path, **options)
    checkpointer.save(7, make_state(7))
    checkpointer.save(8, make_state(8), metrics={"eval/loss": sign * 7.0})
    checkpointer.save(9, make_state(9), metrics={"eval/loss": sign * 8.0})
    checkpointer.close()
    assert saved_steps(tmp_path) == {2, 8, 9}


def test_a_diverged_metric_is_never_the_best(tmp_path):
    checkpointer = Checkpointer(tmp_path, save_every=1, keep=1, best_metric="loss")
    for step, loss in enumerate([2.0, math.nan, 3.0, 4.0], start=1):
        checkpointer.save(step, make_state(step), metrics={"loss": loss})
    checkpointer.close()
    assert saved_steps(tmp_path) == {1, 4}


def test_metrics_without_the_best_metric_are_rejected(tmp_path):
    checkpointer = Checkpointer(tmp_path, save_every=1, keep=1, best_metric="eval/loss")
    with pytest.raises(ValueError, match=r"metrics: .*'eval/loss'"):
        checkpointer.save(1, make_state(1), metrics={"eval/accuracy": 0.5})
    checkpointer.close()


def test_restored_data_iterator_continues_where_the_saved_one_was(tmp_path):
    iterator = data_iterator()
    for _ in range(3):
        next(iterator)
    checkpointer = Checkpointer(tmp_path, save_every=3, keep=1)
    checkpointer.save(3, make_state(3), data_iterator=iterator)
    # The position is read by `save` itself: moving on before the write ends changes nothing.
    expected = [next(iterator) for _ in range(5)]
    checkpointer.close()

    resumed = data_iterator()
    Checkpointer(tmp_path, save_every=3, keep=1).restore(
        abstract_of(make_state(0)), data_iterator=resumed
    )
    assert_trees_equal([next(resumed) for _ in range(5)], expected)


def test_restore_returns_none_without_a_checkpoint(tmp_path):
    abstract = abstract_of(make_state(0))
    assert Checkpointer(tmp_path / "new", save_every=1, keep=1).restore(abstract) is None
    assert Checkpointer(tmp_path, save_every=1, keep=1).restore(abstract) is None


def test_a_file_as_directory_is_rejected(tmp_path):
    path = tmp_path / "checkpoints"
    path.write_text("not a folder")
    with pytest.raises(ValueError, match=r"directory: .*checkpoints is a file"):
        Checkpointer(path, save_every=1, keep=1)
    assert path.read_text() == "not a folder"


@pytest.mark.parametrize("damage", ["missing_state", "garbled_files"])
def test_a_damaged_latest_checkpoint_raises_and_deletes_nothing(tmp_path, damage):
    checkpointer = Checkpointer(tmp_path, save_every=1, keep=3)
    for step in (1, 2):
        checkpointer.save(step, make_state(step), data_iterator=data_iterator())
    checkpointer.close()
    if damage == "missing_state":
        shutil.rmtree(tmp_path / "2" / "state")
    else:
        for path in (tmp_path / "2").rglob("*"):
            if path.is_file():
                path.write_bytes(b"\x00garbled")
    before = snapshot(tmp_path)

    checkpointer = Checkpointer(tmp_path, save_every=1, keep=3)
    folder, step_folder = re.escape(str(tmp_path)), re.escape(str(tmp_path / "2"))
    message = rf"{folder}: the checkpoint of step 2 .* move {step_folder} .* resume from step 1"
    with pytest.raises(RuntimeError, match=message):
        checkpointer.restore(abstract_of(make_state(0)), data_iterator=data_iterator())
    checkpointer.close()
    assert snapshot(tmp_path) == before


def test_an_unfinished_checkpoint_is_ignored_then_cleared(tmp_path):
    checkpointer = Checkpointer(tmp_path, save_every=1, keep=3)
    checkpointer.save(1, make_state(1))
    checkpointer.close()
    # What a run killed mid-save leaves: the step's files under Orbax's temporary name.
    unfinished = tmp_path / "2.orbax-checkpoint-tmp-1767225600"
    shutil.copytree(tmp_path / "1", unfinished)

    checkpointer = Checkpointer(tmp_path, save_every=1, keep=3)
    assert checkpointer.latest_step == 1
    _, step = checkpointer.restore(abstract_of(make_state(0)))
    assert step == 1
    assert checkpointer.save(2, make_state(2))
    checkpointer.close()
    assert not unfinished.exists()
    assert saved_steps(tmp_path) == {1, 2}


def test_restore_checks_the_run_metadata(tmp_path):
    metadata = {"model": {"d_model": 32, "blocks": ("gla", "gla")}, "corpus_hash": "ab12"}
    checkpointer = Checkpointer(tmp_path, save_every=1, keep=1, metadata=metadata)
    checkpointer.save(1, make_state(1))
    checkpointer.close()
    abstract = abstract_of(make_state(0))

    _, step = Checkpointer(tmp_path, save_every=1, keep=1, metadata=metadata).restore(abstract)
    assert step == 1
    changed = {**metadata, "corpus_hash": "cd34"}
    with pytest.raises(ValueError, match=r"metadata: .*corpus_hash: saved 'ab12', now 'cd34'"):
        Checkpointer(tmp_path, save_every=1, keep=1, metadata=changed).restore(abstract)


def test_metadata_must_be_json(tmp_path):
    with pytest.raises(ValueError, match="metadata: expected JSON-serializable"):
        Checkpointer(tmp_path, save_every=1, keep=1, metadata={"dtype": jnp.float32})


RESHARD = """
import jax, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from seqjax.parallel import make_mesh
from seqjax.train.checkpoint import Checkpointer

values = np.arange(8 * 6, dtype=np.float32).reshape(8, 6)
saved_on = NamedSharding(make_mesh(data=8), P("data", None))
checkpointer = Checkpointer(DIRECTORY, save_every=1, keep=1)
checkpointer.save(1, {"w": jax.device_put(values, saved_on)})
checkpointer.close()

targets = [
    NamedSharding(make_mesh(data=1, fsdp=2, tensor=4), P("tensor", "fsdp")),
    NamedSharding(make_mesh(data=4, tensor=2), P(None, "tensor")),
    jax.sharding.SingleDeviceSharding(jax.devices()[5]),
]
for target in targets:
    abstract = {"w": jax.ShapeDtypeStruct(values.shape, values.dtype, sharding=target)}
    restored, _ = Checkpointer(DIRECTORY, save_every=1, keep=1).restore(abstract)
    assert restored["w"].sharding == target, (restored["w"].sharding, target)
    np.testing.assert_array_equal(np.asarray(restored["w"]), values)
print("resharded")
"""


def test_restore_onto_another_mesh_gives_the_same_values(tmp_path):
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
        "JAX_PLATFORMS": "cpu",
    }
    script = textwrap.dedent(RESHARD).replace("DIRECTORY", repr(str(tmp_path)))
    result = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resharded" in result.stdout


def test_damaged_metrics_of_an_older_step_are_reported_with_their_folder(tmp_path):
    checkpointer = Checkpointer(tmp_path, save_every=1, keep=3, best_metric="loss")
    for step in (1, 2):
        checkpointer.save(step, make_state(step), metrics={"loss": float(step)})
    checkpointer.close()
    (tmp_path / "1" / "metrics" / "metrics").write_text("{garbled")
    before = snapshot(tmp_path)

    folder, step_folder = re.escape(str(tmp_path)), re.escape(str(tmp_path / "1"))
    with pytest.raises(RuntimeError, match=rf"{folder}: could not read .*\({step_folder}\)"):
        Checkpointer(tmp_path, save_every=1, keep=3, best_metric="loss")
    assert snapshot(tmp_path) == before
