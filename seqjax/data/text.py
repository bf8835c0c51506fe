"""Byte-level language modelling on real text: the Python standard library, or a TFDS dataset.

Each is a data source in the sense of `seqjax.data.source` over a fixed list of documents.
A document is its UTF-8 bytes, vocabulary 256: `inputs[t]` is byte `t`, `targets[t]` byte
`t + 1`, `IGNORE` after the document's last byte. Documents are long (tens of KB) and the
pipeline packs or chunks them into rows; `max_document_length` also cuts each document into
consecutive pieces of at most that many bytes, each piece its own example, in document order.
A piece's last target is the document's next byte (the first of the next piece), so every byte
but a document's first is predicted exactly once. Empty documents yield no example.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import sysconfig
from pathlib import Path
from typing import Literal

import numpy as np
import tensorflow_datasets as tfds

from seqjax.checks import check_choice, check_positive
from seqjax.data.source import IGNORE, check_index, example

SPLITS = ("train", "validation", "test")
Split = Literal["train", "validation", "test"]
EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages"})
"""Folders of the standard library that are not part of the corpus: test suites, and the
third-party packages installed under it."""


def piece_offsets(lengths: np.ndarray, max_document_length: int | None) -> np.ndarray:
    """`[D + 1]` prefix sum of the pieces of `D` documents of `lengths` bytes: document `d` is
    pieces `offsets[d]` to `offsets[d + 1] - 1`, each at most `max_document_length` bytes (the
    whole document when `None`); an empty document has none."""
    lengths = np.asarray(lengths, np.int64)
    if max_document_length is None:
        counts = (lengths > 0).astype(np.int64)
    else:
        counts = -(-lengths // max_document_length)
    return np.concatenate([[0], np.cumsum(counts)])


def byte_example(window: bytes, length: int) -> dict:
    """The example of the first `length` bytes of `window`; `window` also holds the byte after
    them when the document goes on (their last target), else that target is `IGNORE`."""
    tokens = np.frombuffer(window, np.uint8).astype(np.int32)
    targets = np.full(length, IGNORE, np.int32)
    targets[: len(tokens) - 1] = tokens[1 : length + 1]
    return example(tokens[:length], targets)


class _ByteDocuments:
    """Documents as byte-level examples, cut into pieces of at most `max_document_length`.

    A subclass gives `max_document_length`, `_lengths` (`[D]` bytes per document) and
    `_read(document, start, stop)` (the document's bytes `[start, stop)`, fewer at its end).
    """

    vocab_size = 256

    @functools.cached_property
    def _offsets(self) -> np.ndarray:
        return piece_offsets(self._lengths, self.max_document_length)

    def __len__(self) -> int:
        return int(self._offsets[-1])

    @property
    def max_length(self) -> int:
        """The longest example: the longest document, or `max_document_length` if shorter."""
        longest = int(self._lengths.max())
        return min(longest, self.max_document_length or longest)

    def __getitem__(self, index: int) -> dict:
        index = check_index(index, len(self))
        document = int(np.searchsorted(self._offsets, index, side="right")) - 1
        size = int(self._lengths[document])
        piece = self.max_document_length or size
        start = (index - int(self._offsets[document])) * piece
        length = min(piece, size - start)
        window = self._read(document, start, start + length + 1)
        if len(window) < length:
            raise RuntimeError(
                f"document {document} has {start + len(window)} bytes, {size} when indexed: "
                "the corpus changed while in use"
            )
        return byte_example(window, length)


def _check_max_document_length(value: int | None) -> None:
    if value is not None:
        check_positive("max_document_length", value)


def _check_fraction(name: str, value: float) -> None:
    if not isinstance(value, int | float) or not 0 <= value < 1:
        raise ValueError(f"{name}: expected a float in [0, 1), got {value!r}")


def stdlib_files(root: str | Path) -> list[str]:
    """The non-empty `.py` files under `root` outside `EXCLUDED_DIRS`, as sorted relative POSIX
    paths (so the order and the split are the same on every machine)."""
    root = Path(root)
    files = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [name for name in subfolders if name not in EXCLUDED_DIRS]
        for name in names:
            path = Path(folder, name)
            if name.endswith(".py") and path.is_file() and path.stat().st_size > 0:
                files.append(path.relative_to(root).as_posix())
    return sorted(files)


def split_of(path: str, validation_fraction: float, test_fraction: float) -> Split:
    """The split of a file by its relative path alone: `u` = the first 8 bytes of the path's
    SHA-256, big-endian, over `2 ** 64`; "test" if `u < test_fraction`, "validation" if
    `u < test_fraction + validation_fraction`, else "train"."""
    u = int.from_bytes(hashlib.sha256(path.encode()).digest()[:8], "big") / 2**64
    if u < test_fraction:
        return "test"
    return "validation" if u < test_fraction + validation_fraction else "train"


@dataclasses.dataclass(frozen=True)
class StdlibCorpus(_ByteDocuments):
    """The Python standard library's own source as a byte-level corpus, offline everywhere.

    Documents: `stdlib_files(root)` (`root` defaults to `sysconfig.get_paths()["stdlib"]`): the
    non-empty `.py` files, sorted by relative path, without the test suites (`test/`,
    `tests/`, `idlelib/idle_test/`) and `site-packages`/`dist-packages`. Split: `split_of`
    each path (a hash of the path, so a file keeps its split on every machine). Example `i`:
    piece `i` of the split's documents, each file's bytes (UTF-8 source) as in the module doc.

    The corpus differs between Python versions: record `files` and `content_hash` with every
    result. Files are read when an example is asked for, so the source pickles small.
    """

    split: Split = "train"
    max_document_length: int | None = None
    validation_fraction: float = 0.05
    test_fraction: float = 0.05
    root: str | None = None

    def __post_init__(self):
        check_choice("split", self.split, SPLITS)
        _check_max_document_length(self.max_document_length)
        _check_fraction("validation_fraction", self.validation_fraction)
        _check_fraction("test_fraction", self.test_fraction)
        if self.validation_fraction + self.test_fraction >= 1:
            raise ValueError(
                "validation_fraction: expected validation_fraction + test_fraction < 1, got "
                f"{self.validation_fraction} + {self.test_fraction}"
            )
        if not self.directory.is_dir():
            raise ValueError(f"root: expected a directory, got {str(self.directory)!r}")
        if not self.files:
            raise ValueError(f"split: no file of {str(self.directory)!r} is in {self.split!r}")

    @property
    def directory(self) -> Path:
        return Path(self.root if self.root is not None else sysconfig.get_paths()["stdlib"])

    @functools.cached_property
    def files(self) -> tuple[str, ...]:
        """This split's documents: their paths relative to `directory`, in example order."""
        fractions = (self.validation_fraction, self.test_fraction)
        return tuple(
            path
            for path in stdlib_files(self.directory)
            if split_of(path, *fractions) == self.split
        )

    @functools.cached_property
    def content_hash(self) -> str:
        """SHA-256 (hex) over this split's documents in order: for each, its relative path in
        UTF-8, a NUL byte, its length as 8 little-endian bytes, then its bytes."""
        digest = hashlib.sha256()
        for path in self.files:
            data = (self.directory / path).read_bytes()
            digest.update(path.encode() + b"\0" + len(data).to_bytes(8, "little") + data)
        return digest.hexdigest()

    @functools.cached_property
    def _lengths(self) -> np.ndarray:
        return np.array([(self.directory / path).stat().st_size for path in self.files], np.int64)

    def _read(self, document: int, start: int, stop: int) -> bytes:
        with open(self.directory / self.files[document], "rb") as file:
            file.seek(start)
            return file.read(stop - start)


def _text_bytes(value) -> bytes:
    """A TFDS `Text` value as UTF-8 bytes (`bytes` from array_record; `str` from mock data)."""
    if isinstance(value, np.ndarray):
        value = value.item()
    return value.encode() if isinstance(value, str) else bytes(value)


@dataclasses.dataclass(frozen=True)
class TFDSText(_ByteDocuments):
    """Byte-level examples of the `text_field` of a prepared TFDS dataset, read by name.

    Documents: the records of `tfds.data_source(name, split=split, data_dir=data_dir)` in
    order (random access over array_record, no TensorFlow), each record's `text_field` (a
    `tfds.features.Text`) as UTF-8 bytes; examples as in the module doc. The dataset must
    already be prepared in array_record format under `data_dir` (preparing most catalog
    datasets needs TensorFlow or Beam). The first `len` or example reads every record once to
    index the non-empty documents and their pieces.
    """

    name: str
    split: str = "train"
    data_dir: str | None = None
    text_field: str = "text"
    max_document_length: int | None = None

    def __post_init__(self):
        _check_max_document_length(self.max_document_length)
        try:
            builder = tfds.builder(self.name, data_dir=self.data_dir)
        except tfds.core.registered.DatasetNotFoundError:
            raise ValueError(
                f"name: unknown TFDS dataset {self.name!r} (neither in the TFDS catalog nor "
                f"prepared under data_dir={self.data_dir!r})"
            ) from None
        features = builder.info.features.items()
        texts = sorted(key for key, value in features if isinstance(value, tfds.features.Text))
        if self.text_field not in texts:
            raise ValueError(
                f"text_field: expected a Text feature of {self.name!r}, one of {texts}, "
                f"got {self.text_field!r}"
            )
        try:
            records = builder.as_data_source(split=self.split)
        except (NotImplementedError, ValueError, FileNotFoundError, AssertionError) as error:
            reason = error if builder.is_prepared() else "it is not prepared there"
            raise ValueError(
                f"name: cannot read split {self.split!r} of TFDS dataset {self.name!r} from "
                f"{builder.data_dir}: {reason} (prepare it with file_format='array_record')"
            ) from error
        object.__setattr__(self, "_records", records)

    @functools.cached_property
    def _lengths(self) -> np.ndarray:
        texts = (self._records[index][self.text_field] for index in range(len(self._records)))
        lengths = [len(_text_bytes(text)) for text in texts]
        return np.array(lengths, np.int64)

    def _read(self, document: int, start: int, stop: int) -> bytes:
        return _text_bytes(self._records[document][self.text_field])[start:stop]
