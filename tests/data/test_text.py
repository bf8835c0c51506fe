"""Byte-level text sources: the standard library corpus and TFDS text datasets."""

from __future__ import annotations

import hashlib
import math
import pickle
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds

from seqjax.data.source import IGNORE
from seqjax.data.text import SPLITS, StdlibCorpus, TFDSText, split_of, stdlib_files

CORPUS = {
    "a.py": b"print('a')\n" * 3,
    "b.py": "s = 'caf\u00e9'\n".encode() * 4,
    "pkg/mod.py": b"x = 1\n",
    "pkg/sub/deep.py": b"def f():\n    return 2\n" * 2,
}
OUTSIDE = {
    "pkg/__init__.py": b"",
    "notes.txt": b"not python",
    "test/test_os.py": b"import os\n",
    "pkg/tests/test_mod.py": b"import pkg\n",
    "idlelib/idle_test/test_x.py": b"x\n",
    "site-packages/third.py": b"third\n",
    "dist-packages/other.py": b"other\n",
}
# With these fractions the four files fall in every split (pinned in a test below).
FRACTIONS = {"validation_fraction": 0.24, "test_fraction": 0.06}


@pytest.fixture
def root(tmp_path) -> Path:
    for path, data in {**CORPUS, **OUTSIDE}.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_bytes(data)
    return tmp_path


def corpus(root: Path, split: str = "train", **settings) -> StdlibCorpus:
    return StdlibCorpus(split=split, root=str(root), **{**FRACTIONS, **settings})


def expected_example(document: bytes) -> tuple[list[int], list[int]]:
    """Inputs and targets of a whole document, by plain Python."""
    return list(document), [*document[1:], IGNORE]


def test_the_corpus_is_the_non_empty_py_files_outside_test_suites_and_packages(root):
    assert stdlib_files(root) == sorted(CORPUS)


def test_a_file_s_split_depends_on_its_path_alone():
    defaults = (0.05, 0.05)
    assert split_of("os.py", *defaults) == "train"
    assert split_of("calendar.py", *defaults) == "validation"
    assert split_of("chunk.py", *defaults) == "test"
    assert [split_of(path, 0.24, 0.06) for path in sorted(CORPUS)] == [
        "train",
        "validation",
        "validation",
        "test",
    ]


def test_split_follows_the_documented_hash(root):
    for split in SPLITS:
        for path in corpus(root, split).files:
            u = int(hashlib.sha256(path.encode()).hexdigest()[:16], 16) / 2**64
            assert split == ("test" if u < 0.06 else "validation" if u < 0.30 else "train")


def test_the_splits_partition_the_corpus_in_path_order(root):
    files = [corpus(root, split).files for split in SPLITS]
    assert sorted(path for split_files in files for path in split_files) == sorted(CORPUS)
    assert all(list(split_files) == sorted(split_files) for split_files in files)


def test_example_i_is_document_i_as_bytes(root):
    for split in SPLITS:
        source = corpus(root, split)
        assert len(source) == len(source.files)
        for index, path in enumerate(source.files):
            inputs, targets = expected_example(CORPUS[path])
            assert source[index]["inputs"].dtype == np.int32
            assert source[index]["inputs"].tolist() == inputs
            assert source[index]["targets"].tolist() == targets


def test_pieces_are_consecutive_and_predict_the_document_s_next_byte(root):
    source = corpus(root, max_document_length=4)
    documents = [CORPUS[path] for path in source.files]
    assert len(source) == sum(math.ceil(len(document) / 4) for document in documents)
    pieces = [source[index] for index in range(len(source))]
    assert all(1 <= len(piece["inputs"]) <= 4 for piece in pieces)
    inputs = [token for piece in pieces for token in piece["inputs"].tolist()]
    targets = [token for piece in pieces for token in piece["targets"].tolist()]
    assert inputs == [token for document in documents for token in expected_example(document)[0]]
    assert targets == [token for document in documents for token in expected_example(document)[1]]


def test_max_length_is_the_longest_example(root):
    longest = max(len(CORPUS[path]) for path in corpus(root).files)
    assert corpus(root).max_length == longest
    assert corpus(root, max_document_length=4).max_length == 4
    assert corpus(root, max_document_length=1000).max_length == longest
    assert corpus(root).vocab_size == 256


def test_content_hash_covers_paths_and_bytes_in_order(root):
    source = corpus(root)
    digest = hashlib.sha256()
    for path in source.files:
        data = CORPUS[path]
        digest.update(path.encode() + b"\0" + len(data).to_bytes(8, "little") + data)
    assert source.content_hash == digest.hexdigest()
    (root / source.files[0]).write_bytes(CORPUS[source.files[0]].replace(b"a", b"b"))
    assert corpus(root).content_hash != digest.hexdigest()


def test_examples_are_deterministic_and_independent_of_access_order(root):
    first = corpus(root, max_document_length=5)
    second = pickle.loads(pickle.dumps(corpus(root, max_document_length=5)))
    order = [5, 0, -1, 3]
    forward = [first[index]["inputs"].tolist() for index in order]
    backward = [second[index]["inputs"].tolist() for index in reversed(order)]
    assert forward == backward[::-1]
    with pytest.raises(IndexError, match="out of range"):
        first[len(first)]


def test_a_file_that_shrinks_after_indexing_is_an_error(root):
    source = corpus(root)
    assert source[0]["inputs"].tolist() == list(CORPUS[source.files[0]])
    (root / source.files[0]).write_bytes(b"x")
    with pytest.raises(RuntimeError, match="changed"):
        source[0]


