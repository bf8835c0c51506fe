"""From any data source to fixed-shape training batches, through grain.

A source is index-addressable (`seqjax.data.source`); this module turns it into batches, using
grain for sharding, shuffling, epochs, worker processes and checkpointable iterator state.
A batch is a dict of NumPy arrays, every one `[B, L]` (a task field `[B, L, ...]`):

- `inputs: [B, L] int32`, and the task's extra fields (`valid: [B, L, V] bool`), zero or
  False in padding;
- `targets: [B, L] int32`, `IGNORE` wherever there is no loss, padding included;
- `segment_ids: [B, L] int32`: 1, 2, ... for the documents of a row, 0 for padding;
- `positions: [B, L] int32`: the token's index within its segment (0 at every segment start).

The models take `segment_ids` and `positions` as given: tokens of different segments never
interact, so nothing leaks between the documents packed into one row.

Two entry points, both returning a `grain.IterDataset` whose iterator has checkpointable state
(`get_state()` / `set_state(state)`, a JSON-serializable dict; Orbax saves it with
`grain.checkpoint.CheckpointSave(iterator)` and restores it with `CheckpointRestore`). A
restored iterator yields exactly the batches the original would have yielded next.

- `batches`: rows of one fixed `length`, by packing several documents per row (`"pack"`) or one
  document per row (`"pad"`);
- `decomposed_batches`: Dataset Decomposition (Pouransari et al., 2024; PAPERS.md B.2 [7]):
  rows of power-of-two lengths, every batch from one length bucket, a constant token count per
  batch.

Multi-host: each host reads a disjoint shard (`shard_index` of `shard_count`, by default
`jax.process_index()` of `jax.process_count()`) and every batch size here is per host.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Literal

import grain
import jax
import numpy as np
from absl import flags

from seqjax.checks import check_choice, check_positive
from seqjax.data.source import IGNORE

Packing = Literal["pack", "pad"]
PACKINGS = ("pack", "pad")
# Names a batch adds to a source's fields; a source may not use them itself.
BATCH_FIELDS = ("segment_ids", "positions")


def batches(
    source: Sequence[dict],
    *,
    batch_size: int,
    length: int,
    seed: int,
    packing: Packing = "pack",
    truncate: bool = True,
    shuffle: bool = True,
    num_epochs: int | None = None,
    shard_index: int | None = None,
    shard_count: int | None = None,
    worker_count: int = 0,
    drop_remainder: bool = True,
) -> grain.IterDataset:
    """Batches `[B, L] = [batch_size, length]` of `source`'s examples (layout in the module doc).

    `packing="pack"` fills each row with several documents by grain's first-fit packing over
    `batch_size` rows at a time, each document a new segment. A document longer than `length`
    is first split into consecutive pieces of at most `length` tokens, each piece its own
    segment (so its positions restart at 0): no token is dropped.
    `packing="pad"` puts one example per row, padded to `length`; an example longer than
    `length` is cut to its first `length` tokens (its tail is dropped) if `truncate`, and is an
    error otherwise (`truncate` only concerns `"pad"`). First-fit packing closes its `batch_size`
    rows as soon as a piece fits in none of them, so larger batches pack tighter.

    `batch_size` is per host: this host reads examples `shard_index::shard_count` (defaults: the
    JAX process index and count). With `shuffle`, the shard is shuffled by `seed`, differently
    in every epoch. `num_epochs=None` repeats forever; with a finite count the stream ends after
    it, the last batch padded with empty rows (segment 0, `IGNORE` targets) unless
    `drop_remainder`. Hosts can then end after different numbers of batches (they hold different
    documents), so a multi-host run should train for a step count on the endless stream.
    `worker_count > 0` builds the batches in that many grain worker processes (the source must
    then be picklable); the batches are deterministic for a given `worker_count` but change
    with it when packing.
    """
    check_positive("batch_size", batch_size)
    check_positive("length", length)
    check_choice("packing", packing, PACKINGS)
    shard_index, shard_count = _shard(source, shard_index, shard_count)
    check = _ExampleCheck(
        fields=_fields(source),
        max_length=None if packing == "pack" or truncate else length,
    )
    documents = _documents(
        source,
        check,
        seed=seed,
        shuffle=shuffle,
        num_epochs=num_epochs,
        shard_index=shard_index,
        shard_count=shard_count,
    )
    stack = functools.partial(_stack_rows, batch_size=batch_size)
    if packing == "pad":
        rows = documents.map(functools.partial(_pad_row, length=length))
        batched = rows.batch(batch_size, drop_remainder=drop_remainder, batch_fn=stack)
        return _with_workers(batched.to_iter_dataset(), worker_count)
    pieces = grain.experimental.FlatMapIterDataset(
        documents.to_iter_dataset(), _SplitDocument(length)
    )
    packed = grain.experimental.FirstFitPackIterDataset(
        pieces,
        length_struct={field: length for field in check.fields},
        num_packing_bins=batch_size,
        shuffle_bins=False,
        padding_struct={field: IGNORE if field == "targets" else 0 for field in check.fields},
    )
    rows = packed.map(functools.partial(_packed_row, fields=check.fields))
    batched = rows.batch(batch_size, drop_remainder=drop_remainder, batch_fn=stack)
    return _with_workers(batched, worker_count)


def decomposed_batches(
    source: Sequence[dict],
    *,
    tokens_per_batch: int,
    max_length: int,
    min_length: int,
    seed: int,
    shuffle: bool = True,
    num_epochs: int | None = None,
    shard_index: int | None = None,
    shard_count: int | None = None,
    worker_count: int = 0,
) -> grain.IterDataset:
    """Dataset Decomposition batches: `[tokens_per_batch / 2^i, 2^i]`, one bucket `i` each.

    Every document is cut, from its start, into consecutive chunks: chunks of `max_length`
    while at least `max_length` tokens remain, then one chunk per set bit of the remaining
    length's binary expansion, largest first (a 13-token document with `max_length=8` gives
    8, 4, 1). Chunks shorter than `min_length` are dropped (fewer than `min_length` tokens per
    document). Bucket `D_i` holds the chunks of length `2^i`; a chunk is one segment, so no row
    mixes documents. Each batch is drawn from one bucket with `tokens_per_batch / 2^i` rows, so
    every batch holds exactly `tokens_per_batch` tokens (per host) and there is no padding.

    Order (the curriculum): each epoch shuffles every bucket's chunks and then the order of all
    the epoch's batches, by `seed` and the epoch. Each batch carries the same number of tokens,
    so a uniformly shuffled order samples the buckets in proportion to their (remaining) token
    counts: the paper's baseline mixture, with no short-to-long length curriculum. Without
    `shuffle` the batches go bucket by bucket, shortest first, in document order. A bucket's
    last chunks that do not fill a batch are left out of that epoch (different ones each epoch
    when shuffling).

    The decomposition needs every document's length, so building this reads each example of
    `source` once. Sharding is by chunk, not by document: every host plans the same global
    batches and takes its own `tokens_per_batch / 2^i` rows of each, so all hosts see the same
    bucket (the same shape) at every step and the same number of batches per epoch.
    `num_epochs`, `worker_count`: as in `batches`. Rows have `2^i` different lengths, so a
    jitted step compiles once per bucket.
    """
    check_positive("tokens_per_batch", tokens_per_batch)
    _check_power_of_two("max_length", max_length)
    _check_power_of_two("min_length", min_length)
    if min_length > max_length:
        raise ValueError(
            f"min_length: expected at most max_length = {max_length}, got {min_length}"
        )
    if tokens_per_batch % max_length:
        raise ValueError(
            f"tokens_per_batch: expected a multiple of every chunk length, i.e. of max_length "
            f"= {max_length}, got {tokens_per_batch}"
        )
    shard_index, shard_count = _shard(source, shard_index, shard_count)
    check = _ExampleCheck(fields=_fields(source), max_length=None)
    lengths = [len(check(index, source[index])["inputs"]) for index in range(len(source))]
    batch_of = _DecomposedBatch(
        source=source,
        check=check,
        buckets=_buckets(lengths, max_length=max_length, min_length=min_length),
        tokens_per_batch=tokens_per_batch,
        seed=seed,
        shuffle=shuffle,
        shard_index=shard_index,
        shard_count=shard_count,
    )
    if batch_of.steps_per_epoch == 0:
        raise ValueError(
            f"tokens_per_batch: {tokens_per_batch} tokens per host over {shard_count} hosts is "
            "more than any length bucket of the source holds; lower it or add data"
        )
    steps = grain.MapDataset.range(batch_of.steps_per_epoch).repeat(num_epochs)
    return _with_workers(steps.map_with_index(batch_of).to_iter_dataset(), worker_count)


def _shard(source: Sequence[dict], index: int | None, count: int | None) -> tuple[int, int]:
    """This host's shard `(index, count)`, the JAX process by default."""
    count = jax.process_count() if count is None else count
    index = jax.process_index() if index is None else index
    check_positive("shard_count", count)
    if not isinstance(index, int | np.integer) or not 0 <= index < count:
        raise ValueError(f"shard_index: expected an integer in [0, {count}), got {index!r}")
    if len(source) < count:
        raise ValueError(
            f"source: expected at least shard_count = {count} examples, got {len(source)}"
        )
    return int(index), int(count)


