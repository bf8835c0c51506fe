"""The contract of `seqjax.data.source`, checked for every registered task (and the variants
that change an example's layout), and every task written as a TFDS dataset and read back."""

import numpy as np
import pytest

from seqjax.data import IGNORE, make_source
from seqjax.data.tfds_builders import StoredTask, write_task

# Small settings of each task: `case -> (registered name, options)`.
CASES = {
    "mqar": ("mqar", {"vocab_size": 64, "length": 64, "num_kv_pairs": 4}),
    "mqar_two_passes": (
        "mqar",
        {"vocab_size": 64, "length": 64, "num_kv_pairs": 4, "num_passes": 2},
    ),
    "set_disjointness": (
        "set_disjointness",
        {"first_size": 4, "second_size": 12, "vocab_size": 32},
    ),
    "passkey": ("passkey", {"length": 200, "depth": 0.3}),
    "copying": ("copying", {"alphabet_size": 10, "min_tokens": 3, "max_tokens": 12}),
    "selective_copying": ("selective_copying", {"vocab_size": 8, "length": 40, "num_tokens": 6}),
    "copying_memory": (
        "selective_copying",
        {"vocab_size": 8, "length": 40, "num_tokens": 6, "random_positions": False},
    ),
    "induction_heads": ("induction_heads", {"vocab_size": 8, "length": 32}),
    "parity": ("parity", {}),
    "modular_counting": ("modular_counting", {}),
    "modular_arithmetic": ("modular_arithmetic", {}),
    "modular_arithmetic_brackets": ("modular_arithmetic_brackets", {}),
    "brackets_with_products": ("modular_arithmetic_brackets", {"mult": True}),
    "s3_every_prefix": ("permutation_composition", {"group": "S3"}),
    "s5_last": ("permutation_composition", {"group": "S5", "supervise": "last"}),
    "regbench": ("regbench", {"num_dfas": 20, "num_heldout_dfas": 4}),
}


def source(case: str, seed: int = 0, **options):
    name, settings = CASES[case]
    return make_source(name, seed=seed, **settings, **options)


def assert_same_example(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for field, value in expected.items():
        assert got[field].dtype == value.dtype, field
        np.testing.assert_array_equal(got[field], value, err_msg=field)


@pytest.mark.parametrize("case", CASES)
def test_same_seed_and_index_give_the_same_example(case):
    assert_same_example(source(case, 3)[7], source(case, 3)[7])


@pytest.mark.parametrize("case", CASES)
def test_other_seeds_and_indices_give_other_examples(case):
    reference = source(case, 3)[7]["inputs"]
    for other in (source(case, 4)[7]["inputs"], source(case, 3)[8]["inputs"]):
        assert other.shape != reference.shape or not np.array_equal(other, reference)


@pytest.mark.parametrize("case", CASES)
def test_examples_do_not_depend_on_access_order(case):
    forward = [source(case)[i] for i in range(5)]
    backward = [source(case)[i] for i in reversed(range(5))][::-1]
    for a, b in zip(forward, backward, strict=True):
        assert_same_example(a, b)
    last = source(case)
    assert_same_example(last[-1], last[len(last) - 1])


@pytest.mark.parametrize("case", CASES)
def test_indices_outside_the_source_raise_index_error(case):
    examples = source(case)
    with pytest.raises(IndexError, match="index"):
        examples[len(examples)]
    with pytest.raises(IndexError, match="index"):
        examples[-len(examples) - 1]


@pytest.mark.parametrize("case", CASES)
def test_examples_are_int32_tokens_within_vocab_and_max_length(case):
    examples = source(case)
    for i in range(20):
        example = examples[i]
        inputs, targets = example["inputs"], example["targets"]
        assert inputs.dtype == targets.dtype == np.int32
        assert inputs.ndim == 1 and inputs.shape == targets.shape
        assert all(len(value) == len(inputs) for value in example.values())
        assert inputs.size <= examples.max_length
        assert inputs.min() >= 0 and inputs.max() < examples.vocab_size
        supervised = targets[targets != IGNORE]
        assert supervised.size > 0
        assert supervised.min() >= 0 and supervised.max() < examples.vocab_size


@pytest.mark.parametrize("case", CASES)
def test_every_task_is_written_as_tfds_and_read_back_exactly(case, tmp_path):
    examples = source(case, num_examples=3)
    write_task(tmp_path, case, {"test": examples})
    stored = StoredTask(str(tmp_path), case, "test")
    assert (stored.vocab_size, stored.max_length) == (examples.vocab_size, examples.max_length)
    for index in range(len(examples)):
        assert_same_example(stored[index], examples[index])
