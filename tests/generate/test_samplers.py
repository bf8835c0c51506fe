"""Logits processors and samplers against plain NumPy statements of their papers' definitions:
the kept tokens and the renormalized probabilities; the sampler's chain, greedy and
categorical picks; the penalties' and Mirostat's state; bad hyperparameters. Every call goes
through `jax.jit`."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqjax.generate.samplers import (
    EpsilonSampling,
    EtaSampling,
    MinP,
    Mirostat,
    OccurrencePenalty,
    RepetitionPenalty,
    Sampler,
    Temperature,
    TopH,
    TopK,
    TopP,
    TypicalP,
    greedy,
    make_sampler,
)

B, V = 4, 50
SEEDS = (0, 1, 2)


def random_logits(seed: int) -> np.ndarray:
    """`[B, V]` float32: a spread row, a row with 10 tokens already removed (`-inf`), a row of
    integer logits (many ties) and a peaked row."""
    rng = np.random.default_rng(seed)
    logits = np.stack(
        [
            2 * rng.standard_normal(V),
            2 * rng.standard_normal(V),
            rng.integers(-3, 3, V).astype(float),
            6 * rng.standard_normal(V),
        ]
    )
    logits[1, rng.choice(V, 10, replace=False)] = -np.inf
    return logits.astype(np.float32)


def prompt(seed: int, length: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """`[B, T]` tokens and mask; the mask is False on each row's first two columns."""
    tokens = np.random.default_rng(seed + 100).integers(0, V, (B, length)).astype(np.int32)
    mask = np.ones((B, length), bool)
    mask[:, :2] = False
    return tokens, mask


@functools.partial(jax.jit, static_argnums=0)
def process(sampler: Sampler, logits, prompt_tokens, prompt_mask):
    state = sampler.init(prompt_tokens, prompt_mask, logits.shape[-1])
    return sampler.process(logits, state)[0]


def processed(processor, logits: np.ndarray, seed: int = 0) -> np.ndarray:
    tokens, mask = prompt(seed)
    return np.asarray(process(Sampler((processor,)), logits, tokens, mask))


# The NumPy definitions, one row at a time, in float64. Each returns the processed row.


def softmax(row: np.ndarray) -> np.ndarray:
    row = np.asarray(row, np.float64)
    e = np.exp(row - row[np.isfinite(row)].max())
    return e / e.sum()


def entropy(probs: np.ndarray) -> float:
    positive = probs[probs > 0]
    return float(-(positive * np.log(positive)).sum())


def keep_only(row: np.ndarray, keep: np.ndarray) -> np.ndarray:
    return np.where(keep, row, -np.inf)


def smallest_prefix_with_mass(order: np.ndarray, probs: np.ndarray, mass: float) -> np.ndarray:
    keep = np.zeros(probs.size, bool)
    total = 0.0
    for j in order:
        keep[j] = True
        total += probs[j]
        if total >= mass:
            break
    return keep


def by_descending_probability(row: np.ndarray) -> np.ndarray:
    return np.argsort(-np.asarray(row, np.float64), kind="stable")


def reference_temperature(row, temperature):
    return np.asarray(row, np.float64) / temperature


def reference_top_k(row, k):
    keep = np.zeros(row.size, bool)
    keep[by_descending_probability(row)[:k]] = True
    return keep_only(row, keep)


def reference_top_p(row, p):
    probs = softmax(row)
    return keep_only(row, smallest_prefix_with_mass(by_descending_probability(row), probs, p))


def reference_min_p(row, p):
    probs = softmax(row)
    return keep_only(row, probs >= p * probs.max())


def reference_typical(row, mass):
    probs = softmax(row)
    with np.errstate(divide="ignore"):
        distance = np.abs(-np.log(probs) - entropy(probs))
    order = np.argsort(distance, kind="stable")
    return keep_only(row, smallest_prefix_with_mass(order, probs, mass))


def reference_epsilon(row, epsilon):
    probs = softmax(row)
    keep = probs > epsilon
    keep[np.argmax(row)] = True
    return keep_only(row, keep)


