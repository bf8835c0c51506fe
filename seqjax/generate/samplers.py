"""Logits processors and samplers: what turns a step's logits into the next token.

A processor maps logits `[B, V]` float32 (`V` is the vocabulary size here) to processed
logits `[B, V]`, removing tokens by setting them to `-inf`, and may carry a per-row state
(the tokens seen so far, Mirostat's `mu`). A `Sampler` applies its processors in order, picks
the token (the argmax, or a draw from `softmax` of the processed logits) and lets every
processor observe the choice. Everything is a frozen dataclass, hashable, so a sampler is a
static argument of `jax.jit`; every step is pure `jnp` with fixed shapes.

A probability `p = softmax(logits)` treats `-inf` as `p = 0`, so processors compose: each
truncation keeps at least one token and never produces NaN on logits that an earlier one
already cut. Ties in a sorted order are broken by the lower token id, as `jax.lax.top_k` does.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from seqjax.checks import check_at_least, check_positive

__all__ = [
    "EpsilonSampling",
    "EtaSampling",
    "LogitsProcessor",
    "MinP",
    "Mirostat",
    "OccurrencePenalty",
    "RepetitionPenalty",
    "Sampler",
    "Temperature",
    "TopH",
    "TopK",
    "TopP",
    "TypicalP",
    "greedy",
    "make_sampler",
]


class LogitsProcessor(Protocol):
    """What `Sampler` calls: a frozen dataclass with these three methods, pure `jnp`."""

    def init(self, prompt_tokens: jax.Array, prompt_mask: jax.Array, vocab_size: int) -> Any:
        """Per-row state (leaves with leading axis B) before the first new token.
        `prompt_tokens: [B, T]` int32, `prompt_mask: [B, T]` bool (False on padding)."""

    def __call__(self, logits: jax.Array, state: Any) -> tuple[jax.Array, Any]:
        """Logits `[B, V]` float32 -> processed logits `[B, V]` (removed tokens are `-inf`),
        new state."""

    def observe(self, state: Any, token: jax.Array, log_probs: jax.Array) -> Any:
        """The new state once `token: [B]` int32 was picked from `log_probs: [B, V]`, the
        `log_softmax` of the final processed logits."""


def _is_real(value: object) -> bool:
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool)


def _require(ok: bool, name: str, expected: str, value: object) -> None:
    """Raises `ValueError("<name>: expected <expected>, got <value>")` unless `ok`."""
    if not ok:
        raise ValueError(f"{name}: expected {expected}, got {value!r}")


def _log_probs(logits: jax.Array) -> jax.Array:
    """`log p = log_softmax(logits)`, `[B, V]`; `-inf` where a token was removed."""
    return jax.nn.log_softmax(logits, axis=-1)


def _entropy(log_probs: jax.Array) -> jax.Array:
    """`H(p) = -sum_j p_j log p_j` in nats, `[B]`; removed tokens (`p_j = 0`) add nothing."""
    probs = jnp.exp(log_probs)
    return -jnp.sum(jnp.where(probs > 0, probs * log_probs, 0.0), axis=-1)


def _masked(logits: jax.Array, keep: jax.Array) -> jax.Array:
    return jnp.where(keep, logits, -jnp.inf)


def _one_hot(token: jax.Array, vocab_size: int) -> jax.Array:
    """`[B, V]` bool, True at `token: [B]`."""
    return jnp.arange(vocab_size) == token[:, None]


def _descending(logits: jax.Array) -> jax.Array:
    """`[B, V]`: token ids from the most to the least probable, ties by the lower id."""
    return jnp.argsort(-logits, axis=-1, stable=True)


def _in_vocab_order(order: jax.Array, keep_sorted: jax.Array) -> jax.Array:
    """Scatters `keep_sorted: [B, V]`, given in the order `order: [B, V]`, back to token ids."""
    rows = jnp.arange(order.shape[0])[:, None]
    return jnp.zeros_like(keep_sorted).at[rows, order].set(keep_sorted)


def _smallest_prefix_with_mass(sorted_probs: jax.Array, mass: float) -> jax.Array:
    """`[B, V]` bool over a sorted order: the smallest prefix with `sum p >= mass`.

    Position `i` is kept iff the mass before it is `< mass`, i.e. iff the mass from it on is
    `> 1 - mass`; the second form is exact at `mass = 1` (every `p > 0` token is kept however
    the cumulative sum rounds). The first position is always kept.
    """
    from_here = jnp.cumsum(sorted_probs[:, ::-1], axis=-1)[:, ::-1]
    first = jnp.arange(sorted_probs.shape[-1]) == 0
    return (from_here > 1 - mass) | first


def _keep_above(logits: jax.Array, log_threshold: jax.Array) -> jax.Array:
    """`logits` with the tokens of `log p_j <= log_threshold[b]` removed, the most probable
    token (the lowest id among ties) kept whatever its probability."""
    best = _one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1])
    return _masked(logits, (_log_probs(logits) > log_threshold[:, None]) | best)


class _Stateless:
    """For processors without state: `init` gives `()` and `observe` keeps it."""

    def init(self, prompt_tokens: jax.Array, prompt_mask: jax.Array, vocab_size: int) -> tuple:
        """No state: `()`."""
        return ()

    def observe(self, state: tuple, token: jax.Array, log_probs: jax.Array) -> tuple:
        """No state to update."""
        return state


@dataclasses.dataclass(frozen=True)
class Temperature(_Stateless):
    """Temperature scaling: `logits / temperature`, i.e. `p_j ∝ exp(z_j / temperature)`
    (sharper below 1, flatter above)."""

    temperature: float

    def __post_init__(self):
        _require(
            _is_real(self.temperature) and 0 < self.temperature < math.inf,
            "temperature",
            "a finite value > 0",
            self.temperature,
        )

    def __call__(self, logits: jax.Array, state: tuple) -> tuple[jax.Array, tuple]:
        return logits / self.temperature, state


@dataclasses.dataclass(frozen=True)
class TopK(_Stateless):
    """Top-k sampling (Fan, Lewis and Dauphin, "Hierarchical Neural Story Generation", 2018):
    keep the `top_k` largest logits, exactly `min(top_k, V)` of them, ties by the lower id as
    `jax.lax.top_k` picks."""

    top_k: int

    def __post_init__(self):
        check_positive("top_k", self.top_k)

    def __call__(self, logits: jax.Array, state: tuple) -> tuple[jax.Array, tuple]:
        _, kept = jax.lax.top_k(logits, min(self.top_k, logits.shape[-1]))
        rows = jnp.arange(logits.shape[0])[:, None]
        keep = jnp.zeros(logits.shape, bool).at[rows, kept].set(True)
        return _masked(logits, keep), state


@dataclasses.dataclass(frozen=True)
class TopP(_Stateless):
    """Nucleus sampling (Holtzman, Buys, Du, Forbes and Choi, "The Curious Case of Neural Text
    Degeneration", ICLR 2020): with tokens sorted by probability, `p_(1) >= p_(2) >= ...`,
    keep the smallest prefix `V_p` with `sum_{j in V_p} p_j >= top_p` (at least one token)."""

    top_p: float

    def __post_init__(self):
        _require(
            _is_real(self.top_p) and 0 < self.top_p <= 1, "top_p", "a value in (0, 1]", self.top_p
        )

    def __call__(self, logits: jax.Array, state: tuple) -> tuple[jax.Array, tuple]:
        order = _descending(logits)
        sorted_probs = jnp.take_along_axis(jnp.exp(_log_probs(logits)), order, axis=-1)
        keep = _in_vocab_order(order, _smallest_prefix_with_mass(sorted_probs, self.top_p))
        return _masked(logits, keep), state


@dataclasses.dataclass(frozen=True)
class MinP(_Stateless):
    """Min-p sampling (Nguyen, Baker, Neo, Roush, Kirsch and Shwartz-Ziv, "Turning Up the
    Heat: Min-p Sampling for Creative and Coherent LLM Outputs", 2024): keep the tokens with
    `p_j >= min_p * max_l p_l`, compared in log space (`z_j - max_l z_l >= log min_p`).
    The most probable token always passes; `min_p = 0` keeps everything."""

    min_p: float

    def __post_init__(self):
        _require(
            _is_real(self.min_p) and 0 <= self.min_p <= 1, "min_p", "a value in [0, 1]", self.min_p
        )

    def __call__(self, logits: jax.Array, state: tuple) -> tuple[jax.Array, tuple]:
        log_probs = _log_probs(logits)
        threshold = jnp.max(log_probs, axis=-1, keepdims=True) + jnp.log(jnp.float32(self.min_p))
        return _masked(logits, log_probs >= threshold), state


@dataclasses.dataclass(frozen=True)
class TypicalP(_Stateless):
    """Locally typical sampling (Meister, Pimentel, Wiher and Cotterell, "Locally Typical
    Sampling", TACL 2023): with the entropy `H = -sum_j p_j log p_j`, sort the tokens by
    `|(-log p_j) - H|` ascending and keep the smallest prefix with `sum p_j >= mass` (at
    least one token, which need not be the most probable one)."""

    mass: float

    def __post_init__(self):
        _require(_is_real(self.mass) and 0 < self.mass <= 1, "mass", "a value in (0, 1]", self.mass)

    def __call__(self, logits: jax.Array, state: tuple) -> tuple[jax.Array, tuple]:
        log_probs = _log_probs(logits)
        distance = jnp.abs(-log_probs - _entropy(log_probs)[:, None])
        order = jnp.argsort(distance, axis=-1, stable=True)
        sorted_probs = jnp.take_along_axis(jnp.exp(log_probs), order, axis=-1)
        keep = _in_vocab_order(order, _smallest_prefix_with_mass(sorted_probs, self.mass))
        return _masked(logits, keep), state


@dataclasses.dataclass(frozen=True)
class EpsilonSampling(_Stateless):
    """Epsilon sampling (Hewitt, Manning and Liang, "Truncation Sampling as Language Model
    Desmoothing", Findings of EMNLP 2022): keep the tokens with `p_j > epsilon`, and the most
    probable token (the lowest id among ties) when none passes."""

    epsilon: float

    def __post_init__(self):
        _require(
            _is_real(self.epsilon) and 0 < self.epsilon < 1,
            "epsilon",
            "a value in (0, 1)",
            self.epsilon,
        )

    def __call__(self, logits: jax.Array, state: tuple) -> tuple[jax.Array, tuple]:
        return _keep_above(logits, jnp.full(logits.shape[:1], math.log(self.epsilon))), state


@dataclasses.dataclass(frozen=True)
class EtaSampling(EpsilonSampling):
    """Eta sampling (Hewitt, Manning and Liang, 2022, as `EpsilonSampling`): keep the tokens
    with `p_j > eta`, `eta = min(epsilon, sqrt(epsilon) exp(-H(p)))` with the entropy `H` in
    nats, i.e. `log eta = min(log epsilon, log(epsilon) / 2 - H)`; the most probable token is
    always kept."""

    def __call__(self, logits: jax.Array, state: tuple) -> tuple[jax.Array, tuple]:
        log_epsilon = math.log(self.epsilon)
        log_eta = jnp.minimum(log_epsilon, log_epsilon / 2 - _entropy(_log_probs(logits)))
        return _keep_above(logits, log_eta), state


@dataclasses.dataclass(frozen=True)
class TopH(_Stateless):
    """Top-H decoding (Baghaei Potraghloo, Azizi, Kundu and Pedram, "Top-H Decoding: Adapting
    the Creativity and Coherence with Bounded Entropy in Text Generation", NeurIPS 2025,
    arXiv:2509.02510), the greedy solution of its entropy-constrained mass maximization.

    With tokens sorted by probability, `p_(1) >= p_(2) >= ...`, keep the longest prefix
    `S_n = {(1), ..., (n)}` (at least `S_1`) with

        sum_{i <= n} -p_(i) log p_(i)  <=  alpha * H(p),      H(p) = -sum_j p_j log p_j.

    This is the stopping rule of the authors' `TopH_LogitsProcessor`
    (github.com/ErfanBaghaei/Top-H-Decoding, `logit_processor.py`), which tests the entropy of
    the renormalized selection `q = p|_S / sigma`, `sigma = sum_S p`, against `alpha H(p) /
    sigma + log sigma`; as `H(q) = (sum_S -p log p) / sigma + log sigma` the two are the same
    test. (Their README's shorthand `H(q) <= alpha H(p)` would compare `H(q)` itself.) The
    left side grows with `n`, so the kept set is a prefix. The authors' code also looks only at
    the 100 most probable tokens; here all `V` take part.
    """

    alpha: float

    def __post_init__(self):
        _require(
            _is_real(self.alpha) and 0 < self.alpha <= 1, "alpha", "a value in (0, 1]", self.alpha
        )

    def __call__(self, logits: jax.Array, state: tuple) -> tuple[jax.Array, tuple]:
        order = _descending(logits)
        sorted_log_probs = jnp.take_along_axis(_log_probs(logits), order, axis=-1)
        sorted_probs = jnp.exp(sorted_log_probs)
        partial = jnp.cumsum(
            jnp.where(sorted_probs > 0, -sorted_probs * sorted_log_probs, 0.0), axis=-1
        )
        # The last partial sum is H(p): alpha = 1 then keeps every token however sums round.
        first = jnp.arange(logits.shape[-1]) == 0
        keep_sorted = (partial <= self.alpha * partial[:, -1:]) | first
        return _masked(logits, _in_vocab_order(order, keep_sorted)), state


@dataclasses.dataclass(frozen=True)
class RepetitionPenalty:
    """The CTRL repetition penalty (Keskar, McCann, Varshney, Xiong and Socher, "CTRL: A
    Conditional Transformer Language Model for Controllable Generation", 2019), as Hugging
    Face's `RepetitionPenaltyLogitsProcessor` applies it: for every token that is in the
    prompt (where `prompt_mask` is True) or was generated so far,

        z_j <- z_j / penalty  if z_j > 0,      z_j <- z_j * penalty  otherwise.

    State: `seen: [B, V]` bool.
    """

    penalty: float

    def __post_init__(self):
        _require(
            _is_real(self.penalty) and 0 < self.penalty < math.inf,
            "penalty",
            "a finite value > 0",
            self.penalty,
        )

    def init(self, prompt_tokens: jax.Array, prompt_mask: jax.Array, vocab_size: int) -> jax.Array:
        """`seen: [B, V]`, True on the tokens of the prompt (padding left out)."""
        rows = jnp.arange(prompt_tokens.shape[0])[:, None]
        counts = jnp.zeros((prompt_tokens.shape[0], vocab_size), jnp.int32)
        return counts.at[rows, prompt_tokens].add(prompt_mask.astype(jnp.int32)) > 0

    def __call__(self, logits: jax.Array, seen: jax.Array) -> tuple[jax.Array, jax.Array]:
        penalized = jnp.where(logits > 0, logits / self.penalty, logits * self.penalty)
        return jnp.where(seen, penalized, logits), seen

    def observe(self, seen: jax.Array, token: jax.Array, log_probs: jax.Array) -> jax.Array:
        """Marks the picked token as seen."""
        return seen | _one_hot(token, seen.shape[-1])


@dataclasses.dataclass(frozen=True)
class OccurrencePenalty:
    """OpenAI's frequency and presence penalties (the API reference's definition):

        z_j <- z_j - frequency * c_j - presence * [c_j > 0],

    where `c_j` counts the times token `j` was generated so far. The prompt is not counted
    (that is OpenAI's definition; `RepetitionPenalty` is the one that sees the prompt).
    State: `counts: [B, V]` int32.
    """

    frequency: float = 0.0
    presence: float = 0.0

    def __post_init__(self):
        for name in ("frequency", "presence"):
            value = getattr(self, name)
            _require(_is_real(value) and math.isfinite(value), name, "a finite number", value)

    def init(self, prompt_tokens: jax.Array, prompt_mask: jax.Array, vocab_size: int) -> jax.Array:
        """`counts: [B, V]`, zero: nothing generated yet."""
        return jnp.zeros((prompt_tokens.shape[0], vocab_size), jnp.int32)

    def __call__(self, logits: jax.Array, counts: jax.Array) -> tuple[jax.Array, jax.Array]:
        penalty = self.frequency * counts + self.presence * (counts > 0)
        return logits - penalty, counts

    def observe(self, counts: jax.Array, token: jax.Array, log_probs: jax.Array) -> jax.Array:
        """Counts the picked token."""
        return counts + _one_hot(token, counts.shape[-1])


def _zipf_exponent(sorted_log_probs: jax.Array, m: int) -> jax.Array:
    """Mirostat's least-squares Zipf exponent `s_hat: [B]` (see `Mirostat`) from the `m`
    largest of `sorted_log_probs: [B, V]` (descending). Pairs with `p_{i+1} = 0` (tokens
    already removed) carry no Zipf information and are left out; with none left, `s_hat = 0`.
    """
    m = min(m, sorted_log_probs.shape[-1])
    i = jnp.arange(1, m, dtype=jnp.float32)
    t = jnp.log((i + 1) / i)
    upper, lower = sorted_log_probs[:, : m - 1], sorted_log_probs[:, 1:m]
    valid = jnp.isfinite(lower)
    b = jnp.where(valid, upper - jnp.where(valid, lower, 0.0), 0.0)
    numerator = jnp.sum(t * b, axis=-1)
    denominator = jnp.sum(jnp.where(valid, t * t, 0.0), axis=-1)
    return jnp.where(denominator > 0, numerator / jnp.where(denominator > 0, denominator, 1), 0)


def _mirostat_k(s_hat: jax.Array, mu: jax.Array, vocab_size: int) -> jax.Array:
    """Mirostat's `k: [B]` int32 (see `Mirostat`), `N = vocab_size`, computed in log space;
    `eps / (1 - N^-eps)` is `1 / log N` at `eps = 0`, its limit.
    """
    log_n = math.log(vocab_size)
    eps = s_hat - 1
    safe_eps = jnp.where(eps == 0, 1.0, eps)
    zipf_factor = jnp.where(eps == 0, 1 / log_n, safe_eps / -jnp.expm1(-safe_eps * log_n))
    # A flat head gives s_hat = 0, where the power 1 / s_hat is unbounded: a tiny floor sends k
    # to 1 or N (the limit's side) instead of NaN.
    exponent = 1 / jnp.maximum(s_hat, jnp.finfo(jnp.float32).eps)
    log_k = (jnp.log(zipf_factor) + mu * math.log(2)) * exponent
    k = jnp.round(jnp.exp(jnp.clip(log_k, 0.0, log_n)))
    return jnp.clip(k, 1, vocab_size).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class Mirostat:
    """Mirostat, Algorithm 1 of Basu, Ramachandran, Keskar and Varshney, "Mirostat: A Neural
    Text Decoding Algorithm that Directly Controls Perplexity" (ICLR 2021); not Mirostat 2.0.

    `tau` is the target surprise in bits, `eta` the learning rate, `m` the number of top
    probabilities for the Zipf fit. State: `mu: [B]`, starting at `2 tau`. Each step, with
    the probabilities sorted descending, `p_1 >= p_2 >= ...`, and `N = V`:

        s_hat = sum_i t_i b_i / sum_i t_i^2,   t_i = log((i + 1) / i),   b_i = log(p_i / p_{i+1})
        (i = 1 .. m - 1),   eps = s_hat - 1,   k = ((eps 2^mu) / (1 - N^-eps))^(1 / s_hat),

    `k` rounded and clipped to `[1, N]`, and the top `k` tokens are kept. After the pick `x`,

        S = -log2 q(x),   e = S - tau,   mu <- mu - eta * e,

    where `q` is the final (truncated, renormalized) distribution `x` was drawn from, i.e.
    `log_probs` converted to bits; put Mirostat last so that `q` is its own.

    Decisions against the authors' `mirostat.py` (github.com/basusourya/mirostat): there `S` is
    read from the untruncated distribution and `k` is the rounded formula plus one; here `S`
    is measured on the distribution the token was drawn from, and `k` is the formula as
    printed in the paper. Their fit sums 100 pairs (101 probabilities); here the `m` top
    probabilities give `m - 1` pairs, as the paper's sum over `i = 1 .. m - 1`, with
    `m = min(m, V)`.
    """

    tau: float
    eta: float = 0.1
    m: int = 100

    def __post_init__(self):
        for name in ("tau", "eta"):
            value = getattr(self, name)
            _require(_is_real(value) and 0 < value < math.inf, name, "a finite value > 0", value)
        check_at_least("m", self.m, 2, "the Zipf fit needs a pair of probabilities")

    def init(self, prompt_tokens: jax.Array, prompt_mask: jax.Array, vocab_size: int) -> jax.Array:
        """`mu: [B]` = `2 tau`."""
        return jnp.full((prompt_tokens.shape[0],), 2 * self.tau, jnp.float32)

    def __call__(self, logits: jax.Array, mu: jax.Array) -> tuple[jax.Array, jax.Array]:
        vocab_size = logits.shape[-1]
        order = _descending(logits)
        sorted_log_probs = jnp.take_along_axis(_log_probs(logits), order, axis=-1)
        k = _mirostat_k(_zipf_exponent(sorted_log_probs, self.m), mu, vocab_size)
        keep_sorted = jnp.arange(vocab_size) < k[:, None]
        return _masked(logits, _in_vocab_order(order, keep_sorted)), mu

    def observe(self, mu: jax.Array, token: jax.Array, log_probs: jax.Array) -> jax.Array:
        """`mu - eta * (S - tau)` with the surprise `S = -log2 q(token)`."""
        surprise = -jnp.take_along_axis(log_probs, token[:, None], axis=-1)[:, 0] / math.log(2)
        return mu - self.eta * (surprise - self.tau)


@dataclasses.dataclass(frozen=True)
class Sampler:
    """Processors applied in order, then the argmax (`greedy`) or a draw from
    `softmax(processed logits)`; every processor then observes the pick."""

    processors: tuple[LogitsProcessor, ...] = ()
    greedy: bool = False

    def __post_init__(self):
        _require(
            isinstance(self.processors, tuple),
            "processors",
            "a tuple of logits processors (hashable, for jit)",
            self.processors,
        )
        _require(isinstance(self.greedy, bool), "greedy", "a bool", self.greedy)

    def init(self, prompt_tokens: jax.Array, prompt_mask: jax.Array, vocab_size: int) -> tuple:
        """The processors' states, in order. `prompt_tokens: [B, T]` int32, `prompt_mask:
        [B, T]` bool (True on real prompt tokens)."""
        return tuple(p.init(prompt_tokens, prompt_mask, vocab_size) for p in self.processors)

    def process(self, logits: jax.Array, state: tuple) -> tuple[jax.Array, tuple]:
        """Applies the processors in order: logits `[B, V]` -> processed logits `[B, V]`
        float32, and their states."""
        logits = logits.astype(jnp.float32)
        states = []
        for processor, processor_state in zip(self.processors, state, strict=True):
            logits, processor_state = processor(logits, processor_state)
            states.append(processor_state)
        return logits, tuple(states)

    def sample(self, logits: jax.Array, state: tuple, rng: jax.Array) -> tuple[jax.Array, tuple]:
        """Picks the next token from logits `[B, V]`: `(token [B] int32, new state)`.

        The argmax of the processed logits if `greedy`, else a categorical draw from their
        softmax with the key `rng`; then every processor observes the token and the final
        `log_softmax`.
        """
        logits, state = self.process(logits, state)
        if self.greedy:
            token = jnp.argmax(logits, axis=-1)
        else:
            token = jax.random.categorical(rng, logits, axis=-1)
        token = token.astype(jnp.int32)
        log_probs = _log_probs(logits)
        state = tuple(
            p.observe(s, token, log_probs) for p, s in zip(self.processors, state, strict=True)
        )
        return token, state


def greedy() -> Sampler:
    """Greedy decoding: the argmax of the raw logits."""
    return Sampler(greedy=True)


def make_sampler(
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    typical_p: float | None = None,
    repetition_penalty: float | None = None,
    frequency_penalty: float | None = None,
    presence_penalty: float | None = None,
    epsilon: float | None = None,
    eta: float | None = None,
    top_h: float | None = None,
    mirostat_tau: float | None = None,
    mirostat_eta: float = 0.1,
    greedy: bool = False,
) -> Sampler:
    """A `Sampler` from the usual knobs; `None` leaves a processor out.

    The chain runs in the conventional order (Hugging Face's): the penalties on the raw
    logits, then the temperature, then the truncations, Mirostat last (its surprise is read
    from the final distribution):

        RepetitionPenalty(repetition_penalty), OccurrencePenalty(frequency_penalty,
        presence_penalty), Temperature(temperature), TopK(top_k), TopP(top_p), MinP(min_p),
        TypicalP(typical_p), EpsilonSampling(epsilon), EtaSampling(eta), TopH(top_h),
        Mirostat(mirostat_tau, mirostat_eta).

    `temperature = 0` means greedy: the argmax of the processed logits (the penalties and
    truncations still apply); `temperature = 1` adds no processor.
    """
    _require(
        _is_real(temperature) and 0 <= temperature < math.inf,
        "temperature",
        "a finite value >= 0 (0 means greedy)",
        temperature,
    )
    processors: list[LogitsProcessor] = []
    if repetition_penalty is not None:
        processors.append(RepetitionPenalty(repetition_penalty))
    if frequency_penalty is not None or presence_penalty is not None:
        processors.append(OccurrencePenalty(frequency_penalty or 0.0, presence_penalty or 0.0))
    if temperature not in (0, 1):
        processors.append(Temperature(temperature))
    truncations = (
        (top_k, TopK),
        (top_p, TopP),
        (min_p, MinP),
        (typical_p, TypicalP),
        (epsilon, EpsilonSampling),
        (eta, EtaSampling),
        (top_h, TopH),
    )
    processors += [make(value) for value, make in truncations if value is not None]
    if mirostat_tau is not None:
        processors.append(Mirostat(mirostat_tau, mirostat_eta))
    return Sampler(tuple(processors), greedy=greedy or temperature == 0)
