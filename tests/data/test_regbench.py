"""RegBench: the source contract, the random automata and their minimisation, the prompts,
the valid-continuation sets (rechecked by brute force) and the validity metric."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqjax.data.regbench import PAD, RegBench, minimize, random_dfa, validity
from seqjax.data.source import IGNORE

DEFAULT_AUTOMATA = dict(
    num_letters=18, min_states=4, max_states=12, min_alphabet=4, max_out_degree=3
)
# Few letters and states: many random automata share a language, so collisions are common.
TINY = dict(num_letters=3, min_alphabet=1, max_out_degree=1, min_states=2, max_states=3)


@pytest.fixture(scope="module")
def train():
    return RegBench()


@pytest.fixture(scope="module")
def heldout_test():
    return RegBench(split="test", num_examples=1000)


def raw_automata(count, seed=0):
    rng = np.random.default_rng(seed)
    return [random_dfa(rng, **DEFAULT_AUTOMATA) for _ in range(count)]


def run(delta, letters):
    """The state after reading `letters` (0-based) from state 0, or None where a transition
    is missing: an independent walk of the table."""
    state = 0
    for letter in letters:
        state = int(delta[state][letter])
        if state < 0:
            return None
    return state


def same_language(first, second):
    """Whether two partial automata (every state accepting) accept the same strings: in their
    synchronised product every reachable pair must allow the same letters."""
    seen, stack = {(0, 0)}, [(0, 0)]
    while stack:
        p, q = stack.pop()
        for x, y in zip(first[p], second[q], strict=True):
            if (x < 0) != (y < 0):
                return False
            if x >= 0 and (x, y) not in seen:
                seen.add((x, y))
                stack.append((x, y))
    return True


def equivalent_pairs(delta):
    """Pairs of distinct states no string distinguishes (Myhill-Nerode table filling)."""
    n, letters = len(delta), range(delta.shape[1])
    marked = {
        (p, q)
        for p, q in itertools.permutations(range(n), 2)
        if any((delta[p, a] < 0) != (delta[q, a] < 0) for a in letters)
    }
    changed = True
    while changed:
        changed = False
        for p, q in itertools.permutations(range(n), 2):
            if (p, q) not in marked and any(
                delta[p, a] >= 0 and (int(delta[p, a]), int(delta[q, a])) in marked for a in letters
            ):
                marked |= {(p, q), (q, p)}
                changed = True
    return set(itertools.permutations(range(n), 2)) - marked


def strings_of(example, separator):
    """The prompt's strings as lists of 0-based letters: the row is the inputs and the last
    target."""
    row = np.append(example["inputs"], example["targets"][-1]).tolist()
    strings, current = [], []
    for token in row:
        if token == separator:
            strings.append(current)
            current = []
        else:
            current.append(token - 1)
    return [*strings, current]


def key(delta):
    return delta.shape, delta.tobytes()


# The source contract.


def test_other_seeds_indices_and_splits_give_other_examples(train, heldout_test):
    reference = train[7]["inputs"]
    same_automaton = RegBench(num_examples=2 * train.num_dfas)[7 + train.num_dfas]
    for other in (RegBench(seed=4)[7], train[8], heldout_test[7], same_automaton):
        assert not np.array_equal(other["inputs"], reference)


def test_fields_have_the_documented_shapes_and_dtypes(train):
    ex = train[0]
    (length,) = ex["inputs"].shape
    assert ex["inputs"].dtype == ex["targets"].dtype == np.int32
    assert ex["targets"].shape == (length,)
    assert ex["valid"].shape == (length, train.vocab_size) and ex["valid"].dtype == bool
    assert train.vocab_size == 20 and train.separator == 19 and PAD == 0
    assert len(train) == 5000 and train.max_length == 948


def test_max_length_is_the_longest_example():
    source = RegBench(min_strings=2, max_strings=2, max_string_length=2, num_examples=200)
    lengths = {source[i]["inputs"].size for i in range(len(source))}
    assert max(lengths) == source.max_length == 4 and min(lengths) == 2


# The random automata (the reference's RandomDFASampler) and their minimisation.


def test_raw_automata_follow_the_published_ranges():
    states, alphabets, degrees = set(), set(), set()
    for delta, alphabet in raw_automata(400):
        n = len(delta)
        states.add(n)
        alphabets.add(alphabet.size)
        assert len(set(alphabet.tolist())) == alphabet.size and alphabet.max() < 18
        for q in range(n):
            letters = np.flatnonzero(delta[q] >= 0)
            successors = delta[q, letters].tolist()
            degrees.add(letters.size)
            assert set(letters.tolist()) <= set(alphabet.tolist())
            assert q not in successors, "self-loop"
            assert len(set(successors)) == len(successors), "two edges to one state"
            assert all(0 <= s < n for s in successors)
    assert states == set(range(4, 13))
    assert alphabets == set(range(4, 19))
    assert degrees == {1, 2, 3}


def test_minimal_automata_are_trimmed_within_bounds_and_numbered_breadth_first():
    sizes = set()
    for delta, alphabet in raw_automata(300, seed=1):
        small = minimize(delta)
        sizes.add(len(small))
        assert 1 <= len(small) <= len(delta) <= 12
        degrees = (small >= 0).sum(axis=1)
        assert degrees.min() >= 1 and degrees.max() <= 3
        assert set(np.flatnonzero((small >= 0).any(axis=0)).tolist()) <= set(alphabet.tolist())
        order = [0]
        for q in order:
            for successor in small[q].tolist():
                if successor >= 0 and successor not in order:
                    order.append(successor)
        assert order == list(range(len(small))), "every state reachable, in BFS order"
    assert min(sizes) < 4 and max(sizes) == 12


def test_minimisation_keeps_the_language_and_leaves_no_equivalent_states():
    merged = 0
    for delta, _ in raw_automata(300, seed=2):
        small = minimize(delta)
        assert same_language(delta, small)
        assert not equivalent_pairs(small)
        merged += len(small) < len(delta)
    assert merged > 30


def test_minimisation_merges_equivalent_states_by_hand():
    cycle = np.full((4, 18), -1)
    cycle[[0, 1, 2, 3], 0] = [1, 2, 3, 0]  # (a a a a)* is a*
    np.testing.assert_array_equal(minimize(cycle), [[0] + [-1] * 17])
    diamond = np.full((4, 18), -1)
    diamond[0, [0, 1]] = [1, 2]  # 0 -a-> 1 and 0 -b-> 2, then both -c-> 3 -a-> 0
    diamond[1, 2] = diamond[2, 2] = 3
    diamond[3, 0] = 0
    expected = np.full((3, 18), -1)
    expected[0, [0, 1]] = 1
    expected[1, 2] = 2
    expected[2, 0] = 0
    np.testing.assert_array_equal(minimize(diamond), expected)


def test_minimal_form_is_canonical_for_equivalent_automata():
    rng = np.random.default_rng(3)
    for delta, _ in raw_automata(100, seed=3):
        n = len(delta)
        relabel = np.concatenate([[0], 1 + rng.permutation(n - 1)])  # state 0 stays initial
        permuted = np.full_like(delta, -1)
        permuted[relabel] = np.where(delta >= 0, relabel[delta], -1)
        copy = rng.integers(n)  # a duplicate of state `copy`, entered instead of it from 0
        padded = np.vstack([delta, delta[copy], np.full((1, 18), -1)])
        padded[0] = np.where(padded[0] == copy, n, padded[0])
        padded[n + 1, 0] = 0  # and an unreachable state
        np.testing.assert_array_equal(minimize(permuted), minimize(delta))
        np.testing.assert_array_equal(minimize(padded), minimize(delta))


# The prompts.


def test_prompt_statistics_match_the_spec(train):
    counts, lengths = set(), set()
    for i in range(300):
        strings = strings_of(train[i], train.separator)
        counts.add(len(strings))
        lengths |= {len(s) for s in strings}
    assert counts == set(range(10, 20))
    assert lengths == set(range(1, 50))


def test_every_sampled_string_is_accepted_by_its_automaton(train, heldout_test):
    for source in (train, heldout_test):
        for i in range(0, 600, 3):
            delta = source.dfa(i % source.num_split_dfas)
            for string in strings_of(source[i], source.separator):
                assert all(0 <= a < 18 for a in string)
                assert run(delta, string) is not None


def test_targets_are_the_next_token_with_separators_ignored(train):
    sep = train.separator
    for i in range(50):
        ex = train[i]
        inputs, targets = ex["inputs"].tolist(), ex["targets"].tolist()
        row = [*inputs, targets[-1]]
        assert row[0] != sep and row[-1] != sep and PAD not in row
        for t in range(len(inputs)):
            assert targets[t] == (IGNORE if row[t + 1] == sep else row[t + 1])
        assert targets.count(IGNORE) == row.count(sep)


def test_valid_sets_agree_with_a_brute_force_walk(train, heldout_test):
    for source, index in [(train, i) for i in range(12)] + [(heldout_test, 3), (heldout_test, 300)]:
        ex = source[index]
        delta = source.dfa(index % source.num_split_dfas)
        prefix = []
        for t, token in enumerate(ex["inputs"].tolist()):
            prefix = [] if token == source.separator else [*prefix, token - 1]
            expected = [
                1 <= v <= 18 and run(delta, [*prefix, v - 1]) is not None
                for v in range(source.vocab_size)
            ]
            assert ex["valid"][t].tolist() == expected


def test_scored_targets_are_valid_and_the_separator_never_is(train):
    for i in range(20):
        ex = train[i]
        scored = np.flatnonzero(ex["targets"] != IGNORE)
        assert ex["valid"][scored, ex["targets"][scored]].all()
        assert not ex["valid"][:, [PAD, train.separator]].any()
        assert ex["valid"].any(axis=1).all()  # every state has a way on


# The splits: held-out automata are distinct languages, none of them a train automaton.


def test_heldout_automata_are_distinct_and_split_in_half(heldout_test):
    validation = RegBench(split="validation")
    assert heldout_test.num_split_dfas == validation.num_split_dfas == 250
    heldout = [heldout_test.dfa(j) for j in range(250)] + [validation.dfa(j) for j in range(250)]
    assert len({key(d) for d in heldout}) == 500


def test_train_automata_are_never_heldout_languages(train, heldout_test):
    validation = RegBench(split="validation")
    heldout = {key(heldout_test.dfa(j)) for j in range(250)}
    heldout |= {key(validation.dfa(j)) for j in range(250)}
    collisions = 0
    for number in range(1800):
        first_attempt = np.random.default_rng([0, number, 0, 1])
        candidate = minimize(random_dfa(first_attempt, **DEFAULT_AUTOMATA)[0])
        chosen = train.dfa(number)
        assert key(chosen) not in heldout
        if key(candidate) in heldout:
            collisions += 1
        else:
            np.testing.assert_array_equal(chosen, candidate)
    assert collisions >= 1, "the rejection path was never exercised"


def test_heldout_automata_follow_the_documented_scheme(heldout_test):
    seen = []
    for number in range(10):
        for attempt in itertools.count():
            rng = np.random.default_rng([0, number, attempt, 2])
            candidate = minimize(random_dfa(rng, **DEFAULT_AUTOMATA)[0])
            if key(candidate) not in seen:
                break
        seen.append(key(candidate))
        np.testing.assert_array_equal(heldout_test.dfa(number), candidate)


def test_splits_stay_disjoint_when_random_automata_often_coincide():
    train = RegBench(num_dfas=300, num_heldout_dfas=8, **TINY)
    validation = RegBench(split="validation", num_heldout_dfas=8, **TINY)
    test = RegBench(split="test", num_heldout_dfas=8, **TINY)
    heldout = [test.dfa(j) for j in range(4)] + [validation.dfa(j) for j in range(4)]
    assert len({key(d) for d in heldout}) == 8
    assert all(same_language(a, b) is False for a, b in itertools.combinations(heldout, 2))
    trained = [train.dfa(k) for k in range(300)]
    assert all(not same_language(d, h) for d in trained for h in heldout)
    assert len({key(d) for d in trained}) > 1


def test_heldout_sets_do_not_depend_on_the_number_of_train_automata(heldout_test):
    small = RegBench(split="test", num_dfas=10, num_examples=1000)
    for index in (0, 249, 999):
        np.testing.assert_array_equal(small[index]["inputs"], heldout_test[index]["inputs"])


def test_examples_cycle_through_the_split_automata(heldout_test):
    assert heldout_test.num_split_dfas == 250
    for index in (5, 255, 505):
        valid_rows = {tuple(row) for row in heldout_test[index]["valid"][:, 1:19].tolist()}
        delta = heldout_test.dfa(5)
        assert valid_rows <= {tuple((row >= 0).tolist()) for row in delta}


# The validity metric.


def test_validity_counts_valid_predictions_at_scored_positions_only():
    valid = np.zeros((2, 3, 4), bool)
    valid[0, 0, [1, 2]] = valid[0, 1, 3] = valid[0, 2, 1] = True
    valid[1, :, 2] = True
    targets = np.array([[1, IGNORE, 1], [2, 2, IGNORE]])
    predictions = np.array([[2, 0, 3], [2, 1, 2]])
    # scored: (0,0) valid, (0,2) invalid, (1,0) valid, (1,1) invalid; (0,1) and (1,2) not scored
    assert validity(predictions, valid, targets) == 0.5
    assert validity(predictions[0], valid[0], targets[0]) == 0.5
    assert validity(np.array([[1, 3, 1], [2, 2, 0]]), valid, targets) == 1.0
    assert validity(np.array([[7, -1, 0], [9, 4, 0]]), valid, targets) == 0.0
    assert validity(predictions, valid, np.full((2, 3), IGNORE)) == 0.0


def test_validity_of_targets_is_one_and_of_separators_zero(train):
    ex = train[1]
    assert validity(ex["targets"], ex["valid"], ex["targets"]) == 1.0
    always_separator = np.full_like(ex["inputs"], train.separator)
    assert validity(always_separator, ex["valid"], ex["targets"]) == 0.0


def test_validity_works_on_jax_arrays_and_under_jit():
    rng = np.random.default_rng(0)
    valid = rng.random((4, 16, 20)) < 0.3
    predictions = rng.integers(0, 20, (4, 16))
    targets = np.where(rng.random((4, 16)) < 0.2, IGNORE, 1)
    expected = validity(predictions, valid, targets)
    arrays = (jnp.asarray(predictions), jnp.asarray(valid), jnp.asarray(targets))
    assert abs(float(validity(*arrays)) - expected) < 1e-6
    assert abs(float(jax.jit(validity)(*arrays)) - expected) < 1e-6


# Bad settings.


@pytest.mark.parametrize(
    ("settings", "field"),
    [
        (dict(split="dev"), "split"),
        (dict(num_dfas=0), "num_dfas"),
        (dict(num_examples=-1), "num_examples"),
        (dict(seed=-1), "seed"),
        (dict(num_heldout_dfas=1), "num_heldout_dfas"),
        (dict(max_states=3), "max_states"),
        (dict(max_strings=9), "max_strings"),
        (dict(max_string_length=0), "max_string_length"),
        (dict(num_letters=3), "num_letters"),
        (dict(min_alphabet=2), "min_alphabet"),
        (dict(min_states=3), "min_states"),
        (dict(num_letters=1, min_alphabet=1, max_out_degree=1, min_states=2), "num_heldout_dfas"),
    ],
)
def test_bad_settings_raise_a_named_value_error(settings, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        RegBench(**settings)


def test_heldout_automata_covering_every_language_leave_no_train_automaton():
    # Two letters, two states, out-degree 1: the languages are a*, b*, (ab)* and (ba)*.
    settings = dict(num_letters=2, min_alphabet=1, max_out_degree=1, min_states=2, max_states=2)
    source = RegBench(num_heldout_dfas=4, **settings)
    with pytest.raises(ValueError, match=r"^num_heldout_dfas:"):
        source[0]
