"""State-tracking tasks: parity, counting mod m, modular arithmetic, permutation composition.

Each class is a data source in the sense of `seqjax.data.source`: example `i` is a pure
function of `(seed, i)`, with `inputs: [T] int32` and sparse `targets: [T] int32` (`IGNORE`
where there is no loss), `targets[t]` being the token to predict after reading `inputs[t]`.
The input length `T` is drawn per example, uniformly from `[min_length, max_length]`, so train
and test lengths are two settings of the same source (Grazzi et al. train on 3-40 and test on
40-256). These are the formal-language probes of "Unlocking State-Tracking in Linear RNNs
Through Negative Eigenvalues" (Grazzi et al., 2024; `../shared/PAPERS.md` B.1.4, B.3), whose
generators (automl/unlocking_state_tracking, a copy of NX-AI/xlstm
`experiments/data/formal_language/tasks/`) re-implement the Chomsky-hierarchy suite
(Deletang et al., 2023; google-deepmind/neural_networks_chomsky_hierarchy `tasks/`), and the
group word problem of "The Illusion of State in State-Space Models" (Merrill et al., 2024;
jopetty/word-problem `src/generate_data.py`).

Mapping from the xLSTM code: it writes a row `x_0 .. x_{n-1} answer pad..`, masks the answer
out of the input and shifts by one, so the model reads `x_0 .. x_{n-1}` and is scored at
`x_{n-1}`. Our `inputs` are exactly those `n` tokens and `targets[n - 1]` is the answer; our
lengths count input tokens, while its `min/max_sequence_length` also count the answer.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import itertools
from typing import ClassVar, Literal

import numpy as np

from seqjax.checks import check_at_least, check_choice, check_positive
from seqjax.data.source import IGNORE, check_index, example, example_rng


def _last_only(inputs: np.ndarray, answer: int) -> dict:
    """The example with `answer` as the target of the last input token, `IGNORE` elsewhere."""
    targets = np.full(inputs.shape, IGNORE)
    targets[-1] = answer
    return example(inputs, targets)


@dataclasses.dataclass(frozen=True, kw_only=True)
class _StateTrackingTask(abc.ABC):
    """The settings every task shares: the input-length range, the seed and the size."""

    min_length: int = 3
    max_length: int = 40
    seed: int = 0
    num_examples: int = 100_000

    shortest_length: ClassVar[int] = 1

    def __post_init__(self):
        check_at_least("min_length", self.min_length, self.shortest_length)
        check_at_least("max_length", self.max_length, self.min_length, "min_length")
        check_at_least("seed", self.seed, 0)
        check_positive("num_examples", self.num_examples)

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index: int) -> dict:
        rng = example_rng(self.seed, check_index(index, self.num_examples))
        return self._generate(rng, self._sample_length(rng))

    def _sample_length(self, rng: np.random.Generator) -> int:
        """`T`, uniform in `[min_length, max_length]`."""
        return int(rng.integers(self.min_length, self.max_length + 1))

    @abc.abstractmethod
    def _generate(self, rng: np.random.Generator, length: int) -> dict:
        """One example of `length` input tokens."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModularCounting(_StateTrackingTask):
    """Counting modulo m: the number of ones in a bit string, modulo `modulus`.

    Parity (`modulus = 2`) is the xLSTM `parity` task; `modulus = 3` is the "counting modulo
    3" that Grazzi et al. prove needs non-triangular state transitions. With `m = modulus`:

    - inputs: `T` bits, each uniform and independent, written `ZERO = 1` and `ONE = 2`
      (`PAD = 0` is never emitted; it completes the xLSTM vocabulary of 3 for parity);
    - targets: `targets[T - 1] = 1 + (number of ONE tokens mod m)`, `IGNORE` elsewhere; the
      answer for residue `r` is token `1 + r`, so it shares ids with the input bits as in the
      xLSTM code;
    - `vocab_size = max(3, m + 1)`.
    """

    modulus: int = 3

    PAD: ClassVar[int] = 0
    ZERO: ClassVar[int] = 1
    ONE: ClassVar[int] = 2

    def __post_init__(self):
        super().__post_init__()
        check_at_least("modulus", self.modulus, 2)

    @property
    def vocab_size(self) -> int:
        return max(3, self.modulus + 1)

    def _generate(self, rng: np.random.Generator, length: int) -> dict:
        bits = rng.integers(0, 2, length)
        return _last_only(self.ZERO + bits, 1 + int(bits.sum()) % self.modulus)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Parity(ModularCounting):
    """Parity of the number of ones in a bit string (xLSTM `tasks/parity.py`; the Chomsky
    suite's `regular/parity_check.py`): `ModularCounting` with `modulus = 2`.

    Inputs are `T` uniform bits written `ZERO = 1` / `ONE = 2`; `targets[T - 1]` is `EVEN = 1`
    or `ODD = 2` (the parity of the ONE tokens), `IGNORE` elsewhere; `vocab_size = 3` (`PAD = 0`
    plus the two symbols, the answers reusing the symbols' ids as in the xLSTM code).
    """

    modulus: int = dataclasses.field(default=2, init=False)

    EVEN: ClassVar[int] = 1
    ODD: ClassVar[int] = 2


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModularArithmetic(_StateTrackingTask):
    """Modular arithmetic without brackets (Chomsky suite `regular/modular_arithmetic.py`,
    xLSTM `tasks/modular_arithmetic.py`).

    With `m = modulus` and `k` operators:

    - tokens (the xLSTM layout): `PAD = 0`, `PLUS = 1`, `MINUS = 2`, `TIMES = 3`,
      `EQUALS = 4`, and the number `n` in `[0, m)` is token `NUMBER + n` with `NUMBER = 5`;
      `vocab_size = m + 5` (10 for the paper's `m = 5`).
    - inputs: `n_0 op_1 n_1 .. op_k n_k =`, numbers uniform in `[0, m)`, operators uniform
      over `+ - *`; `T = 2 k + 2` is even, uniform over the even numbers in
      `[min_length, max_length]` (so `max_length` must be even, the longest example).
    - targets: `targets[T - 1]` (on `=`) is `NUMBER + value`, `IGNORE` elsewhere, where the
      value is the expression mod m with the usual precedence: `*` before `+` and `-`, then
      left to right (both references; e.g. `1 - 1 - 1 = 4`, `1 + 2 * 3 = 2` mod 5).
    """

    modulus: int = 5

    shortest_length: ClassVar[int] = 2
    PAD: ClassVar[int] = 0
    PLUS: ClassVar[int] = 1
    MINUS: ClassVar[int] = 2
    TIMES: ClassVar[int] = 3
    EQUALS: ClassVar[int] = 4
    NUMBER: ClassVar[int] = 5

    def __post_init__(self):
        super().__post_init__()
        check_at_least("modulus", self.modulus, 2)
        if self.max_length % 2:
            raise ValueError(
                "max_length: expected an even number (an odd-length expression plus '='), "
                f"got {self.max_length}"
            )

    @property
    def vocab_size(self) -> int:
        return self.NUMBER + self.modulus

    def _sample_length(self, rng: np.random.Generator) -> int:
        """`T = 2 k + 2`, uniform over the even numbers in `[min_length, max_length]`."""
        fewest = (self.min_length - 1) // 2
        return 2 * int(rng.integers(fewest, self.max_length // 2)) + 2

    def _generate(self, rng: np.random.Generator, length: int) -> dict:
        num_operators = (length - 2) // 2
        numbers = rng.integers(0, self.modulus, num_operators + 1)
        operators = self.PLUS + rng.integers(0, 3, num_operators)
        inputs = np.empty(length, np.int64)
        inputs[0:-1:2] = self.NUMBER + numbers
        inputs[1:-1:2] = operators
        inputs[-1] = self.EQUALS
        value = self._evaluate(numbers.tolist(), operators.tolist())
        return _last_only(inputs, self.NUMBER + value)

    def _evaluate(self, numbers: list[int], operators: list[int]) -> int:
        """`n_0 op_1 n_1 .. op_k n_k` mod m, `*` first: a sum of signed products, one pass."""
        total, term = 0, numbers[0]
        for operator, number in zip(operators, numbers[1:], strict=True):
            if operator == self.TIMES:
                term = term * number % self.modulus
            else:
                total += term
                term = number if operator == self.PLUS else -number
        return (total + term) % self.modulus


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModularArithmeticBrackets(_StateTrackingTask):
    """Modular arithmetic with brackets, the context-free task (Chomsky suite
    `dcf/modular_arithmetic_brackets.py`, xLSTM `tasks/modular_arithmetic_with_brackets.py`).

    With `m = modulus`:

    - tokens (the xLSTM layout): the number `n` in `[0, m)` is token `n`; then `+ - * ( ) =`
      and pad are `m .. m + 6`; `vocab_size = m + 7` (12 for the paper's `m = 5`).
    - inputs: an expression of `L = T - 1` tokens followed by `=`, where `expression(L)` is,
      with `d` uniform in `[0, m)`: `d`, `-d`, `(d)`, `(-d)` for `L` = 1, 2, 3, 4; and for
      `L >= 5`, `( expression(a) op expression(L - 3 - a) )` with `a` uniform in `[1, L - 4]`
      and `op` uniform over `+ -`, or over `+ - *` when `mult` (the references' recursion and
      draw order: split, left, right, operator).
    - targets: `targets[T - 1]` (on `=`) is the expression's value mod m, `IGNORE` elsewhere.

    The xLSTM code raises every drawn length below 5 to 5; we keep `T` uniform in the range.
    """

    modulus: int = 5
    mult: bool = False

    shortest_length: ClassVar[int] = 2

    def __post_init__(self):
        super().__post_init__()
        check_at_least("modulus", self.modulus, 2)
        if not isinstance(self.mult, bool | np.bool_):
            raise ValueError(f"mult: expected a bool, got {self.mult!r}")

    @property
    def vocab_size(self) -> int:
        return self.modulus + 7

    def token(self, symbol: str) -> int:
        """The id of `symbol`, one of `+ - * ( ) =` or `"pad"`."""
        return self.modulus + ("+", "-", "*", "(", ")", "=", "pad").index(symbol)

    def _generate(self, rng: np.random.Generator, length: int) -> dict:
        tokens, value = self._expression(rng, length - 1)
        return _last_only(np.array([*tokens, self.token("=")]), value)

    def _expression(self, rng: np.random.Generator, length: int) -> tuple[list[int], int]:
        """A random expression of exactly `length` tokens and its value mod m."""
        m = self.modulus
        if length < 5:
            digit = int(rng.integers(m))
            negate = length in (2, 4)
            tokens = [self.token("-"), digit] if negate else [digit]
            if length >= 3:
                tokens = [self.token("("), *tokens, self.token(")")]
            return tokens, -digit % m if negate else digit
        left_length = int(rng.integers(1, length - 3))
        left, a = self._expression(rng, left_length)
        right, b = self._expression(rng, length - 3 - left_length)
        operator = int(rng.integers(3 if self.mult else 2))
        value = (a + b, a - b, a * b)[operator] % m
        return [self.token("("), *left, self.token("+") + operator, *right, self.token(")")], value


@functools.cache
def symmetric_group(degree: int) -> tuple[tuple[tuple[int, ...], ...], np.ndarray]:
    """`S_degree` as `(elements, table)`: the permutations of `range(degree)` in
    `itertools.permutations` order (element 0 is the identity) and the `[G, G]` product table,
    `table[a, b]` the index of `a ∘ b`, i.e. `(a ∘ b)[i] = a[b[i]]` (abstract_algebra's
    `Perm.__mul__`, as jopetty/word-problem uses it)."""
    elements = tuple(itertools.permutations(range(degree)))
    index = {element: i for i, element in enumerate(elements)}
    table = np.array(
        [[index[tuple(a[i] for i in b)] for b in elements] for a in elements], np.int64
    )
    return elements, table


@dataclasses.dataclass(frozen=True, kw_only=True)
class PermutationComposition(_StateTrackingTask):
    """The word problem of S3 or S5: the running product of random permutations (Merrill et
    al., "The Illusion of State in State-Space Models"; jopetty/word-problem
    `src/generate_data.py`).

    With `G = group` and `|G|` its order (6 for S3, 120 for S5):

    - tokens: element `e` is token `e`, its index in `itertools.permutations(range(n))` order
      (token 0 is the identity); `vocab_size = |G|`, the answers being elements too.
    - inputs: `g_1 .. g_T`, each uniform over `G` and independent.
    - targets: the prefix product `p_t = g_1 ∘ g_2 ∘ .. ∘ g_t` with `(a ∘ b)[i] = a[b[i]]`, at
      every position when `supervise = "every"` (the word-problem code's token
      classification), or only `targets[T - 1] = p_T` when `supervise = "last"`.
    Every `p_t` is uniform over `G`, so the labels are balanced.
    """

    group: Literal["S3", "S5"] = "S5"
    supervise: Literal["last", "every"] = "every"

    GROUPS: ClassVar[dict[str, int]] = {"S3": 3, "S5": 5}

    def __post_init__(self):
        super().__post_init__()
        check_choice("group", self.group, tuple(self.GROUPS))
        check_choice("supervise", self.supervise, ("last", "every"))

    @property
    def vocab_size(self) -> int:
        return len(symmetric_group(self.GROUPS[self.group])[0])

    def _generate(self, rng: np.random.Generator, length: int) -> dict:
        _, table = symmetric_group(self.GROUPS[self.group])
        inputs = rng.integers(0, len(table), length)
        prefix_products = np.empty(length, np.int64)
        product = 0
        for t, element in enumerate(inputs):
            product = table[product, element]
            prefix_products[t] = product
        if self.supervise == "last":
            return _last_only(inputs, prefix_products[-1])
        return example(inputs, prefix_products)
