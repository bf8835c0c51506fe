"""State-tracking sources: determinism, length ranges, token layouts, and labels recomputed by
independent routes (bit counts, Python `eval`, permutation tuples applied point by point)."""

import collections
import itertools
import re

import numpy as np
import pytest

from seqjax.data.source import IGNORE
from seqjax.data.state_tracking import (
    ModularArithmetic,
    ModularArithmeticBrackets,
    ModularCounting,
    Parity,
    PermutationComposition,
)

SOURCES = {
    "parity": Parity,
    "modular_counting": ModularCounting,
    "modular_arithmetic": ModularArithmetic,
    "modular_arithmetic_brackets": ModularArithmeticBrackets,
    "brackets_mult": lambda **kw: ModularArithmeticBrackets(mult=True, **kw),
    "s3_every": lambda **kw: PermutationComposition(group="S3", **kw),
    "s5_last": lambda **kw: PermutationComposition(group="S5", supervise="last", **kw),
}
LAST_ONLY = [name for name in SOURCES if name != "s3_every"]

# The xLSTM token layouts, written out here rather than read from the classes.
ARITHMETIC_OPERATORS = {1: "+", 2: "-", 3: "*"}
BRACKET_SYMBOLS = ("+", "-", "*", "(", ")", "=", "pad")


def examples(source, count):
    return [source[i] for i in range(count)]


def last_targets(source, count):
    return np.array([e["targets"][-1] for e in examples(source, count)])


@pytest.mark.parametrize("name", LAST_ONLY)
def test_only_the_last_position_is_supervised(name):
    for e in examples(SOURCES[name](), 100):
        assert e["targets"][-1] != IGNORE
        assert np.all(e["targets"][:-1] == IGNORE)


@pytest.mark.parametrize("name", [n for n in SOURCES if n != "modular_arithmetic"])
@pytest.mark.parametrize(("min_length", "max_length"), [(3, 12), (40, 48)])
def test_lengths_are_uniform_over_the_range(name, min_length, max_length):
    source = SOURCES[name](min_length=min_length, max_length=max_length)
    lengths = collections.Counter(len(e["inputs"]) for e in examples(source, 500))
    assert set(lengths) == set(range(min_length, max_length + 1))
    assert max(lengths.values()) < 2.5 * min(lengths.values())
    assert source.max_length == max_length


@pytest.mark.parametrize(("min_length", "max_length"), [(3, 12), (40, 48)])
def test_arithmetic_lengths_are_the_even_numbers_in_the_range(min_length, max_length):
    source = ModularArithmetic(min_length=min_length, max_length=max_length)
    lengths = collections.Counter(len(e["inputs"]) for e in examples(source, 500))
    evens = {n for n in range(min_length, max_length + 1) if n % 2 == 0}
    assert set(lengths) == evens
    assert max(lengths.values()) < 2 * min(lengths.values())


@pytest.mark.parametrize(
    ("source", "vocab_size"),
    [
        (Parity(), 3),
        (ModularCounting(), 4),
        (ModularCounting(modulus=7), 8),
        (ModularArithmetic(), 10),
        (ModularArithmeticBrackets(), 12),
        (PermutationComposition(group="S3"), 6),
        (PermutationComposition(group="S5"), 120),
    ],
)
def test_vocab_size_matches_the_reference_layouts(source, vocab_size):
    assert source.vocab_size == vocab_size


def test_parity_label_is_the_parity_of_the_ones():
    source = Parity()
    for e in examples(source, 300):
        bits = e["inputs"].tolist()
        assert set(bits) <= {1, 2}
        odd = bits.count(2) % 2 == 1
        assert e["targets"][-1] == (Parity.ODD if odd else Parity.EVEN)
    assert (Parity.ZERO, Parity.ONE, Parity.EVEN, Parity.ODD) == (1, 2, 1, 2)


def test_parity_labels_are_balanced():
    fraction_odd = np.mean(last_targets(Parity(), 600) == Parity.ODD)
    assert 0.43 < fraction_odd < 0.57


@pytest.mark.parametrize("modulus", [3, 5])
def test_counting_label_is_the_number_of_ones_mod_m(modulus):
    for e in examples(ModularCounting(modulus=modulus), 300):
        ones = sum(1 for token in e["inputs"] if token == 2)
        assert e["targets"][-1] == 1 + ones % modulus


def test_counting_mod_3_labels_are_balanced():
    labels = last_targets(ModularCounting(min_length=10, max_length=40), 900)
    fractions = np.bincount(labels, minlength=4)[1:] / labels.size
    np.testing.assert_allclose(fractions, 1 / 3, atol=0.06)


