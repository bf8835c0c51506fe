"""The recall sources: each generator's published spec, and targets recomputed by plain
Python (the contract every source shares is in `test_sources.py`)."""

import random
import re

import numpy as np
import pytest

from seqjax.data.recall import MQAR, Passkey, SetDisjointness
from seqjax.data.source import IGNORE


def labelled(targets):
    return np.flatnonzero(targets != IGNORE)


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: MQAR(vocab_size=0), "vocab_size"),
        (lambda: MQAR(length=63), "length"),
        (lambda: MQAR(length=62, num_kv_pairs=16), "length"),
        (lambda: MQAR(length=126, num_kv_pairs=16, num_passes=3), "length"),
        (lambda: MQAR(num_kv_pairs=0), "num_kv_pairs"),
        (lambda: MQAR(vocab_size=16, length=64, num_kv_pairs=8), "num_kv_pairs"),
        (lambda: MQAR(num_passes=0), "num_passes"),
        (lambda: MQAR(power_a=0.0), "power_a"),
        (lambda: MQAR(power_a=float("nan")), "power_a"),
        (lambda: MQAR(random_non_queries=1), "random_non_queries"),
        (lambda: MQAR(seed=-1), "seed"),
        (lambda: MQAR(num_examples=0), "num_examples"),
        (lambda: SetDisjointness(first_size=0), "first_size"),
        (lambda: SetDisjointness(second_size=-2), "second_size"),
        (lambda: SetDisjointness(first_size=8, second_size=8, vocab_size=19), "vocab_size"),
        (lambda: SetDisjointness(seed=1.5), "seed"),
        (lambda: SetDisjointness(num_examples=0), "num_examples"),
        (lambda: Passkey(depth=1.5), "depth"),
        (lambda: Passkey(depth=-0.1), "depth"),
        (lambda: Passkey(depth=float("nan")), "depth"),
        (lambda: Passkey(length=101), "length"),
        (lambda: Passkey(num_digits=0), "num_digits"),
        (lambda: Passkey(seed=-3), "seed"),
        (lambda: Passkey(num_examples=0), "num_examples"),
    ],
)
def test_bad_settings_name_the_field(make, field):
    with pytest.raises(ValueError, match=f"^{field}: expected"):
        make()


def test_smallest_settings_that_fit_are_accepted():
    assert MQAR(vocab_size=10, length=16, num_kv_pairs=4)[0]["inputs"].size == 16
    assert MQAR(length=96, num_kv_pairs=16, num_passes=2)[0]["inputs"].size == 96
    assert SetDisjointness(first_size=8, second_size=8, vocab_size=20)[0]["inputs"].size == 19
    assert Passkey(length=102)[0]["inputs"].size == 102


# MQAR (zoology `multiquery_ar`).


def test_mqar_context_holds_distinct_keys_and_values_in_their_halves():
    source = MQAR(vocab_size=64, length=64, num_kv_pairs=8, num_passes=2)
    for i in range(100):
        inputs = source[i]["inputs"].tolist()
        block = inputs[:16]
        keys, values = block[0::2], block[1::2]
        assert all(1 <= key < 32 for key in keys) and len(set(keys)) == 8
        assert all(32 <= value < 64 for value in values) and len(set(values)) == 8
        assert inputs[16:32] == block


def test_mqar_labels_sit_on_each_key_query_with_its_bound_value():
    for num_passes in (1, 2):
        source = MQAR(vocab_size=128, length=96, num_kv_pairs=8, num_passes=num_passes)
        context = 16 * num_passes
        for i in range(50):
            inputs, targets = source[i]["inputs"].tolist(), source[i]["targets"].tolist()
            bound = dict(zip(inputs[0:16:2], inputs[1:16:2], strict=True))
            queries = [t for t, label in enumerate(targets) if label != IGNORE]
            assert len(queries) == 8
            assert all(t >= context and (t - context) % 2 == 0 for t in queries)
            assert sorted(inputs[t] for t in queries) == sorted(bound)
            assert all(targets[t] == bound[inputs[t]] for t in queries)


