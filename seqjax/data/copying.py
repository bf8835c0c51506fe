"""Copying tasks: plain copying, selective copying and induction heads.

Each class is a data source in the sense of `seqjax.data.source`: example `i` is a pure
function of `(seed, i)`, with `inputs: [T] int32` and sparse `targets: [T] int32` (`IGNORE`
where there is no loss), `targets[t]` being the token to predict after reading `inputs[t]`.
These are the memory probes used against fixed-size recurrent states: Jelassi et al.'s COPY
(PAPERS.md B.3 [47]), and the selective copying and induction-head tasks of H3 and Mamba
(B.1.14); `SelectiveCopying(random_positions=False)` is S4's classic copying memory task.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from seqjax.checks import check_at_least, check_positive
from seqjax.data.source import IGNORE, check_index, example, example_rng


@dataclasses.dataclass(frozen=True)
class Copying:
    """COPY: a random string, a delimiter, then the same string again, predicted LM style.

    Follows `sample_str(task="copy")` and `CopyDataset` in sjelassi/transformers_ssm_copy
    `synthetic_exps/data_utils.py` (Jelassi, Brandfonbrener, Kakade and Malach, "Repeat after
    me: Transformers are better than state space models at copying", 2024), whose example is
    the string `$ s | s .`. With `A = alphabet_size`:

    - tokens: string symbols `[0, A)`; `START = A` (`$`), `COPY = A + 1` (`|`, the
      delimiter), `END = A + 2` (`.`); `vocab_size = A + 3`.
    - length: `n` uniform in `[min_tokens, max_tokens]` per example; the string `s` is `n`
      symbols, each uniform in `[0, A)` (with replacement).
    - inputs (`T = 2 n + 3` tokens): `START s_1 .. s_n COPY s_1 .. s_n END`.
    - targets: LM style over the copy, `targets[t] = inputs[t + 1]` for `t` in
      `[n + 1, 2 n + 1]` (from the delimiter, which predicts `s_1`, to the last copied
      symbol, which predicts `END`); `IGNORE` elsewhere, including on `END` itself.

    This is the reference's training mask, which also supervises `END`; its evaluation scores
    the `n` string symbols only (`targets[n + 1 : 2 n + 1]`). Where we differ: the reference
    packs examples back to back into rows of `context_len` tokens (cutting the last one) and
    pads evaluation rows with a pad token `A + 3`; here an example is one whole string and
    packing or padding is the pipeline's job, so no pad token is reserved. The reference allows
    `A <= 26` (it spells symbols as letters); any `A >= 1` works here. Defaults are the
    reference's training settings (`vocab_size=26`, lengths 5 to 20).
    """

    alphabet_size: int = 26
    min_tokens: int = 5
    max_tokens: int = 20
    seed: int = 0
    num_examples: int = 100_000

    def __post_init__(self):
        for name in ("alphabet_size", "min_tokens", "max_tokens", "num_examples"):
            check_positive(name, getattr(self, name))
        check_at_least("seed", self.seed, 0)
        if self.max_tokens < self.min_tokens:
            raise ValueError(
                f"max_tokens: expected at least min_tokens = {self.min_tokens}, "
                f"got {self.max_tokens}"
            )

    def __len__(self) -> int:
        return self.num_examples

    @property
    def start_token(self) -> int:
        return self.alphabet_size

    @property
    def copy_token(self) -> int:
        return self.alphabet_size + 1

    @property
    def end_token(self) -> int:
        return self.alphabet_size + 2

    @property
    def vocab_size(self) -> int:
        return self.alphabet_size + 3

    @property
    def max_length(self) -> int:
        return 2 * self.max_tokens + 3

    def __getitem__(self, index: int) -> dict:
        rng = example_rng(self.seed, check_index(index, self.num_examples))
        n = int(rng.integers(self.min_tokens, self.max_tokens + 1))
        string = rng.integers(0, self.alphabet_size, n)
        inputs = np.concatenate(
            [[self.start_token], string, [self.copy_token], string, [self.end_token]]
        )
        targets = np.full(inputs.size, IGNORE)
        targets[n + 1 : 2 * n + 2] = inputs[n + 2 :]
        return example(inputs, targets)


@dataclasses.dataclass(frozen=True)
class SelectiveCopying:
    """Selective copying (Mamba): recall the data tokens scattered among blanks, in order.

    Follows `torch_copying_data(L, M, A, variable=True)` in state-spaces/s4
    `src/dataloaders/datasets/copying.py` (the generator of Gu and Dao's group; Mamba's own
    was not published): Gu and Dao, "Mamba: Linear-time sequence modeling with selective state
    spaces" (2023), section 4.1.1 and appendix E.1. With `V = vocab_size`, `L = length` (s4's
    `l_noise`) and `M = num_tokens` (s4's `l_memorize`):

    - tokens: `BLANK = 0` (the noise token), data tokens `[1, V - 1)`, `MARKER = V - 1`.
    - data: `M` tokens, each uniform in `[1, V - 1)` (with replacement).
    - positions: the data region has `L + M` positions; `M` distinct positions are drawn
      uniformly from it and the `j`-th data token sits at the `j`-th smallest; the other `L`
      positions are `BLANK`. With `random_positions=False` they sit at `0 .. M - 1` (s4's
      `variable=False`): the classic copying memory task, recall across a fixed lag of
      `L + M` tokens.
    - inputs (`T = L + 2 M` tokens): the data region, then `M` `MARKER` tokens.
    - targets: `targets[L + M + j]` (the `j`-th marker) is the `j`-th data token; `IGNORE`
      elsewhere. The markers are inputs, not the data tokens: the answer is not teacher-forced.

    Defaults are Mamba's setting (sequence length 4096, 16 tokens to memorise, a vocabulary of
    16 including the noise token). The s4 generator returns the `M` labels on their own and
    its model scores its last `M` outputs; placing them on the markers is the same loss. Its
    `variable_length`, `reverse` and `lag` options are not part of Mamba's task and are left
    out.
    """

    vocab_size: int = 16
    length: int = 4096
    num_tokens: int = 16
    random_positions: bool = True
    seed: int = 0
    num_examples: int = 100_000

    def __post_init__(self):
        check_at_least("vocab_size", self.vocab_size, 3, "the blank, a data token, the marker")
        for name in ("length", "num_tokens", "num_examples"):
            check_positive(name, getattr(self, name))
        check_at_least("seed", self.seed, 0)
        if not isinstance(self.random_positions, bool | np.bool_):
            raise ValueError(f"random_positions: expected a bool, got {self.random_positions!r}")

    def __len__(self) -> int:
        return self.num_examples

    @property
    def blank_token(self) -> int:
        return 0

    @property
    def marker_token(self) -> int:
        return self.vocab_size - 1

    @property
    def max_length(self) -> int:
        return self.length + 2 * self.num_tokens

    def __getitem__(self, index: int) -> dict:
        rng = example_rng(self.seed, check_index(index, self.num_examples))
        region = self.length + self.num_tokens
        data = rng.integers(1, self.vocab_size - 1, self.num_tokens)
        if self.random_positions:
            positions = np.sort(rng.choice(region, self.num_tokens, replace=False))
        else:
            positions = np.arange(self.num_tokens)
        inputs = np.full(region + self.num_tokens, self.blank_token)
        inputs[positions] = data
        inputs[region:] = self.marker_token
        targets = np.full(inputs.size, IGNORE)
        targets[region:] = data
        return example(inputs, targets)


@dataclasses.dataclass(frozen=True)
class InductionHeads:
    """Induction heads: after a trigger token, recall the token that followed it earlier.

    Follows `generate_induction_head` in HazyResearch/safari `src/dataloaders/synthetics.py`
    (Fu, Dao et al., "Hungry hungry hippos", 2023, after Olsson et al., "In-context learning
    and induction heads", 2022), with one trigger and `induction_len = 1`, as used by Gu and
    Dao, "Mamba" (2023), section 4.1.2 (trained at length 256 with 16 tokens, tested at longer
    lengths: set `length`). With `V = vocab_size` and `T = length`:

    - tokens: noise `[0, V - 1)`, `TRIGGER = V - 1`.
    - body `inputs[0 : T - 1]`: each token uniform in `[0, V - 1)`; then the trigger is
      written at one position `p` uniform in `[0, T - 3)`, so the token after it,
      `x = inputs[p + 1]`, is a noise token inside the body. The trigger appears nowhere else
      in the body.
    - inputs (`T` tokens): the body, then `TRIGGER` at `T - 1`.
    - targets: `targets[T - 1] = x`; `IGNORE` elsewhere.

    Where we differ from safari, and why: safari's `input_seq_len` is our `T - 1` (it appends
    the trigger and the answer, then shifts by one); its `vocab_size` also counts a "noop"
    token this task never uses, so its `vocab_size = V + 1` is ours `V` (its tokens are also
    renumbered by string sorting; ours are contiguous). Safari's training split supervises
    every next token, almost all of them unpredictable noise; we supervise only the answer, as
    its test split does, so the loss measures the task. Safari deduplicates the examples of a
    split; an index-addressable source cannot, and at Mamba's sizes duplicates are negligible.
    """

    vocab_size: int = 16
    length: int = 256
    seed: int = 0
    num_examples: int = 100_000

    def __post_init__(self):
        check_at_least("vocab_size", self.vocab_size, 2, "a noise token and the trigger")
        check_at_least("length", self.length, 4, "a trigger, its token, noise, the trigger")
        check_positive("num_examples", self.num_examples)
        check_at_least("seed", self.seed, 0)

    def __len__(self) -> int:
        return self.num_examples

    @property
    def trigger_token(self) -> int:
        return self.vocab_size - 1

    @property
    def max_length(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        rng = example_rng(self.seed, check_index(index, self.num_examples))
        inputs = rng.integers(0, self.trigger_token, self.length)
        trigger_position = rng.integers(self.length - 3)
        inputs[trigger_position] = self.trigger_token
        inputs[-1] = self.trigger_token
        targets = np.full(self.length, IGNORE)
        targets[-1] = inputs[trigger_position + 1]
        return example(inputs, targets)