def arithmetic_string(inputs):
    """`n op n .. op n` from the xLSTM layout, `=` stripped; numbers are `token - 5`."""
    assert inputs[-1] == 4
    expression = inputs[:-1]
    assert all(token >= 5 for token in expression[0::2])
    return " ".join(
        ARITHMETIC_OPERATORS[token] if i % 2 else str(token - 5)
        for i, token in enumerate(expression)
    )


@pytest.mark.parametrize("modulus", [5, 7])
@pytest.mark.parametrize(("min_length", "max_length"), [(3, 40), (40, 256)])
def test_arithmetic_label_is_python_eval_mod_m(modulus, min_length, max_length):
    source = ModularArithmetic(modulus=modulus, min_length=min_length, max_length=max_length)
    for e in examples(source, 150):
        inputs = e["inputs"].tolist()
        assert e["targets"][-1] - 5 == eval(arithmetic_string(inputs)) % modulus


def left_to_right(expression):
    tokens = expression.split()
    value = int(tokens[0])
    for operator, number in zip(tokens[1::2], tokens[2::2], strict=True):
        value = eval(f"{value} {operator} {number}")
    return value


def test_arithmetic_multiplication_binds_tighter_than_addition():
    disagreements = 0
    for e in examples(ModularArithmetic(), 200):
        expression = arithmetic_string(e["inputs"].tolist())
        disagreements += e["targets"][-1] - 5 != left_to_right(expression) % 5
    assert disagreements > 20


def test_arithmetic_operators_and_numbers_are_uniform():
    inputs = [e["inputs"] for e in examples(ModularArithmetic(min_length=40), 200)]
    operators = np.concatenate([x[1:-1:2] for x in inputs])
    numbers = np.concatenate([x[0:-1:2] for x in inputs])
    np.testing.assert_allclose(np.bincount(operators)[1:] / operators.size, 1 / 3, atol=0.03)
    np.testing.assert_allclose(np.bincount(numbers)[5:] / numbers.size, 1 / 5, atol=0.03)


def bracket_string(inputs, modulus):
    """The expression written out: numbers are `token`, symbols `modulus + index`."""
    assert inputs[-1] == modulus + BRACKET_SYMBOLS.index("=")
    return "".join(
        str(token) if token < modulus else BRACKET_SYMBOLS[token - modulus] for token in inputs[:-1]
    )


@pytest.mark.parametrize("mult", [False, True])
@pytest.mark.parametrize("modulus", [5, 11])
@pytest.mark.parametrize(("min_length", "max_length"), [(2, 40), (40, 256)])
def test_brackets_label_is_python_eval_mod_m(mult, modulus, min_length, max_length):
    source = ModularArithmeticBrackets(
        modulus=modulus, mult=mult, min_length=min_length, max_length=max_length
    )
    for e in examples(source, 60):
        expression = bracket_string(e["inputs"].tolist(), modulus)
        assert "pad" not in expression and "=" not in expression
        assert e["targets"][-1] == eval(expression) % modulus


def test_brackets_follow_the_grammar():
    seen_operators = collections.Counter()
    for e in examples(ModularArithmeticBrackets(min_length=5), 200):
        expression = bracket_string(e["inputs"].tolist(), 5)
        depth = 0
        for symbol in expression:
            depth += {"(": 1, ")": -1}.get(symbol, 0)
            assert depth >= 0
        assert depth == 0
        assert expression[0] == "(" and expression[-1] == ")"
        seen_operators.update(s for s in expression if s in "+-*")
    assert seen_operators["*"] == 0 and seen_operators["+"] > 100


def test_brackets_mult_adds_multiplication():
    source = ModularArithmeticBrackets(mult=True, min_length=20)
    expressions = "".join(bracket_string(e["inputs"].tolist(), 5) for e in examples(source, 50))
    assert expressions.count("*") > 50


def test_brackets_short_expressions_are_the_terminal_forms():
    patterns = {2: r"^\d$", 3: r"^-\d$", 4: r"^\(\d\)$", 5: r"^\(-\d\)$"}
    for e in examples(ModularArithmeticBrackets(min_length=2, max_length=5), 100):
        expression = bracket_string(e["inputs"].tolist(), 5)
        assert re.match(patterns[len(e["inputs"])], expression)


def prefix_products(word, degree):
    """`g_1 ∘ .. ∘ g_t` for every `t`, each a tuple: apply `g_t` first, then .. `g_1`."""
    elements = list(itertools.permutations(range(degree)))
    products = []
    for t in range(1, len(word) + 1):
        images = []
        for point in range(degree):
            for element in reversed(word[:t]):
                point = elements[element][point]
            images.append(point)
        products.append(elements.index(tuple(images)))
    return products