def test_the_installed_standard_library_is_a_corpus():
    train = StdlibCorpus()
    held_out = StdlibCorpus(split="validation").files + StdlibCorpus(split="test").files
    assert len(train.files) > 100 and len(held_out) > 10
    assert not set(train.files) & set(held_out)
    assert "os.py" in train.files
    excluded = {"test", "tests", "idle_test", "site-packages", "dist-packages"}
    assert not any(set(path.split("/")[:-1]) & excluded for path in train.files + held_out)
    document = (Path(sysconfig.get_paths()["stdlib"]) / train.files[0]).read_bytes()
    assert train[0]["inputs"].tolist() == list(document)
    assert len(train.content_hash) == 64


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"split": "dev"}, "split: expected one of"),
        ({"max_document_length": 0}, "max_document_length: expected a positive integer"),
        ({"max_document_length": 2.5}, "max_document_length: expected a positive integer"),
        ({"validation_fraction": 1.0}, "validation_fraction: expected a float in"),
        ({"test_fraction": -0.1}, "test_fraction: expected a float in"),
        ({"validation_fraction": 0.6, "test_fraction": 0.4}, "validation_fraction: expected"),
        ({"split": "test", "test_fraction": 0.0}, "split: no file"),
    ],
)
def test_bad_settings_are_rejected(root, settings, message):
    with pytest.raises(ValueError, match=message):
        corpus(root, **settings)


def test_a_missing_root_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="root: expected a directory"):
        StdlibCorpus(root=str(tmp_path / "absent"))


class ToyTexts(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A small prepared text dataset: two Text features, one record with an empty body."""

    VERSION = tfds.core.Version("1.0.0")
    BODIES = ("Hello, w\u00f6rld!\n", "", "abcdefghij" * 3, "\u2603")
    code_path = None  # no checksums to look up (see seqjax.data.tfds_builders.TaskBuilder)

    def _info(self):
        features = {"body": tfds.features.Text(), "title": tfds.features.Text()}
        return tfds.core.DatasetInfo(
            builder=self, features=tfds.features.FeaturesDict(features), disable_shuffling=True
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for index, body in enumerate(self.BODIES):
            yield index, {"body": body, "title": f"t{index}"}


@pytest.fixture
def toy_texts(tmp_path) -> str:
    ToyTexts(data_dir=str(tmp_path), file_format="array_record").download_and_prepare(
        download_dir=tmp_path / "downloads"
    )
    return str(tmp_path)


def test_tfds_text_reads_a_prepared_dataset_skipping_empty_documents(toy_texts):
    source = TFDSText("toy_texts", data_dir=toy_texts, text_field="body")
    documents = [body.encode() for body in ToyTexts.BODIES if body]
    assert len(source) == len(documents)
    for index, document in enumerate(documents):
        inputs, targets = expected_example(document)
        assert source[index]["inputs"].tolist() == inputs
        assert source[index]["targets"].tolist() == targets
    assert source.max_length == 30 and source.vocab_size == 256


def test_tfds_text_cuts_documents_into_pieces(toy_texts):
    source = TFDSText("toy_texts", data_dir=toy_texts, text_field="body", max_document_length=8)
    documents = [body.encode() for body in ToyTexts.BODIES if body]
    assert len(source) == sum(math.ceil(len(document) / 8) for document in documents)
    targets = [token for index in range(len(source)) for token in source[index]["targets"]]
    assert targets == [token for document in documents for token in expected_example(document)[1]]


def test_tfds_text_with_mock_data_gives_each_record_s_bytes():
    with tfds.testing.mock_data(num_examples=6):
        source = TFDSText("lm1b", split="test")
        records = tfds.data_source("lm1b", split="test")
        texts = [records[index]["text"] for index in range(6)]
        assert len(source) == 6
        for index, text in enumerate(texts):
            inputs, targets = expected_example(text.encode())
            assert source[index]["inputs"].tolist() == inputs
            assert source[index]["targets"].tolist() == targets


def test_an_unknown_dataset_is_named(tmp_path):
    with pytest.raises(ValueError, match="unknown TFDS dataset 'no_such_corpus'"):
        TFDSText("no_such_corpus", data_dir=str(tmp_path))


def test_an_unprepared_dataset_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"dataset 'lm1b' from .*: it is not prepared there"):
        TFDSText("lm1b", data_dir=str(tmp_path))


def test_a_missing_split_is_named(toy_texts):
    with pytest.raises(ValueError, match="cannot read split 'validation' of TFDS dataset"):
        TFDSText("toy_texts", split="validation", data_dir=toy_texts, text_field="body")


def test_a_missing_text_field_lists_the_text_features(toy_texts):
    with pytest.raises(ValueError, match=r"text_field: .* one of \['body', 'title'\], got 'text'"):
        TFDSText("toy_texts", data_dir=toy_texts)


def test_a_bad_max_document_length_is_rejected(toy_texts):
    with pytest.raises(ValueError, match="max_document_length: expected a positive integer"):
        TFDSText("toy_texts", data_dir=toy_texts, text_field="body", max_document_length=0)


def test_tfds_text_survives_pickling_for_worker_processes(toy_texts):
    source = TFDSText("toy_texts", data_dir=toy_texts, text_field="body", max_document_length=8)
    copy = pickle.loads(pickle.dumps(source))
    assert [copy[index]["inputs"].tolist() for index in range(len(copy))] == [
        source[index]["inputs"].tolist() for index in range(len(source))
    ]