def _fields(source: Sequence[dict]) -> tuple[str, ...]:
    """The field names of `source[0]`, which every example must share (checked up front, so a
    source missing `inputs` or `targets` fails before any batch is built)."""
    first = source[0]
    if not isinstance(first, dict):
        raise ValueError(f"source: expected examples that are dicts, got {type(first).__name__}")
    fields = tuple(first)
    _ExampleCheck(fields=fields, max_length=None)(0, first)
    return fields


@dataclasses.dataclass(frozen=True)
class _ExampleCheck:
    """Checks each example against the source contract as it is read (grain calls it with the
    example's index), naming the example and the field at fault."""

    fields: tuple[str, ...]
    max_length: int | None

    def __call__(self, index: int, example: dict) -> dict:
        for name in ("inputs", "targets"):
            if name not in example:
                raise ValueError(
                    f"source: example {index} has no {name!r} field (fields: {sorted(example)})"
                )
        if set(example) != set(self.fields):
            raise ValueError(
                f"source: example {index} has fields {sorted(example)}, example 0 has "
                f"{sorted(self.fields)}"
            )
        for name in BATCH_FIELDS:
            if name in example:
                raise ValueError(f"source: example {index} has field {name!r}, a batch field")
        example = {name: np.asarray(value) for name, value in example.items()}
        inputs = example["inputs"]
        if inputs.ndim != 1:
            raise ValueError(f"source: example {index} has inputs of shape {inputs.shape}, not [T]")
        for name, value in example.items():
            if value.ndim < 1 or len(value) != len(inputs):
                raise ValueError(
                    f"source: example {index} field {name!r} has shape {value.shape}, expected "
                    f"leading length T = {len(inputs)}"
                )
        if self.max_length is not None and len(inputs) > self.max_length:
            raise ValueError(
                f"length: example {index} has {len(inputs)} tokens, more than length = "
                f"{self.max_length}; raise length or pass truncate=True to cut examples"
            )
        return example


