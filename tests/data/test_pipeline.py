"""The input pipeline: packed and padded rows, Dataset Decomposition, sharding, shuffling and
iterator state, checked on documents whose tokens name their document and position."""

import collections
import dataclasses
import itertools
import json

import grain
import numpy as np
import pytest
from etils import epath

from seqjax.data.pipeline import batches, decomposed_batches
from seqjax.data.source import IGNORE, check_index, example, example_rng

BASE = 1000  # token = BASE * document + position


@dataclasses.dataclass(frozen=True)
class Documents:
    """Documents of `min_length..max_length` tokens; token `BASE * d + p` is position `p` of
    document `d`, its target `token + 1` (IGNORE at every third position), and a task field
    `valid: [T, 3] bool` one-hot in `p % 3`."""

    num_examples: int = 30
    min_length: int = 1
    max_length: int = 40
    seed: int = 0

    def __len__(self):
        return self.num_examples

    def __getitem__(self, index):
        index = check_index(index, len(self))
        size = example_rng(self.seed, index).integers(self.min_length, self.max_length + 1)
        position = np.arange(size)
        tokens = BASE * index + position
        targets = np.where(position % 3 == 2, IGNORE, tokens + 1)
        return example(tokens, targets, valid=position[:, None] % 3 == np.arange(3))


@dataclasses.dataclass(frozen=True)
class MissingTargets:
    """Documents whose example 3 has no `targets`."""

    def __len__(self):
        return 6

    def __getitem__(self, index):
        if index == 3:
            return {"inputs": np.arange(4, dtype=np.int32)}
        return example(np.arange(4), np.arange(4))


SOURCE = Documents()
SHARD = {"shard_index": 0, "shard_count": 1}


def make(packing, **settings):
    """One epoch of `SOURCE` with every batch kept: packed rows of 16 tokens (documents up to 40
    tokens get split), or padded rows long enough that nothing is cut."""
    defaults = {
        "batch_size": 4,
        "length": 16 if packing == "pack" else 40,
        "seed": 0,
        "packing": packing,
        "truncate": False,
        "num_epochs": 1,
        "drop_remainder": False,
        **SHARD,
    }
    return batches(settings.pop("source", SOURCE), **{**defaults, **settings})


def make_decomposed(**settings):
    defaults = {"tokens_per_batch": 32, "max_length": 16, "min_length": 2, "seed": 0}
    return decomposed_batches(settings.pop("source", SOURCE), **{**defaults, **SHARD, **settings})


def segments(all_batches):
    """Every segment of every row: a dict of its fields (the row's tokens with that id)."""
    for batch in all_batches:
        for row in range(len(batch["inputs"])):
            ids = batch["segment_ids"][row]
            for segment in np.unique(ids[ids > 0]):
                where = ids == segment
                yield {name: value[row][where] for name, value in batch.items()}


def token_counts(all_batches):
    return collections.Counter(
        int(token) for segment in segments(all_batches) for token in segment["inputs"]
    )


def source_tokens(source):
    return collections.Counter(
        int(token) for i in range(len(source)) for token in source[i]["inputs"]
    )


def take(iterator, count):
    return [next(iterator) for _ in range(count)]


def assert_same_batches(first, second):
    assert len(first) == len(second)
    for a, b in zip(first, second, strict=True):
        assert a.keys() == b.keys()
        for name in a:
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)


# Row layout.


@pytest.mark.parametrize("packing", ["pack", "pad"])
def test_batches_have_fixed_shapes_and_dtypes(packing):
    length = 16 if packing == "pack" else 40
    for batch in make(packing):
        assert batch.keys() == {"inputs", "targets", "valid", "segment_ids", "positions"}
        for name in ("inputs", "targets", "segment_ids", "positions"):
            assert batch[name].shape == (4, length) and batch[name].dtype == np.int32, name
        assert batch["valid"].shape == (4, length, 3) and batch["valid"].dtype == bool


