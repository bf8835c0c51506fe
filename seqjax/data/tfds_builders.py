"""Fixed evaluation sets on disk: any data source written as a TFDS dataset in array_record.

A source (`seqjax.data.source`) makes any example on demand, so a sweep needs no prepare step;
a fixed set that others must score on the same examples is written once with `write_task`
and read back with `StoredTask`, a source again (random access, `len`, the same example dicts,
`vocab_size` and `max_length`), so the training pipeline reads it like the generator it came
from.

How, without TensorFlow: TFDS's own `GeneratorBasedBuilder` prepares array_record files with
no TensorFlow installed (it builds the `tf.train.Example` protos from its vendored copies with
NumPy and writes them with `array_record`), and `as_data_source` / `tfds.data_source` parse
them back with NumPy. So `TaskBuilder` is an ordinary TFDS builder: every field is a
`tfds.features.Tensor` of shape `(None, *trailing)` (the leading axis is the example's length
`T`) with zlib encoding, which stores the array's raw bytes, so every dtype reads back exactly
(the default encoding keeps floats as float32) and the sparse `targets` and `valid` masks
compress well. Examples keep their source order (`disable_shuffling`).

On disk, `directory/name/1.0.0/` holds `name-<split>.array_record-*`, `features.json` and
`dataset_info.json`, whose metadata records each split's `vocab_size`, `max_length` and the
`repr` of the source that wrote it. Any TFDS reader opens it:
`tfds.builder_from_directory(path).as_data_source(split)`, or `tfds.data_source(name,
split=..., data_dir=directory)` when `name` is not also a TFDS catalog name.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from seqjax.data.source import check_index

VERSION = "1.0.0"
_NAME = re.compile(r"[a-z][a-z0-9_]*")
_SPLIT = re.compile(r"[a-z][a-z0-9_]*")


def _field_specs(split: str, first: Mapping[str, np.ndarray]) -> dict[str, tuple]:
    """`{field: (dtype, trailing shape)}` of a split's first example; `inputs` and `targets`
    must be `[T] int32` and every field must share their leading axis."""
    for field in ("inputs", "targets"):
        value = first.get(field)
        if value is None or value.dtype != np.int32 or value.ndim != 1:
            got = None if value is None else (value.dtype, value.shape)
            raise ValueError(f"splits[{split!r}]: expected `{field}` as [T] int32, got {got}")
    return {field: (value.dtype, value.shape[1:]) for field, value in first.items()}


def _check_example(split: str, index: int, example: Mapping, specs: Mapping[str, tuple]) -> None:
    """Every example of a split has the first one's fields, dtypes, trailing shapes, and a
    common leading axis `T`."""
    got = {field: (value.dtype, value.shape[1:]) for field, value in example.items()}
    lengths = {value.shape[0] if value.ndim else None for value in example.values()}
    if got != specs or len(lengths) != 1:
        raise ValueError(
            f"splits[{split!r}][{index}]: expected fields {specs} with one leading axis T, got "
            f"{ {field: value.shape for field, value in example.items()} } of dtypes "
            f"{ {field: str(value.dtype) for field, value in example.items()} }"
        )


def _split_metadata(split: str, source: Sequence) -> dict:
    """What a reader needs besides the examples: the source's sizes and its settings."""
    sizes = {size: getattr(source, size, None) for size in ("vocab_size", "max_length")}
    if not all(isinstance(size, int | np.integer) and size > 0 for size in sizes.values()):
        raise ValueError(
            f"splits[{split!r}]: expected a source with positive int `vocab_size` and "
            f"`max_length`, got {sizes}"
        )
    return {**{key: int(size) for key, size in sizes.items()}, "source": repr(source)}


class TaskBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A TFDS builder writing the given sources, one per split, as dataset `name`.

    `splits` maps a split name to a source; the fields of every split must agree (those of the
    first example of the first split fix the features). Not registered in the TFDS catalog: the
    name is the caller's, and the written dataset is read by directory (see the module doc).
    """

    VERSION = tfds.core.Version(VERSION)
    # Where TFDS looks for a builder's download checksums; this builder downloads nothing. TFDS's
    # lookup also imports `importlib_resources`, which it declares only for Python < 3.9.
    code_path = None

    def __init__(self, name: str, splits: Mapping[str, Sequence], *, data_dir: str | Path):
        self.name = name
        self._sources = dict(splits)
        self._specs = self._common_specs()
        super().__init__(data_dir=str(data_dir), file_format="array_record")

    def _common_specs(self) -> dict[str, tuple]:
        specs = None
        for split, source in self._sources.items():
            if len(source) == 0:
                raise ValueError(f"splits[{split!r}]: expected a non-empty source, got {source!r}")
            split_specs = _field_specs(split, source[0])
            if specs is not None and split_specs != specs:
                raise ValueError(
                    f"splits[{split!r}]: expected the fields of the first split {specs}, "
                    f"got {split_specs}"
                )
            specs = split_specs
        return specs

    def _info(self) -> tfds.core.DatasetInfo:
        features = {
            field: tfds.features.Tensor(
                shape=(None, *trailing), dtype=dtype, encoding=tfds.features.Encoding.ZLIB
            )
            for field, (dtype, trailing) in self._specs.items()
        }
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"seqjax task examples ({', '.join(self._specs)}), one split per source.",
            features=tfds.features.FeaturesDict(features),
            metadata=tfds.core.MetadataDict(
                splits={split: _split_metadata(split, src) for split, src in self._sources.items()}
            ),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager) -> dict[str, Iterator]:
        del dl_manager
        return {split: self._generate_examples(split) for split in self._sources}

    def _generate_examples(self, split: str) -> Iterator[tuple[int, dict]]:
        source = self._sources[split]
        for index in range(len(source)):
            example = source[index]
            _check_example(split, index, example, self._specs)
            yield index, dict(example)


def write_task(
    directory: str | Path, name: str, splits: Mapping[str, Sequence], *, overwrite: bool = False
) -> Path:
    """Writes every source of `splits` (split name -> source) as split of TFDS dataset `name`
    under `directory`; returns the dataset's folder `directory/name/1.0.0`.

    A dataset already there is an error unless `overwrite`, since a shared evaluation set must
    not change silently under the same name and version.
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"name: expected a snake_case name like 'mqar_eval', got {name!r}")
    if not splits:
        raise ValueError("splits: expected at least one split name -> source, got none")
    for split in splits:
        if not isinstance(split, str) or not _SPLIT.fullmatch(split):
            raise ValueError(f"splits: expected snake_case split names like 'test', got {split!r}")
    builder_dir = Path(directory) / name / VERSION
    if builder_dir.exists():
        if not overwrite:
            raise FileExistsError(
                f"directory: dataset {name!r} already exists at {builder_dir}; "
                "pass overwrite=True to replace it"
            )
        shutil.rmtree(builder_dir)
    builder = TaskBuilder(name, splits, data_dir=directory)
    with tempfile.TemporaryDirectory() as download_dir:  # TFDS makes one; nothing is downloaded
        builder.download_and_prepare(download_dir=download_dir)
    return builder_dir


@dataclasses.dataclass(frozen=True)
class StoredTask:
    """Split `split` of a dataset written by `write_task`, read back as a data source.

    Example `i` is the dict the writing source gave for `i` (same fields, dtypes and shapes);
    `vocab_size` and `max_length` are the writing source's; `source` is its `repr`.
    Reading needs neither the source's code nor TensorFlow.
    """

    directory: str
    name: str
    split: str = "test"

    def __post_init__(self):
        builder_dir = Path(self.directory) / self.name / VERSION
        if not (builder_dir / "dataset_info.json").exists():
            raise ValueError(
                f"name: no dataset {self.name!r} written by write_task under {self.directory} "
                f"(expected {builder_dir}/dataset_info.json)"
            )
        builder = tfds.builder_from_directory(builder_dir)
        splits = builder.info.metadata["splits"]
        if self.split not in splits:
            raise ValueError(
                f"split: expected one of {sorted(splits)} of dataset {self.name!r}, "
                f"got {self.split!r}"
            )
        object.__setattr__(self, "_metadata", splits[self.split])
        object.__setattr__(self, "_records", builder.as_data_source(split=self.split))

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict:
        return self._records[check_index(index, len(self))]

    @property
    def vocab_size(self) -> int:
        return self._metadata["vocab_size"]

    @property
    def max_length(self) -> int:
        return self._metadata["max_length"]

    @property
    def source(self) -> str:
        """The `repr` of the source that wrote this split (its generator settings)."""
        return self._metadata["source"]