def _documents(
    source: Sequence[dict],
    check: _ExampleCheck,
    *,
    seed: int,
    shuffle: bool,
    num_epochs: int | None,
    shard_index: int,
    shard_count: int,
) -> grain.MapDataset:
    """This host's checked examples, shuffled per epoch and repeated."""
    documents = grain.MapDataset.source(source).map_with_index(check).seed(seed)
    documents = documents[shard_index::shard_count]
    if shuffle:
        documents = documents.shuffle()
    return documents.repeat(num_epochs)


def _pad_row(example: dict, *, length: int) -> dict:
    """One example as one row of `length` tokens: cut to `length`, then padded."""
    size = min(len(example["inputs"]), length)
    row = {}
    for name, value in example.items():
        padded = np.zeros((length, *value.shape[1:]), value.dtype)
        padded[:size] = value[:size]
        row[name] = padded
    row["targets"][size:] = IGNORE
    row["segment_ids"] = (np.arange(length) < size).astype(np.int32)
    row["positions"] = np.where(row["segment_ids"], np.arange(length), 0).astype(np.int32)
    return row


@dataclasses.dataclass(frozen=True)
class _SplitDocument(grain.experimental.FlatMapTransform):
    """A document as its consecutive pieces of at most `length` tokens (every field)."""

    length: int

    def flat_map(self, example: dict) -> list[dict]:
        starts = range(0, len(example["inputs"]), self.length)
        return [
            {name: value[start : start + self.length] for name, value in example.items()}
            for start in starts
        ]