@pytest.mark.parametrize("packing", ["pack", "pad"])
def test_a_segment_holds_consecutive_tokens_of_one_document(packing):
    found = list(segments(make(packing)))
    assert found
    for segment in found:
        documents, places = np.divmod(segment["inputs"], BASE)
        assert np.all(documents == documents[0])
        np.testing.assert_array_equal(np.diff(places), 1)


def test_packed_rows_hold_several_documents():
    assert any(np.max(batch["segment_ids"]) > 1 for batch in make("pack"))


@pytest.mark.parametrize("packing", ["pack", "pad"])
def test_positions_restart_at_every_segment(packing):
    for segment in segments(make(packing)):
        np.testing.assert_array_equal(segment["positions"], np.arange(len(segment["inputs"])))


@pytest.mark.parametrize("packing", ["pack", "pad"])
def test_targets_and_task_fields_travel_with_their_tokens(packing):
    for segment in segments(make(packing)):
        documents, places = np.divmod(segment["inputs"], BASE)
        expected = [SOURCE[d]["targets"][p] for d, p in zip(documents, places, strict=True)]
        np.testing.assert_array_equal(segment["targets"], expected)
        np.testing.assert_array_equal(segment["valid"], places[:, None] % 3 == np.arange(3))


def test_long_documents_are_split_into_pieces_that_each_start_a_segment():
    length = 16
    pieces = collections.defaultdict(list)
    for segment in segments(make("pack", length=length)):
        document, start = divmod(int(segment["inputs"][0]), BASE)
        pieces[document].append((start, len(segment["inputs"])))
    for document, found in pieces.items():
        size = len(SOURCE[document]["inputs"])
        starts = range(0, size, length)
        assert sorted(found) == [(start, min(length, size - start)) for start in starts]
    assert any(len(found) > 1 for found in pieces.values())


@pytest.mark.parametrize("packing", ["pack", "pad"])
def test_padding_has_segment_zero_and_no_loss(packing):
    all_batches = make(packing)
    padding = 0
    for batch in all_batches:
        pad = batch["segment_ids"] == 0
        padding += pad.sum()
        assert np.all(batch["targets"][pad] == IGNORE)
        assert np.all(batch["inputs"][pad] == 0) and np.all(batch["positions"][pad] == 0)
        assert not batch["valid"][pad].any()
    assert padding > 0


def test_an_empty_last_row_carries_no_loss():
    source = Documents(num_examples=5, min_length=40)
    *_, last = make("pad", source=source)
    np.testing.assert_array_equal(last["segment_ids"][1:], 0)
    np.testing.assert_array_equal(last["targets"][1:], IGNORE)


# Coverage, truncation, sharding.


@pytest.mark.parametrize("packing", ["pack", "pad"])
def test_every_token_appears_exactly_once_per_epoch(packing):
    assert token_counts(make(packing)) == source_tokens(SOURCE)


@pytest.mark.parametrize("packing", ["pack", "pad"])
def test_two_epochs_show_every_token_twice(packing):
    counts = token_counts(make(packing, num_epochs=2))
    assert counts == {token: 2 for token in source_tokens(SOURCE)}


def test_padding_truncates_to_the_first_length_tokens():
    length = 8
    rows = list(segments(make("pad", length=length, truncate=True, shuffle=False)))
    assert len(rows) == len(SOURCE)
    for index, row in enumerate(rows):
        np.testing.assert_array_equal(row["inputs"], SOURCE[index]["inputs"][:length])


def test_padding_without_truncation_rejects_a_long_example():
    with pytest.raises(ValueError, match=r"length: example .* tokens, more than length = 8"):
        list(make("pad", length=8))


def test_drop_remainder_keeps_only_full_batches():
    dropped = make("pad", drop_remainder=True)
    assert len(list(dropped)) == len(SOURCE) // 4
    assert all(np.all(batch["segment_ids"][:, 0] == 1) for batch in dropped)


@pytest.mark.parametrize("packing", ["pack", "pad"])
def test_shards_are_disjoint_and_cover_the_data(packing):
    shards = [token_counts(make(packing, shard_index=index, shard_count=3)) for index in range(3)]
    for a, b in itertools.combinations(shards, 2):
        assert not a.keys() & b.keys()
    assert sum(shards, collections.Counter()) == source_tokens(SOURCE)