def reference_eta(row, epsilon):
    probs = softmax(row)
    eta = min(epsilon, math.sqrt(epsilon) * math.exp(-entropy(probs)))
    keep = probs > eta
    keep[np.argmax(row)] = True
    return keep_only(row, keep)


def reference_top_h(row, alpha):
    """The greedy loop of the authors' `TopH_LogitsProcessor`: add tokens by descending
    probability while the partial entropy sum stays within `alpha * H(p)`."""
    probs = softmax(row)
    budget = alpha * entropy(probs)
    order = by_descending_probability(row)
    keep = np.zeros(row.size, bool)
    keep[order[0]] = True
    partial = -probs[order[0]] * np.log(probs[order[0]])
    for j in order[1:]:
        if probs[j] == 0:
            break
        partial += -probs[j] * np.log(probs[j])
        if partial > budget:
            break
        keep[j] = True
    return keep_only(row, keep)


def reference_mirostat_k(row, mu, m):
    """Basu et al., Algorithm 1: the Zipf fit over the `m` top probabilities, then `k`."""
    probs = np.sort(softmax(row))[::-1]
    numerator = denominator = 0.0
    for i in range(1, min(m, row.size)):
        if probs[i] == 0:
            continue
        t = math.log((i + 1) / i)
        numerator += t * math.log(probs[i - 1] / probs[i])
        denominator += t * t
    s = numerator / denominator
    eps = s - 1
    base = (eps * 2**mu) / (1 - row.size ** (-eps))
    if s == 0:
        # A flat head (ties): base^(1/s) tends to infinity or 0, i.e. k = V or 1.
        return row.size if base > 1 else 1
    return int(np.clip(round(base ** (1 / s)), 1, row.size))


def reference_mirostat(row, mu, m):
    return reference_top_k(row, reference_mirostat_k(row, mu, m))


def reference_repetition(row, seen, penalty):
    row = np.asarray(row, np.float64)
    penalized = np.where(row > 0, row / penalty, row * penalty)
    return np.where(seen, penalized, row)


def reference_occurrence(row, counts, frequency, presence):
    return np.asarray(row, np.float64) - frequency * counts - presence * (counts > 0)