def _packed_row(row: dict, *, fields: tuple[str, ...]) -> dict:
    """A row of grain's packing with our names: one `segment_ids` and `positions` (the packer
    gives every field its own, all equal, as `<field>_segment_ids` / `<field>_positions`)."""
    return {
        **{name: row[name] for name in fields},
        "segment_ids": row["inputs_segment_ids"],
        "positions": row["inputs_positions"],
    }


def _stack_rows(rows: Sequence[dict], *, batch_size: int) -> dict:
    """Rows stacked into a `[batch_size, ...]` batch; a short last batch is padded with empty
    rows (segment 0, `IGNORE` targets)."""
    batch = grain.experimental.batch_and_pad(rows, batch_size=batch_size)
    batch["targets"] = np.where(batch["segment_ids"] == 0, IGNORE, batch["targets"])
    return batch


def _with_workers(dataset: grain.IterDataset, worker_count: int) -> grain.IterDataset:
    if not isinstance(worker_count, int | np.integer) or worker_count < 0:
        raise ValueError(f"worker_count: expected a non-negative integer, got {worker_count!r}")
    if worker_count == 0:
        return dataset
    if not flags.FLAGS.is_parsed():
        # grain's worker processes read its absl flags, which outside an absl app (a notebook,
        # pytest) are still unparsed: use their defaults rather than fail there.
        flags.FLAGS.mark_as_parsed()
    return dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))


def _check_power_of_two(name: str, value: int) -> None:
    check_positive(name, value)
    if value & (value - 1):
        raise ValueError(f"{name}: expected a power of two, got {value}")


def _chunk_spans(length: int, *, max_length: int, min_length: int) -> list[tuple[int, int]]:
    """`(start, size)` of a document's Dataset Decomposition chunks, in document order: greedy
    largest-first, which after the `max_length` chunks is the remainder's binary expansion."""
    spans = []
    start = 0
    size = max_length
    while size >= min_length:
        while length - start >= size:
            spans.append((start, size))
            start += size
        size //= 2
    return spans


@dataclasses.dataclass(frozen=True)
class _Bucket:
    """The chunks of one length, as parallel arrays `documents[n]`, `starts[n]`."""

    chunk_length: int
    documents: np.ndarray
    starts: np.ndarray


def _buckets(lengths: Sequence[int], *, max_length: int, min_length: int) -> tuple[_Bucket, ...]:
    """The non-empty buckets of the documents' chunks, shortest chunks first."""
    chunks: dict[int, list[tuple[int, int]]] = {}
    for document, length in enumerate(lengths):
        for start, size in _chunk_spans(length, max_length=max_length, min_length=min_length):
            chunks.setdefault(size, []).append((document, start))
    return tuple(
        _Bucket(
            chunk_length=size,
            documents=np.array([document for document, _ in chunks[size]], np.int64),
            starts=np.array([start for _, start in chunks[size]], np.int64),
        )
        for size in sorted(chunks)
    )


@dataclasses.dataclass(frozen=True)
class _EpochPlan:
    """One epoch's batches: batch `k` takes bucket `bucket[k]`'s `index[k]`-th group of chunks
    in that bucket's `order` for the epoch."""

    bucket: np.ndarray
    index: np.ndarray
    orders: tuple[np.ndarray, ...]