def test_a_single_process_reads_the_whole_source_by_default():
    settings = {"batch_size": 4, "length": 16, "seed": 0, "num_epochs": 1}
    assert_same_batches(list(batches(SOURCE, **settings)), list(make("pack", drop_remainder=True)))


# Order and state.


@pytest.mark.parametrize("packing", ["pack", "pad"])
def test_the_seed_fixes_the_batches(packing):
    assert_same_batches(list(make(packing, seed=3)), list(make(packing, seed=3)))
    first, other = list(make(packing, seed=3)), list(make(packing, seed=4))
    assert not np.array_equal(first[0]["inputs"], other[0]["inputs"])


def document_order(all_batches):
    return [int(s["inputs"][0]) // BASE for s in segments(all_batches)]


def test_each_epoch_is_a_new_permutation():
    order = document_order(make("pad", batch_size=1, num_epochs=2))
    first, second = order[: len(SOURCE)], order[len(SOURCE) :]
    assert sorted(first) == sorted(second) == list(range(len(SOURCE)))
    assert first != second


def test_without_shuffle_documents_keep_source_order():
    assert document_order(make("pad", shuffle=False)) == list(range(len(SOURCE)))


RESTARTABLE = {
    "pack": lambda: make("pack", num_epochs=None),
    "pad": lambda: make("pad", num_epochs=None),
    "decomposed": lambda: make_decomposed(),
}


@pytest.mark.parametrize("name", RESTARTABLE)
def test_a_restored_iterator_continues_exactly(name):
    iterator = iter(RESTARTABLE[name]())
    take(iterator, 7)
    state = json.loads(json.dumps(iterator.get_state()))
    expected = take(iterator, 12)
    restored = iter(RESTARTABLE[name]())
    restored.set_state(state)
    assert_same_batches(take(restored, 12), expected)


def test_grain_checkpoint_handler_saves_and_restores_the_position(tmp_path):
    iterator = iter(make("pack", num_epochs=None))
    take(iterator, 5)
    handler = grain.checkpoint.CheckpointHandler()
    handler.save(epath.Path(tmp_path), args=grain.checkpoint.CheckpointSave(iterator))
    expected = take(iterator, 6)
    restored = handler.restore(
        epath.Path(tmp_path),
        args=grain.checkpoint.CheckpointRestore(iter(make("pack", num_epochs=None))),
    )
    assert_same_batches(take(restored, 6), expected)


def test_a_worker_process_gives_the_same_batches():
    iterator = iter(make("pack", worker_count=1))
    try:
        assert_same_batches(list(iterator), list(make("pack")))
    finally:
        iterator.close()


# Dataset Decomposition.


def expected_chunks(size, max_length, min_length):
    """Plain-Python binary decomposition: `max_length` chunks, then the remainder's set bits
    from the highest; `(start, length)` each."""
    lengths = [max_length] * (size // max_length)
    remainder = size % max_length
    lengths += [1 << bit for bit in reversed(range(remainder.bit_length())) if remainder >> bit & 1]
    starts = np.cumsum([0, *lengths])
    return [(int(s), n) for s, n in zip(starts, lengths, strict=False) if n >= min_length]


def decomposed_rows(all_batches):
    """`(document, start, length)` of every row."""
    for batch in all_batches:
        for row in batch["inputs"]:
            document, start = divmod(int(row[0]), BASE)
            yield document, start, len(row)


def test_every_decomposed_batch_holds_tokens_per_batch_tokens():
    sizes = set()
    for batch in make_decomposed(num_epochs=1):
        rows, length = batch["inputs"].shape
        sizes.add(length)
        assert rows * length == 32
        assert 2 <= length <= 16 and length & (length - 1) == 0
        np.testing.assert_array_equal(batch["segment_ids"], 1)
        np.testing.assert_array_equal(batch["positions"], np.tile(np.arange(length), (rows, 1)))
        assert batch["valid"].shape == (rows, length, 3)
    assert len(sizes) > 1


def test_decomposed_rows_are_chunks_of_one_document():
    for batch in make_decomposed(num_epochs=1):
        documents, places = np.divmod(batch["inputs"], BASE)
        assert np.all(documents == documents[:, :1])
        np.testing.assert_array_equal(np.diff(places, axis=1), 1)
        for row_documents, row_places, row_targets in zip(
            documents, places, batch["targets"], strict=True
        ):
            source_targets = SOURCE[row_documents[0]]["targets"]
            np.testing.assert_array_equal(row_targets, source_targets[row_places])


def test_decomposition_follows_the_binary_expansion_and_uses_each_chunk_once():
    rows = list(decomposed_rows(make_decomposed(num_epochs=1)))
    assert len(rows) == len(set(rows))
    expected = {
        (document, start, length)
        for document in range(len(SOURCE))
        for start, length in expected_chunks(len(SOURCE[document]["inputs"]), 16, 2)
    }
    assert set(rows) <= expected
    left_out = collections.Counter(length for _, _, length in expected - set(rows))
    assert all(count < 32 // length for length, count in left_out.items())


def test_decomposed_epochs_sample_buckets_in_proportion_to_their_tokens():
    chunks = collections.Counter(
        length
        for document in range(len(SOURCE))
        for _, length in expected_chunks(len(SOURCE[document]["inputs"]), 16, 2)
    )
    shapes = collections.Counter(
        batch["inputs"].shape[1] for batch in make_decomposed(num_epochs=1)
    )
    expected = {length: count // (32 // length) for length, count in chunks.items()}
    assert shapes == {length: count for length, count in expected.items() if count}


def test_decomposed_epochs_reshuffle_and_the_seed_fixes_the_order():
    epoch = len(list(make_decomposed(num_epochs=1)))
    both = list(make_decomposed(num_epochs=2))
    assert sorted(b["inputs"].shape for b in both[:epoch]) == sorted(
        b["inputs"].shape for b in both[epoch:]
    )
    assert list(decomposed_rows(both[:epoch])) != list(decomposed_rows(both[epoch:]))
    assert_same_batches(both, list(make_decomposed(num_epochs=2)))
    assert list(decomposed_rows(both)) != list(
        decomposed_rows(make_decomposed(seed=1, num_epochs=2))
    )


def test_decomposed_shards_share_the_bucket_order_and_are_disjoint():
    shards = [
        list(make_decomposed(num_epochs=1, shard_index=index, shard_count=2)) for index in range(2)
    ]
    assert [b["inputs"].shape for b in shards[0]] == [b["inputs"].shape for b in shards[1]]
    assert not set(decomposed_rows(shards[0])) & set(decomposed_rows(shards[1]))


# Bad settings.


BAD_SETTINGS = [
    (lambda: make("pack", batch_size=0), "batch_size: expected a positive integer"),
    (lambda: make("pack", length=0), "length: expected a positive integer"),
    (lambda: make("stack"), "packing: expected one of"),
    (lambda: make("pack", shard_index=2, shard_count=2), r"shard_index: expected .* \[0, 2\)"),
    (lambda: make("pack", worker_count=-1), "worker_count"),
    (lambda: make_decomposed(tokens_per_batch=24), "tokens_per_batch: expected a multiple"),
    (lambda: make_decomposed(tokens_per_batch=0), "tokens_per_batch: expected a positive"),
    (lambda: make_decomposed(max_length=12), "max_length: expected a power of two"),
    (lambda: make_decomposed(min_length=32), "min_length: expected at most max_length"),
    (lambda: make_decomposed(tokens_per_batch=4096), "tokens_per_batch: .* more than"),
    (lambda: make("pack", source=[{"inputs": np.arange(3)}]), "source: example 0 has no 'targets'"),
]


@pytest.mark.parametrize(("build", "message"), BAD_SETTINGS)
def test_bad_settings_raise_a_named_error(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_an_example_missing_targets_is_named_when_read():
    with pytest.raises(ValueError, match="source: example 3 has no 'targets' field"):
        list(make("pack", source=MissingTargets()))
