"""Task sources written as TFDS array_record datasets read back exactly, without TensorFlow."""

from __future__ import annotations

import dataclasses
import json
import pickle

import numpy as np
import pytest
import tensorflow_datasets as tfds

from seqjax.data.source import IGNORE, check_index, example, example_rng
from seqjax.data.tfds_builders import StoredTask, write_task


@dataclasses.dataclass(frozen=True)
class ToyTask:
    """A source following the contract: variable lengths `T` in [1, max_length], a `[T, V]`
    bool `valid` field and a float64 `weight` field (read back bit for bit)."""

    vocab_size: int = 11
    max_length: int = 9
    seed: int = 0
    num_examples: int = 20

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index: int) -> dict:
        rng = example_rng(self.seed, check_index(index, self.num_examples))
        length = int(rng.integers(1, self.max_length + 1))
        inputs = rng.integers(0, self.vocab_size, length)
        targets = np.where(
            rng.random(length) < 0.5, IGNORE, rng.integers(0, self.vocab_size, length)
        )
        valid = rng.random((length, self.vocab_size)) < 0.3
        return example(inputs, targets, valid=valid, weight=rng.standard_normal(length) * 1e300)


def assert_same_example(got: dict, expected: dict) -> None:
    assert sorted(got) == sorted(expected)
    for field, value in expected.items():
        assert got[field].dtype == value.dtype, field
        np.testing.assert_array_equal(got[field], value, err_msg=field)


@pytest.fixture
def written(tmp_path):
    splits = {"test": ToyTask(seed=1), "validation": ToyTask(seed=2, num_examples=7)}
    write_task(tmp_path, "toy_task", splits)
    return tmp_path, splits


def test_examples_read_back_equal_the_source(written):
    directory, splits = written
    for split, source in splits.items():
        stored = StoredTask(str(directory), "toy_task", split)
        assert len(stored) == len(source)
        lengths = set()
        for index in range(len(source)):
            assert_same_example(stored[index], source[index])
            lengths.add(len(source[index]["inputs"]))
        assert len(lengths) > 1


def test_tfds_data_source_reads_the_same_examples(written):
    directory, splits = written
    records = tfds.data_source("toy_task", split="test", data_dir=str(directory))
    assert [len(records[i]["inputs"]) for i in range(len(records))] == [
        len(splits["test"][i]["inputs"]) for i in range(len(splits["test"]))
    ]
    for index in (0, 5, 19):
        assert_same_example(records[index], splits["test"][index])


def test_the_files_are_array_record_with_the_sources_recorded(written):
    directory, splits = written
    folder = directory / "toy_task" / "1.0.0"
    assert sorted(path.name for path in folder.glob("*.array_record*")) == [
        "toy_task-test.array_record-00000-of-00001",
        "toy_task-validation.array_record-00000-of-00001",
    ]
    assert sorted(path.name for path in directory.iterdir()) == ["toy_task"]
    metadata = json.loads((folder / "metadata.json").read_text())
    assert metadata["splits"]["validation"]["source"] == repr(splits["validation"])


def test_stored_task_keeps_the_sources_sizes_and_settings(written):
    directory, splits = written
    stored = StoredTask(str(directory), "toy_task", "validation")
    assert (stored.vocab_size, stored.max_length) == (11, 9)
    assert stored.source == repr(splits["validation"])


def test_stored_task_indexes_like_a_source(written):
    directory, splits = written
    stored = StoredTask(str(directory), "toy_task", "validation")
    assert_same_example(stored[-1], splits["validation"][6])
    with pytest.raises(IndexError, match="out of range"):
        stored[7]


def test_stored_task_survives_pickling_for_worker_processes(written):
    directory, splits = written
    stored = pickle.loads(pickle.dumps(StoredTask(str(directory), "toy_task", "test")))
    assert_same_example(stored[3], splits["test"][3])


def test_an_existing_dataset_is_kept_unless_overwrite(written):
    directory, splits = written
    with pytest.raises(FileExistsError, match="toy_task"):
        write_task(directory, "toy_task", {"test": ToyTask(seed=9)})
    assert_same_example(StoredTask(str(directory), "toy_task", "test")[0], splits["test"][0])
    write_task(directory, "toy_task", {"test": ToyTask(seed=9)}, overwrite=True)
    stored = StoredTask(str(directory), "toy_task", "test")
    assert_same_example(stored[0], ToyTask(seed=9)[0])
    with pytest.raises(ValueError, match="split: expected one of \\['test'\\]"):
        StoredTask(str(directory), "toy_task", "validation")


def test_a_missing_dataset_names_what_was_looked_for(tmp_path):
    with pytest.raises(ValueError, match="name: no dataset 'absent'"):
        StoredTask(str(tmp_path), "absent", "test")


@pytest.mark.parametrize("name", ["Toy", "toy-task", "", "1toy"])
def test_a_bad_name_is_rejected(tmp_path, name):
    with pytest.raises(ValueError, match="name: expected a snake_case name"):
        write_task(tmp_path, name, {"test": ToyTask()})


def test_bad_splits_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="splits: expected at least one"):
        write_task(tmp_path, "toy_task", {})
    with pytest.raises(ValueError, match="splits: expected snake_case split names"):
        write_task(tmp_path, "toy_task", {"Test set": ToyTask()})
    with pytest.raises(ValueError, match="splits\\['test'\\]: expected a non-empty source"):
        write_task(tmp_path, "toy_task", {"test": ToyTask(num_examples=0)})


def test_splits_with_different_fields_are_rejected(tmp_path):
    other = ToyTask(vocab_size=5)
    with pytest.raises(ValueError, match="splits\\['other'\\]: expected the fields"):
        write_task(tmp_path, "toy_task", {"test": ToyTask(), "other": other})


@dataclasses.dataclass(frozen=True)
class Ragged(ToyTask):
    """Example 3's `valid` has a different leading axis from its `inputs`."""

    def __getitem__(self, index: int) -> dict:
        item = super().__getitem__(index)
        if index == 3:
            item["valid"] = item["valid"][:0]
        return item


def test_an_example_whose_fields_disagree_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="splits\\['test'\\]\\[3\\]: expected fields"):
        write_task(tmp_path, "toy_task", {"test": Ragged()})


@dataclasses.dataclass(frozen=True)
class Int64Targets(ToyTask):
    def __getitem__(self, index: int) -> dict:
        item = super().__getitem__(index)
        return {**item, "targets": item["targets"].astype(np.int64)}


def test_tokens_must_be_int32(tmp_path):
    with pytest.raises(ValueError, match="`targets` as \\[T\\] int32"):
        write_task(tmp_path, "toy_task", {"test": Int64Targets()})


def test_a_source_without_sizes_is_rejected(tmp_path):
    class Sizeless(list):
        pass

    source = Sizeless([ToyTask()[0]])
    with pytest.raises(ValueError, match="vocab_size` and `max_length"):
        write_task(tmp_path, "toy_task", {"test": source})