class _DecomposedBatch:
    """Step `k` of the endless stream -> this host's Dataset Decomposition batch (grain calls it
    with the step as index); the plan of an epoch is a pure function of the seed and epoch."""

    def __init__(
        self,
        *,
        source: Sequence[dict],
        check: _ExampleCheck,
        buckets: tuple[_Bucket, ...],
        tokens_per_batch: int,
        seed: int,
        shuffle: bool,
        shard_index: int,
        shard_count: int,
    ):
        self.source = source
        self.check = check
        self.buckets = buckets
        self.seed = seed
        self.shuffle = shuffle
        self.shard_index = shard_index
        self.shard_count = shard_count
        self.rows = [tokens_per_batch // bucket.chunk_length for bucket in buckets]
        self.batches = [
            len(bucket.documents) // (rows * shard_count)
            for bucket, rows in zip(buckets, self.rows, strict=True)
        ]
        self.steps_per_epoch = sum(self.batches)
        self._plan: tuple[int, _EpochPlan] | None = None

    def plan(self, epoch: int) -> _EpochPlan:
        cached = self._plan
        if cached is not None and cached[0] == epoch:
            return cached[1]
        bucket = np.repeat(np.arange(len(self.buckets)), self.batches)
        index = np.concatenate([np.arange(count) for count in self.batches])
        if self.shuffle:
            rng = np.random.default_rng([self.seed, epoch])
            orders = tuple(rng.permutation(len(b.documents)) for b in self.buckets)
            shuffled = rng.permutation(self.steps_per_epoch)
            bucket, index = bucket[shuffled], index[shuffled]
        else:
            orders = tuple(np.arange(len(b.documents)) for b in self.buckets)
        plan = _EpochPlan(bucket=bucket, index=index, orders=orders)
        self._plan = (epoch, plan)
        return plan

    def __call__(self, step: int, _: int) -> dict:
        epoch, step_in_epoch = divmod(step, self.steps_per_epoch)
        plan = self.plan(epoch)
        which = int(plan.bucket[step_in_epoch])
        bucket, rows = self.buckets[which], self.rows[which]
        first = (int(plan.index[step_in_epoch]) * self.shard_count + self.shard_index) * rows
        chunks = plan.orders[which][first : first + rows]
        size = bucket.chunk_length
        chunk_rows = [
            self.chunk(int(document), int(start), size)
            for document, start in zip(bucket.documents[chunks], bucket.starts[chunks], strict=True)
        ]
        batch = {name: np.stack([row[name] for row in chunk_rows]) for name in self.check.fields}
        batch["segment_ids"] = np.ones((rows, size), np.int32)
        batch["positions"] = np.broadcast_to(np.arange(size, dtype=np.int32), (rows, size)).copy()
        return batch

    def chunk(self, document: int, start: int, size: int) -> dict:
        """Tokens `[start, start + size)` of `document`, every field."""
        example = self.check(document, self.source[document])
        return {name: value[start : start + size] for name, value in example.items()}


def host_batches(
    source: Sequence[dict],
    *,
    batch_size: int,
    length: int,
    packing: Packing | Literal["decompose"] = "pack",
    min_length: int = 1,
    num_shards: int | None = None,
    **options,
) -> grain.IterDataset:
    """This host's rows of global batches of `batch_size` rows of `length` tokens (`options`:
    those of `batches`, but the sharding).

    The data is cut into `num_shards` shards (default: one per host), each batched on its own
    (`batches` with `batch_size / num_shards` rows); a host reads `num_shards / process count`
    of them and puts their batches side by side, and the global batch is every host's rows in
    process order. So the global batches depend on the seed and `num_shards` alone: a run on
    one host with `num_shards=2` sees the batches a two-host run sees, which is how the
    multi-host path is tested on one machine.

    `packing="decompose"` gives Dataset Decomposition's batches instead (`decomposed_batches`
    with `batch_size * length` tokens per global batch, chunks of `min_length` to `length`
    tokens): `[batch_size * length / 2^i, 2^i]`, one length bucket per step."""
    hosts, host = jax.process_count(), jax.process_index()
    num_shards = hosts if num_shards is None else num_shards
    check_positive("num_shards", num_shards)
    if num_shards % hosts:
        raise ValueError(f"num_shards: {num_shards} shards do not split over {hosts} hosts")
    check_positive("batch_size", batch_size)
    if batch_size % num_shards:
        raise ValueError(
            f"batch_size: {batch_size} rows do not split into {num_shards} shards' batches"
        )
    per_host = num_shards // hosts
    rows = batch_size // num_shards
    shards = []
    for shard in range(host * per_host, (host + 1) * per_host):
        if packing == "decompose":
            shards.append(
                decomposed_batches(
                    source,
                    tokens_per_batch=rows * length,
                    max_length=length,
                    min_length=min_length,
                    shard_index=shard,
                    shard_count=num_shards,
                    **options,
                )
            )
        else:
            shards.append(
                batches(
                    source,
                    batch_size=rows,
                    length=length,
                    packing=packing,
                    shard_index=shard,
                    shard_count=num_shards,
                    **options,
                )
            )
    return grain.experimental.ZipIterDataset(shards).map(_concatenate_rows)


def _concatenate_rows(shard_batches: tuple[dict, ...]) -> dict:
    return {
        field: np.concatenate([batch[field] for batch in shard_batches])
        for field in shard_batches[0]
    }
