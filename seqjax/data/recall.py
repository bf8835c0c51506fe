"""Recall tasks: multi-query associative recall, set disjointness and passkey retrieval.

Each class is a data source in the sense of `seqjax.data.source`: example `i` is a pure
function of `(seed, i)`, with `inputs: [T] int32` and sparse `targets: [T] int32` (`IGNORE`
where there is no loss), `targets[t]` being the token to predict after reading `inputs[t]`.
These are the recall probes of Zoology (MQAR), Just Read Twice (MQAR with repeated context,
set disjointness) and Stuffed Mamba (passkey retrieval); see `../shared/PAPERS.md` B.1.6, B.3.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import ClassVar

import numpy as np

from seqjax.checks import check_at_least, check_bool, check_positive
from seqjax.data.source import IGNORE, check_index, example, example_rng


@dataclasses.dataclass(frozen=True)
class MQAR:
    """Multi-query associative recall (Zoology), with JRT's repeated key-value block.

    Follows `multiquery_ar` in HazyResearch/zoology `zoology/data/multiquery_ar.py` (Arora,
    Eyuboglu et al., "Zoology", 2023; `num_passes` from Arora et al., "Just read twice", 2024).
    With `V = vocab_size`, `T = length` (zoology's `input_seq_len`), `P = num_kv_pairs` and
    `R = num_passes`, an example is built as follows:

    - keys: `P` distinct tokens from `[1, V // 2)`; values: `P` distinct tokens from
      `[V // 2, V)`; key `i` is bound to value `i`. Token 0 is never a key.
    - context `inputs[0 : 2 P R]`: the block `k_1 v_1 k_2 v_2 ... k_P v_P`, written `R` times
      identically (`R = 1` is plain MQAR; `R = 2` is the JRT "read twice" prompt).
    - queries: the rest, `inputs[2 P R : T]`, has `S = (T - 2 P R) / 2` query slots at its even
      offsets. `P` distinct slots `g_1..g_P` are drawn without replacement with
      `p(g) ∝ (g + 1) ** (power_a - 1)` for `g` in `[0, S)` (a power law: with the default
      0.01 most queries sit near the start of the query region; `power_a = 1` is uniform).
      Key `k_i` is written at `q_i = 2 P R + 2 g_i`.
    - targets: `targets[q_i] = v_i` (the label sits on the query token itself), `IGNORE`
      elsewhere. The value is not re-inserted after the query: `inputs[q_i + 1]` is filler.
    - filler: every other position is uniform in `[0, V)` (so it can collide with keys and
      values) when `random_non_queries`, else 0.

    Mapping from zoology: zoology builds rows of `T + 1` tokens with the value's label at
    `q_i + 1`, then returns `inputs = row[:-1]` and `labels = labels[1:]`; those are exactly our
    `inputs` and `targets` (`T` tokens each, the value's label on the query token). Zoology's
    code fails to broadcast keys into its context array when `num_passes > 1`; we implement
    its evident intent (the one block tiled `R` times, as `np.tile` there does), as PAPERS.md's
    generator spec states. Zoology also asserts `V > T`, which generation does not need, so we
    do not require it. Every example has exactly `T` tokens and `P` labelled positions.
    """

    vocab_size: int = 8192
    length: int = 256
    num_kv_pairs: int = 16
    power_a: float = 0.01
    num_passes: int = 1
    random_non_queries: bool = True
    seed: int = 0
    num_examples: int = 100_000

    def __post_init__(self):
        for name in ("vocab_size", "length", "num_kv_pairs", "num_passes", "num_examples"):
            check_positive(name, getattr(self, name))
        check_at_least("seed", self.seed, 0)
        check_bool("random_non_queries", self.random_non_queries)
        if not isinstance(self.power_a, int | float) or not (
            math.isfinite(self.power_a) and self.power_a > 0
        ):
            raise ValueError(f"power_a: expected a finite float > 0, got {self.power_a!r}")
        if self.length % 2:
            raise ValueError(f"length: expected an even number of tokens, got {self.length}")
        num_keys = self.vocab_size // 2 - 1
        if self.num_kv_pairs > num_keys:
            raise ValueError(
                f"num_kv_pairs: expected at most {num_keys} (distinct keys in [1, vocab_size // 2)"
                f" for vocab_size {self.vocab_size}), got {self.num_kv_pairs}"
            )
        needed = 2 * self.num_kv_pairs * (self.num_passes + 1)
        if self.length < needed:
            raise ValueError(
                f"length: expected at least 2 * num_kv_pairs * (num_passes + 1) = {needed} "
                f"(the key-value blocks and one query slot per key), got {self.length}"
            )

    def __len__(self) -> int:
        return self.num_examples

    @property
    def max_length(self) -> int:
        return self.length

    @property
    def context_length(self) -> int:
        """Tokens of the repeated key-value block(s), `2 * num_kv_pairs * num_passes`."""
        return 2 * self.num_kv_pairs * self.num_passes

    def query_slot_probabilities(self) -> np.ndarray:
        """`[S]` probability of each query slot, `p(g) ∝ (g + 1) ** (power_a - 1)`."""
        num_slots = (self.length - self.context_length) // 2
        weights = np.arange(1, num_slots + 1, dtype=np.float64) ** (self.power_a - 1)
        return weights / weights.sum()

    def __getitem__(self, index: int) -> dict:
        rng = example_rng(self.seed, check_index(index, self.num_examples))
        half = self.vocab_size // 2
        keys = 1 + rng.choice(half - 1, self.num_kv_pairs, replace=False)
        values = half + rng.choice(self.vocab_size - half, self.num_kv_pairs, replace=False)
        probabilities = self.query_slot_probabilities()
        slots = rng.choice(probabilities.size, self.num_kv_pairs, replace=False, p=probabilities)
        query_positions = self.context_length + 2 * slots

        if self.random_non_queries:
            inputs = rng.integers(0, self.vocab_size, self.length)
        else:
            inputs = np.zeros(self.length, np.int64)
        key_value_block = np.stack([keys, values], axis=1).reshape(-1)
        inputs[: self.context_length] = np.tile(key_value_block, self.num_passes)
        inputs[query_positions] = keys
        targets = np.full(self.length, IGNORE)
        targets[query_positions] = values
        return example(inputs, targets)


@dataclasses.dataclass(frozen=True)
class SetDisjointness:
    """Set disjointness (JRT): do the two sets shown in order share an element?

    Arora et al., "Just read twice: closing the recall gap for recurrent language models"
    (2024) frame recall hardness through set disjointness: a streaming model must remember the
    first set, so the task is easier when the smaller set comes first. The paper's generator
    was not published in code (PAPERS.md B.1.6), so this spec is ours. With
    `n = first_size`, `m = second_size`, `V = vocab_size`:

    - tokens: `SEPARATOR = 0`, `QUESTION = 1`, answers `NO = 2` and `YES = 3`; set elements are
      drawn from `[4, V)`.
    - the answer is `YES` or `NO` with probability 1/2 each, drawn first (balanced by
      construction, independent of the set sizes).
    - `n + m` distinct elements are drawn uniformly without replacement, in random order; the
      first `n` are set A, the rest set B (so A and B are disjoint). For `YES`, one uniformly
      chosen position of B is overwritten by a uniformly chosen element of A, so the sets share
      exactly one element (the unique-intersection case, the hard one). Within each set all
      elements are distinct.
    - inputs (`T = n + m + 3` tokens): `SEPARATOR a_1 .. a_n SEPARATOR b_1 .. b_m QUESTION`.
    - targets: `targets[T - 1]` (on `QUESTION`) is the answer token; `IGNORE` elsewhere. The
      answer is not repeated as an input.

    Which set is smaller is set by the sizes: `first_size < second_size` is "small set first".
    """

    SEPARATOR: ClassVar[int] = 0
    QUESTION: ClassVar[int] = 1
    NO: ClassVar[int] = 2
    YES: ClassVar[int] = 3
    FIRST_ELEMENT: ClassVar[int] = 4

    first_size: int = 8
    second_size: int = 32
    vocab_size: int = 512
    seed: int = 0
    num_examples: int = 100_000

    def __post_init__(self):
        for name in ("first_size", "second_size", "vocab_size", "num_examples"):
            check_positive(name, getattr(self, name))
        check_at_least("seed", self.seed, 0)
        num_elements = self.vocab_size - self.FIRST_ELEMENT
        if num_elements < self.first_size + self.second_size:
            raise ValueError(
                f"vocab_size: expected at least first_size + second_size + "
                f"{self.FIRST_ELEMENT} = {self.first_size + self.second_size + self.FIRST_ELEMENT}"
                f" (distinct elements after the special tokens), got {self.vocab_size}"
            )

    def __len__(self) -> int:
        return self.num_examples

    @property
    def max_length(self) -> int:
        return self.first_size + self.second_size + 3

    def __getitem__(self, index: int) -> dict:
        rng = example_rng(self.seed, check_index(index, self.num_examples))
        intersect = bool(rng.integers(2))
        n, m = self.first_size, self.second_size
        elements = self.FIRST_ELEMENT + rng.choice(
            self.vocab_size - self.FIRST_ELEMENT, n + m, replace=False
        )
        first, second = elements[:n], elements[n:]
        if intersect:
            second[rng.integers(m)] = first[rng.integers(n)]

        inputs = np.concatenate(
            [[self.SEPARATOR], first, [self.SEPARATOR], second, [self.QUESTION]]
        )
        targets = np.full(inputs.size, IGNORE)
        targets[-1] = self.YES if intersect else self.NO
        return example(inputs, targets)


@dataclasses.dataclass(frozen=True)
class Passkey:
    """Passkey retrieval over bytes: a random key hidden at a given depth in filler text.

    The test of Stuffed Mamba (Chen et al., "Stuffed Mamba: State collapse and state capacity
    of RNN-based long-context modeling", 2024), whose prompt is that of landmark attention
    (Mohtashami and Jaggi, 2023). Tokens are bytes (`vocab_size = 256`, token =
    byte value, no BOS), so a model trained on byte-level text reads it as text. With
    `L = length`, `D = num_digits`, the example is the ASCII text

        filler[:b] + KEY + filler[b:] + "What is the pass key? The pass key is " + key

    - key: `D` digits, each uniform in 0-9 (leading zeros allowed), drawn per example.
    - KEY: `"The pass key is <key>. Remember it. <key> is the pass key. "`.
    - filler: the last `F` bytes of `FILLER` repeated, where `F = L - len(KEY) - 38 - D` is
      chosen so that every example has exactly `L` tokens. The filler therefore ends with a
      whole sentence and may begin mid-sentence.
    - depth: KEY is inserted at the filler offset `b` nearest to `depth * F` among the sentence
      starts of the filler (offset 0, and every offset right after ". ", which includes `F`
      when `F >= 2`), ties going to the earlier one. `depth = 0` puts the key first,
      `depth = 1` right before the question. The layout depends only on
      `(length, depth, num_digits)`.
    - targets: the `D` key digits at the end are predicted LM style: `targets[L - D - 1 + j]`
      (the position reading the byte before digit `j`) is digit `j`'s byte; `IGNORE`
      elsewhere, including the last position.
    """

    FILLER: ClassVar[str] = (
        "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
    )
    QUESTION: ClassVar[str] = "What is the pass key? The pass key is "

    length: int = 1024
    depth: float = 0.5
    num_digits: int = 5
    seed: int = 0
    num_examples: int = 1_000

    def __post_init__(self):
        for name in ("length", "num_digits", "num_examples"):
            check_positive(name, getattr(self, name))
        check_at_least("seed", self.seed, 0)
        if not isinstance(self.depth, int | float) or not 0 <= self.depth <= 1:
            raise ValueError(f"depth: expected a number in [0, 1], got {self.depth!r}")
        fixed = len(self.key_sentence("0" * self.num_digits)) + len(self.QUESTION) + self.num_digits
        if self.length < fixed:
            raise ValueError(
                f"length: expected at least {fixed} (key sentence, question and "
                f"{self.num_digits} digits), got {self.length}"
            )

    def __len__(self) -> int:
        return self.num_examples

    @property
    def vocab_size(self) -> int:
        return 256

    @property
    def max_length(self) -> int:
        return self.length

    @staticmethod
    def key_sentence(key: str) -> str:
        return f"The pass key is {key}. Remember it. {key} is the pass key. "

    @functools.cached_property
    def filler_around_key(self) -> tuple[bytes, bytes]:
        """The filler bytes before and after the key sentence (the same for every example)."""
        size = self.length - len(self.key_sentence("0" * self.num_digits))
        size -= len(self.QUESTION) + self.num_digits
        repeats = -(-size // len(self.FILLER))
        filler = (self.FILLER * repeats).encode("ascii")[len(self.FILLER) * repeats - size :]
        starts = [0] + [match.end() for match in re.finditer(rb"\. ", filler)]
        split = min(starts, key=lambda start: abs(start - self.depth * size))
        return filler[:split], filler[split:]

    def __getitem__(self, index: int) -> dict:
        rng = example_rng(self.seed, check_index(index, self.num_examples))
        key = "".join(str(digit) for digit in rng.integers(0, 10, self.num_digits))
        before, after = self.filler_around_key
        text = before + self.key_sentence(key).encode("ascii") + after
        text += (self.QUESTION + key).encode("ascii")
        inputs = np.frombuffer(text, np.uint8)
        targets = np.full(self.length, IGNORE)
        targets[-self.num_digits - 1 : -1] = inputs[-self.num_digits :]
        return example(inputs, targets)