def test_mqar_without_random_filler_is_zero_outside_context_and_queries():
    source = MQAR(vocab_size=64, length=64, num_kv_pairs=4, random_non_queries=False)
    for i in range(20):
        inputs, targets = source[i]["inputs"], source[i]["targets"]
        filler = np.ones(64, bool)
        filler[:8] = False
        filler[labelled(targets)] = False
        assert np.all(inputs[filler] == 0)
        assert np.all(inputs[~filler] != 0)


def test_mqar_random_filler_is_uniform_over_the_whole_vocab():
    source = MQAR(vocab_size=64, length=64, num_kv_pairs=4)
    filler, collisions = [], 0
    for i in range(200):
        inputs, targets = source[i]["inputs"], source[i]["targets"]
        is_filler = np.ones(64, bool)
        is_filler[:8] = False
        is_filler[labelled(targets)] = False
        filler.append(inputs[is_filler])
        collisions += np.isin(inputs[is_filler], inputs[0:8:2]).sum()
    filler = np.concatenate(filler)
    counts = np.bincount(filler, minlength=64)
    assert counts.size == 64 and counts.min() > 0
    assert abs(filler.mean() - 31.5) < 1.0
    assert collisions > 0


def simulated_slot_counts(num_slots, num_queries, power_a, trials, buckets):
    """Mean queries per example in each bucket of slots: successive weighted draws without
    replacement, in plain Python."""
    generator = random.Random(0)
    totals = [0.0] * (len(buckets) - 1)
    for _ in range(trials):
        remaining = list(range(num_slots))
        for _ in range(num_queries):
            weights = [(slot + 1) ** (power_a - 1) for slot in remaining]
            slot = generator.choices(remaining, weights)[0]
            remaining.remove(slot)
            bucket = next(b for b in range(len(buckets) - 1) if slot < buckets[b + 1])
            totals[bucket] += 1 / trials
    return np.array(totals)


@pytest.mark.parametrize("power_a", [0.01, 1.0])
def test_mqar_query_gaps_follow_the_power_law(power_a):
    source = MQAR(vocab_size=256, length=64, num_kv_pairs=4, power_a=power_a)
    buckets = [0, 1, 3, 8, 28]  # query slots 0..27 at offsets 8 + 2 * slot
    measured = np.zeros(len(buckets) - 1)
    for i in range(400):
        slots = (labelled(source[i]["targets"]) - 8) // 2
        measured += np.histogram(slots, bins=buckets)[0] / 400
    expected = simulated_slot_counts(28, 4, power_a, 3000, buckets)
    other = simulated_slot_counts(28, 4, 1.01 - power_a, 3000, buckets)
    assert np.abs(expected - other).max() > 0.5
    np.testing.assert_allclose(measured, expected, atol=0.2)


def test_mqar_defaults_are_zoology_scale():
    source = MQAR()
    example = source[0]
    assert (source.vocab_size, source.max_length, len(source)) == (8192, 256, 100_000)
    assert example["inputs"].size == 256 and labelled(example["targets"]).size == 16


# Set disjointness.


def split_sets(inputs, first_size):
    inputs = inputs.tolist()
    return inputs[1 : first_size + 1], inputs[first_size + 2 : -1]


@pytest.mark.parametrize(("first_size", "second_size"), [(4, 12), (12, 4)])
def test_set_disjointness_layout(first_size, second_size):
    source = SetDisjointness(first_size=first_size, second_size=second_size, vocab_size=40)
    for i in range(100):
        inputs = source[i]["inputs"]
        assert inputs.size == first_size + second_size + 3 == source.max_length
        assert inputs[0] == inputs[first_size + 1] == SetDisjointness.SEPARATOR
        assert inputs[-1] == SetDisjointness.QUESTION
        first, second = split_sets(inputs, first_size)
        assert len(set(first)) == first_size and len(set(second)) == second_size
        assert min(first + second) >= 4 and max(first + second) < 40