@pytest.mark.parametrize(("group", "degree"), [("S3", 3), ("S5", 5)])
def test_permutation_targets_are_the_prefix_products(group, degree):
    for e in examples(PermutationComposition(group=group, supervise="every"), 80):
        word = e["inputs"].tolist()
        assert e["targets"].tolist() == prefix_products(word, degree)


def test_permutation_order_of_composition_matters():
    reversed_order_agrees = []
    for e in examples(PermutationComposition(group="S3"), 100):
        word = e["inputs"].tolist()
        reversed_order_agrees.append(prefix_products(word[::-1], 3)[-1] == e["targets"][-1])
    assert sum(reversed_order_agrees) < 60


def test_permutation_token_zero_is_the_identity():
    for e in examples(PermutationComposition(group="S3"), 100):
        word, targets = e["inputs"].tolist(), e["targets"].tolist()
        for t in range(1, len(word)):
            if word[t] == 0:
                assert targets[t] == targets[t - 1]


def test_permutation_last_supervision_keeps_the_final_product():
    every = PermutationComposition(group="S5", supervise="every")
    last = PermutationComposition(group="S5", supervise="last")
    for i in range(50):
        np.testing.assert_array_equal(every[i]["inputs"], last[i]["inputs"])
        assert last[i]["targets"][-1] == every[i]["targets"][-1]


def test_permutation_labels_are_uniform_over_the_group():
    labels = last_targets(PermutationComposition(group="S3", supervise="last"), 900)
    np.testing.assert_allclose(np.bincount(labels, minlength=6) / labels.size, 1 / 6, atol=0.04)


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: Parity(min_length=0), "min_length"),
        (lambda: Parity(min_length=2.5), "min_length"),
        (lambda: Parity(min_length=10, max_length=9), "max_length"),
        (lambda: Parity(seed=-1), "seed"),
        (lambda: Parity(num_examples=0), "num_examples"),
        (lambda: ModularCounting(modulus=1), "modulus"),
        (lambda: ModularArithmetic(modulus=1), "modulus"),
        (lambda: ModularArithmetic(min_length=1), "min_length"),
        (lambda: ModularArithmetic(max_length=41), "max_length"),
        (lambda: ModularArithmeticBrackets(min_length=1), "min_length"),
        (lambda: ModularArithmeticBrackets(modulus=0), "modulus"),
        (lambda: ModularArithmeticBrackets(mult="yes"), "mult"),
        (lambda: PermutationComposition(group="S4"), "group"),
        (lambda: PermutationComposition(supervise="first"), "supervise"),
    ],
)
def test_bad_settings_name_the_field(make, field):
    with pytest.raises(ValueError, match=f"^{field}: expected"):
        make()


def test_parity_modulus_is_fixed():
    with pytest.raises(TypeError, match="modulus"):
        Parity(modulus=3)


def test_brackets_left_operand_length_is_uniform():
    """For `L >= 5` tokens the top level is `( left op right )`, `len(left)` uniform in
    `[1, L - 4]`."""
    length = 12
    source = ModularArithmeticBrackets(min_length=length + 1, max_length=length + 1)
    left_lengths = collections.Counter()
    for e in examples(source, 400):
        expression = bracket_string(e["inputs"].tolist(), 5)
        depth = 0
        for position, symbol in enumerate(expression):
            depth += {"(": 1, ")": -1}.get(symbol, 0)
            if depth == 1 and position > 1 and symbol in "+-*" and expression[position - 1] != "(":
                left_lengths[position - 1] += 1
                break
    assert set(left_lengths) == set(range(1, length - 3))
    assert max(left_lengths.values()) < 2 * min(left_lengths.values())


@pytest.mark.parametrize(
    ("source", "symbols", "rtol"),
    [
        (Parity(), [1, 2], 0.05),
        (ModularCounting(), [1, 2], 0.05),
        (PermutationComposition(group="S3"), list(range(6)), 0.1),
        (PermutationComposition(group="S5"), list(range(120)), 0.45),  # ~110 draws each
    ],
)
def test_input_symbols_are_uniform(source, symbols, rtol):
    inputs = np.concatenate([e["inputs"] for e in examples(source, 600)])
    counts = np.bincount(inputs, minlength=max(symbols) + 1)
    assert set(np.flatnonzero(counts)) == set(symbols)
    np.testing.assert_allclose(counts[symbols] / inputs.size, 1 / len(symbols), rtol=rtol)