def seen_in_prompt(tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
    seen = np.zeros((tokens.shape[0], V), bool)
    for b in range(tokens.shape[0]):
        seen[b, tokens[b][mask[b]]] = True
    return seen


def assert_same_distribution(actual: np.ndarray, expected: np.ndarray) -> None:
    """The same kept tokens per row and the same probabilities once renormalized."""
    np.testing.assert_array_equal(np.isfinite(actual), np.isfinite(expected))
    for a, e in zip(actual, expected, strict=True):
        np.testing.assert_allclose(softmax(a), softmax(e), rtol=1e-5, atol=1e-12)


def rows(reference, logits, *args):
    return np.stack([reference(row, *args) for row in logits.astype(np.float64)])


TRUNCATIONS = [
    (Temperature(0.5), reference_temperature, 0.5),
    (TopK(1), reference_top_k, 1),
    (TopK(7), reference_top_k, 7),
    (TopK(V + 5), reference_top_k, V + 5),
    (TopP(0.1), reference_top_p, 0.1),
    (TopP(0.6), reference_top_p, 0.6),
    (TopP(1.0), reference_top_p, 1.0),
    (MinP(0.0), reference_min_p, 0.0),
    (MinP(0.1), reference_min_p, 0.1),
    (MinP(1.0), reference_min_p, 1.0),
    (TypicalP(0.2), reference_typical, 0.2),
    (TypicalP(0.9), reference_typical, 0.9),
    (TypicalP(1.0), reference_typical, 1.0),
    (EpsilonSampling(0.05), reference_epsilon, 0.05),
    (EpsilonSampling(0.6), reference_epsilon, 0.6),
    (EtaSampling(1e-3), reference_eta, 1e-3),
    (EtaSampling(0.1), reference_eta, 0.1),
    (TopH(0.2), reference_top_h, 0.2),
    (TopH(0.6), reference_top_h, 0.6),
    (TopH(0.9), reference_top_h, 0.9),
]


@pytest.mark.parametrize(
    ("processor", "reference", "value"), [pytest.param(*t, id=repr(t[0])) for t in TRUNCATIONS]
)
@pytest.mark.parametrize("seed", SEEDS)
def test_processor_matches_its_definition(processor, reference, value, seed):
    logits = random_logits(seed)
    assert_same_distribution(processed(processor, logits), rows(reference, logits, value))


def test_top_h_with_alpha_one_keeps_every_token():
    # The partial entropy sum over every token is H(p) itself; a float64 loop can exceed it
    # by rounding, hence this check rather than the reference above.
    logits = random_logits(0)
    np.testing.assert_array_equal(processed(TopH(1.0), logits), logits)


@pytest.mark.parametrize(("tau", "m"), [(1.0, 100), (4.0, 100), (2.5, 10)])
@pytest.mark.parametrize("seed", SEEDS)
def test_mirostat_keeps_the_top_k_of_algorithm_1(tau, m, seed):
    logits = random_logits(seed)
    expected = rows(reference_mirostat, logits, 2 * tau, m)
    assert_same_distribution(processed(Mirostat(tau, m=m), logits), expected)


@pytest.mark.parametrize("seed", SEEDS)
def test_repetition_penalty_scales_the_logits_of_prompt_tokens(seed):
    logits = random_logits(seed)
    tokens, mask = prompt(seed)
    seen = seen_in_prompt(tokens, mask)
    expected = np.stack(
        [reference_repetition(r, s, 1.7) for r, s in zip(logits, seen, strict=True)]
    )
    assert_same_distribution(processed(RepetitionPenalty(1.7), logits, seed), expected)


def test_repetition_penalty_ignores_prompt_padding():
    tokens = np.array([[7, 8, 1, 2], [9, 9, 3, 3]], np.int32)
    mask = np.array([[False, False, True, True], [False, False, True, True]])
    seen = jax.jit(RepetitionPenalty(2.0).init, static_argnums=2)(tokens, mask, 12)
    expected = np.zeros((2, 12), bool)
    expected[0, [1, 2]] = expected[1, 3] = True
    np.testing.assert_array_equal(seen, expected)


def test_occurrence_penalty_does_not_count_the_prompt():
    logits = random_logits(0)
    assert_same_distribution(processed(OccurrencePenalty(0.5, 0.3), logits), logits)


@functools.partial(jax.jit, static_argnums=0)
def sample_step(sampler: Sampler, logits, state, key):
    return sampler.sample(logits, state, key)


def sample_steps(sampler, logits, tokens, mask, steps):
    """`steps` picks with a fixed `logits: [B, V]`: the final state and the tokens `[B, N]`."""
    state = sampler.init(jnp.asarray(tokens), jnp.asarray(mask), logits.shape[-1])
    picked = []
    for key in jax.random.split(jax.random.key(0), steps):
        token, state = sample_step(sampler, logits, state, key)
        picked.append(np.asarray(token))
    return state, np.stack(picked, axis=1)


def test_penalty_states_count_the_sampled_tokens():
    vocab = 6
    logits = np.zeros((B, vocab), np.float32)
    tokens = np.array([[5, 0, 1], [5, 0, 2], [5, 5, 3], [5, 4, 4]], np.int32)
    mask = np.array([[False, True, True]] * B)
    sampler = Sampler((RepetitionPenalty(1.5), OccurrencePenalty(0.5, 0.25)))
    (seen, counts), picked = sample_steps(sampler, logits, tokens, mask, steps=10)
    expected_counts = np.stack([np.bincount(row, minlength=vocab) for row in picked])
    np.testing.assert_array_equal(counts, expected_counts)
    in_prompt = np.zeros((B, vocab), bool)
    for b in range(B):
        in_prompt[b, tokens[b, 1:]] = True
    np.testing.assert_array_equal(seen, in_prompt | (expected_counts > 0))


def test_penalties_apply_to_the_tokens_sampled_so_far():
    logits = random_logits(1)
    tokens, mask = prompt(1)
    sampler = Sampler((RepetitionPenalty(1.5), OccurrencePenalty(0.5, 0.25)))
    state, picked = sample_steps(sampler, logits, tokens, mask, steps=8)
    counts = np.stack([np.bincount(row, minlength=V) for row in picked])
    seen = seen_in_prompt(tokens, mask) | (counts > 0)
    expected = np.stack(
        [
            reference_occurrence(reference_repetition(r, s, 1.5), c, 0.5, 0.25)
            for r, s, c in zip(logits, seen, counts, strict=True)
        ]
    )
    actual = jax.jit(Sampler.process, static_argnums=0)(sampler, logits, state)[0]
    assert_same_distribution(np.asarray(actual), expected)


def test_mirostat_observe_moves_mu_by_the_surprise_error():
    logits = random_logits(2)
    mirostat = Mirostat(3.0, eta=0.2)
    (mu,), picked = sample_steps(Sampler((mirostat,)), logits, *prompt(2), steps=1)
    truncated = rows(reference_mirostat, logits, 6.0, 100)
    surprise = np.array(
        [-np.log2(softmax(row)[token]) for row, token in zip(truncated, picked[:, 0], strict=True)]
    )
    np.testing.assert_allclose(mu, 6.0 - 0.2 * (surprise - 3.0), rtol=1e-5)


@functools.partial(jax.jit, static_argnums=0)
def mirostat_run(sampler: Sampler, logits, key):
    """300 steps on fixed logits: per step the surprise `[B]` of the pick under the processed
    distribution (bits), the number of kept tokens `k: [B]`, and `mu: [B]`."""
    batch, vocab = logits.shape
    state = sampler.init(jnp.zeros((batch, 1), jnp.int32), jnp.ones((batch, 1), bool), vocab)

    def step(state, key):
        truncated, _ = sampler.process(logits, state)
        token, state = sampler.sample(logits, state, key)
        log_q = jnp.take_along_axis(jax.nn.log_softmax(truncated), token[:, None], axis=-1)
        kept = jnp.sum(jnp.isfinite(truncated), axis=-1)
        return state, (-log_q[:, 0] / jnp.log(2.0), kept, state[0])

    return jax.lax.scan(step, state, jax.random.split(key, 300))[1]


@pytest.mark.parametrize("tau", [3.0, 5.0])
def test_mirostat_holds_the_average_surprise_at_tau(tau):
    vocab = 1000
    zipf = np.arange(1, vocab + 1, dtype=np.float64) ** -1.1
    logits = np.log(zipf / zipf.sum()).astype(np.float32)[None].repeat(B, axis=0)
    surprise, k, mu = mirostat_run(make_sampler(mirostat_tau=tau), logits, jax.random.key(0))
    # The last 100 steps of the 4 independent rows: 400 surprises.
    assert abs(float(np.mean(surprise[-100:])) - tau) < 0.3
    assert np.all(np.isfinite(mu))
    assert np.all((k >= 1) & (k <= vocab))


def test_make_sampler_chains_in_the_documented_order():
    sampler = make_sampler(
        repetition_penalty=1.2,
        frequency_penalty=0.1,
        presence_penalty=0.1,
        temperature=0.7,
        top_k=10,
        top_p=0.9,
        min_p=0.05,
        typical_p=0.9,
        epsilon=1e-3,
        eta=1e-3,
        top_h=0.5,
        mirostat_tau=3.0,
    )
    assert [type(p) for p in sampler.processors] == [
        RepetitionPenalty,
        OccurrencePenalty,
        Temperature,
        TopK,
        TopP,
        MinP,
        TypicalP,
        EpsilonSampling,
        EtaSampling,
        TopH,
        Mirostat,
    ]
    assert not sampler.greedy


@pytest.mark.parametrize("seed", SEEDS)
def test_make_sampler_equals_the_definitions_applied_in_order(seed):
    logits = random_logits(seed)
    tokens, mask = prompt(seed)
    sampler = make_sampler(
        repetition_penalty=1.3,
        frequency_penalty=0.4,
        presence_penalty=0.2,
        temperature=0.8,
        top_k=30,
        top_p=0.97,
        min_p=0.01,
        typical_p=0.98,
        epsilon=1e-4,
        eta=1e-4,
        top_h=0.9,
    )
    seen = seen_in_prompt(tokens, mask)
    expected = []
    for row, row_seen in zip(logits, seen, strict=True):
        row = reference_repetition(row, row_seen, 1.3)
        row = reference_occurrence(row, np.zeros(V), 0.4, 0.2)
        row = reference_temperature(row, 0.8)
        row = reference_top_k(row, 30)
        row = reference_top_p(row, 0.97)
        row = reference_min_p(row, 0.01)
        row = reference_typical(row, 0.98)
        row = reference_epsilon(row, 1e-4)
        row = reference_eta(row, 1e-4)
        expected.append(reference_top_h(row, 0.9))
    actual = np.asarray(process(sampler, logits, tokens, mask))
    assert_same_distribution(actual, np.stack(expected))


def test_temperature_zero_and_greedy_pick_the_argmax():
    logits = random_logits(0)
    assert greedy() == Sampler(greedy=True)
    assert make_sampler(temperature=0) == greedy()
    token, _ = sample_step(greedy(), logits, (), jax.random.key(0))
    np.testing.assert_array_equal(token, np.argmax(logits, axis=-1))


def test_greedy_picks_the_argmax_of_the_processed_logits():
    logits = np.array([[3.0, 2.9, 0.0], [1.0, -1.0, 0.6]], np.float32)
    sampler = make_sampler(temperature=0, repetition_penalty=2.0)
    state = sampler.init(jnp.array([[0], [0]]), jnp.array([[True], [True]]), 3)
    token, _ = sample_step(sampler, logits, state, jax.random.key(0))
    np.testing.assert_array_equal(token, [1, 2])


# chi-squared with 4 and 2 degrees of freedom at significance 0.001
# (scipy.stats.chi2.ppf(0.999, df)); a correct sampler fails one run in a thousand.
CRITICAL = {4: 18.467, 2: 13.816}


@pytest.mark.parametrize(
    ("processors", "probs"),
    [
        ((), [0.4, 0.25, 0.2, 0.1, 0.05]),
        ((TopK(3),), [0.4 / 0.85, 0.25 / 0.85, 0.2 / 0.85, 0.0, 0.0]),
    ],
    ids=["plain", "top_k"],
)
def test_categorical_draws_follow_the_processed_distribution(processors, probs):
    draws = 20_000
    logits = np.log([0.4, 0.25, 0.2, 0.1, 0.05]).astype(np.float32)[None].repeat(draws, axis=0)
    sampler = Sampler(processors)
    state = sampler.init(jnp.zeros((draws, 1), jnp.int32), jnp.ones((draws, 1), bool), 5)
    token, _ = sample_step(sampler, logits, state, jax.random.key(3))
    observed = np.bincount(np.asarray(token), minlength=5)
    expected = draws * np.asarray(probs)
    support = expected > 0
    assert np.all(observed[~support] == 0)
    chi2 = np.sum((observed[support] - expected[support]) ** 2 / expected[support])
    assert chi2 < CRITICAL[int(support.sum()) - 1]


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: make_sampler(top_p=0), "top_p"),
        (lambda: make_sampler(top_p=1.5), "top_p"),
        (lambda: make_sampler(top_k=0), "top_k"),
        (lambda: TopK(2.5), "top_k"),
        (lambda: make_sampler(temperature=-1), "temperature"),
        (lambda: Temperature(0), "temperature"),
        (lambda: Temperature(math.inf), "temperature"),
        (lambda: make_sampler(min_p=1.5), "min_p"),
        (lambda: TypicalP(0), "mass"),
        (lambda: EpsilonSampling(1.0), "epsilon"),
        (lambda: EtaSampling(0.0), "epsilon"),
        (lambda: TopH(0), "alpha"),
        (lambda: TopH(1.5), "alpha"),
        (lambda: RepetitionPenalty(0), "penalty"),
        (lambda: OccurrencePenalty(frequency=math.nan), "frequency"),
        (lambda: Mirostat(0.0), "tau"),
        (lambda: Mirostat(3.0, eta=-0.1), "eta"),
        (lambda: Mirostat(3.0, m=1), "m"),
        (lambda: Sampler([TopK(2)]), "processors"),
    ],
)
def test_bad_hyperparameters_raise_naming_the_field(make, field):
    with pytest.raises(ValueError, match=rf"^{field}: expected"):
        make()