def test_set_disjointness_answer_says_whether_the_sets_intersect():
    source = SetDisjointness(first_size=4, second_size=12, vocab_size=32)
    for i in range(200):
        inputs, targets = source[i]["inputs"], source[i]["targets"]
        first, second = split_sets(inputs, 4)
        intersect = bool(set(first) & set(second))
        assert labelled(targets).tolist() == [inputs.size - 1]
        assert targets[-1] == (SetDisjointness.YES if intersect else SetDisjointness.NO)


def test_set_disjointness_is_balanced_with_exactly_one_shared_element():
    source = SetDisjointness(first_size=4, second_size=6, vocab_size=24)
    answers, shared_positions = [], set()
    for i in range(400):
        inputs = source[i]["inputs"]
        first, second = split_sets(inputs, 4)
        shared = set(first) & set(second)
        assert len(shared) <= 1
        answers.append(bool(shared))
        shared_positions.update(second.index(element) for element in shared)
    assert 0.42 < np.mean(answers) < 0.58
    assert shared_positions == set(range(6))


# Passkey.


def passkey_parts(source, index):
    """The example's text split at its key sentence, and its key, found by a regex."""
    text = bytes(source[index]["inputs"].tolist()).decode("ascii")
    match = re.search(r"The pass key is (\d+)\. Remember it\. (\d+) is the pass key\. ", text)
    assert match and match[1] == match[2]
    return text[: match.start()], match[1], text[match.end() :]


@pytest.mark.parametrize("length", range(102, 400, 29))
@pytest.mark.parametrize("depth", [0.0, 0.4, 1.0])
def test_passkey_has_exactly_length_bytes_of_filler_key_and_question(length, depth):
    source = Passkey(length=length, depth=depth)
    before, key, after = passkey_parts(source, 0)
    question = "What is the pass key? The pass key is "
    assert len(before) + len(after) + 49 + 2 * len(key) == length
    assert after.endswith(question + key) and len(key) == 5
    filler = before + after[: -len(question + key)]
    assert (Passkey.FILLER * 10).endswith(filler)


@pytest.mark.parametrize("depth", [0.0, 0.1, 0.25, 0.5, 0.77, 0.9, 1.0])
def test_passkey_key_sits_at_the_sentence_start_nearest_depth(depth):
    length = 600
    before, key, after = passkey_parts(Passkey(length=length, depth=depth), 0)
    filler = before + after[: -(38 + len(key))]
    starts = [0] + [i for i in range(2, len(filler) + 1) if filler[i - 2 : i] == ". "]
    distance = abs(len(before) - depth * len(filler))
    assert len(before) in starts
    assert distance == min(abs(start - depth * len(filler)) for start in starts)
    if depth == 0.0:
        assert before == ""
    if depth == 1.0:
        assert after.startswith("What is the pass key?")


def test_passkey_targets_are_the_key_digits_read_lm_style():
    source = Passkey(length=300, depth=0.6, num_digits=7)
    for i in range(20):
        inputs, targets = source[i]["inputs"], source[i]["targets"]
        _, key, _ = passkey_parts(source, i)
        positions = labelled(targets)
        assert positions.tolist() == list(range(300 - 8, 300 - 1))
        assert bytes(targets[positions].tolist()).decode("ascii") == key
        np.testing.assert_array_equal(targets[positions], inputs[positions + 1])


def test_passkey_digits_are_uniform_and_independent_per_example():
    source = Passkey(length=160)
    keys = [passkey_parts(source, i)[1] for i in range(300)]
    counts = np.bincount([int(digit) for key in keys for digit in key], minlength=10)
    assert counts.size == 10 and counts.min() > 100 and counts.max() < 200
    assert len(set(keys)) > 290


def test_passkey_vocab_is_bytes():
    source = Passkey()
    assert (source.vocab_size, source.max_length, len(source)) == (256, 1024, 1_000)
