"""Beam search and diverse beam search over the decoding engine's prefill and cache.

Beam search keeps, per prompt, the K continuations (beams) of highest log-probability
`log p(y_1 .. y_t | prompt) = sum_i log p(y_i | prompt, y_<i)`. Each step extends every live
beam by every token, a candidate scoring `beam log-prob + log_softmax(logits)[token]`, keeps the
best K of the K * V candidates, and reorders the model's cache by the kept beams' parents: a
gather along each cache leaf's batch axis, so no state is recomputed. The prompt is prefilled
once per row; the first step expands that single state (beam 0 of each group is alive, the
others start at -inf, which keeps copies of the same beam out of the search).

Finished beams: the live and finished sets of tensor2tensor's beam search (Vaswani et al.
2018, "Tensor2Tensor for Neural Machine Translation"; Flax's example decoder does the same).
A candidate ending in one of `stop_tokens` never takes a live slot: the best K candidates that
do not end in a stop token become the live beams, and those that do compete by score for the K
slots of the finished set. A finished hypothesis keeps its score; its tokens after the stop are
`pad_token` (log-probability 0). After `max_new_tokens` tokens the live beams are finished by
length and enter the same competition. The loop stops early once, in every row and group, the
worst finished score is at least what any live beam could still reach: log-probabilities only
fall, so a live beam of log-prob `l <= 0` after `t` tokens ends with a score of at most
`max(l / (t + 1) ** alpha, l / N ** alpha)`.

Length normalization (Hugging Face's `length_penalty` over the generated length, a simpler
form of the `(5 + |Y|) ** alpha / 6 ** alpha` of Wu et al. 2016, "Google's Neural Machine
Translation System")::

    score = log_prob / length ** length_penalty

with `length` the generated tokens, the stop token included (the empty continuation of
`max_new_tokens = 0` scores 0). `length_penalty = 0` ranks by the raw log-prob sum; a larger
one favours longer hypotheses.

Diverse beam search (Vijayakumar et al. 2018, "Diverse Beam Search: Decoding Diverse
Solutions from Neural Sequence Models", with Hamming diversity): the K beams form G
groups of K / G, each a beam search as above. Within a time step the groups are expanded one
after another, and group g selects its live beams by

    beam log-prob + log p(token) - diversity_penalty * count_g(token)

where `count_g(token)` is how many live beams of the groups before g chose `token` at this
step. The penalty only selects: the beams' log-probs and scores are the model's (Hugging Face
instead accumulates the penalty into its beam scores). G = 1 or a zero penalty is an ordinary
beam search of width K / G in every group.

Shapes: B prompts, K beams (G groups of K' = K / G), V tokens, N = `max_new_tokens`. Inside
the search the beams are laid out `[G, B, K']` and the cache holds G * B * K' rows in that
order.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from seqjax.checks import check_positive
from seqjax.generate.engine import check_request, full_lengths, right_align


class BeamSearchResult(NamedTuple):
    """Per prompt K hypotheses: `tokens: [B, K, N]` int32 (`pad_token` after a stop token),
    `scores: [B, K]` float32 (length-normalized), `log_probs: [B, K]` float32 (the sum of the
    model's log-probabilities of the tokens), `lengths: [B, K]` int32 (generated tokens, the
    stop token included). Group g holds beams `g * K' .. (g + 1) * K' - 1`, best first (one
    group: all K best first). A slot no hypothesis reached has score and log-prob -inf."""

    tokens: jax.Array
    scores: jax.Array
    log_probs: jax.Array
    lengths: jax.Array


class _Live(NamedTuple):
    """The live beams: `tokens [..., K', N]` (`pad_token` past the current step) and the
    model's `log_probs [..., K']` (-inf for a beam not yet alive)."""

    tokens: jax.Array
    log_probs: jax.Array


class _SearchState(NamedTuple):
    """What one step carries: tokens emitted so far `step`, the live beams' next-token
    `logits [G, B, K', V]`, the cache (G * B * K' rows), the live and finished beams
    (`[G, B, K', ...]`)."""

    step: jax.Array
    logits: jax.Array
    cache: Any
    live: _Live
    finished: BeamSearchResult


def _batch_axes(model: nn.Module, capacity: int, cache_dtype: Any) -> Any:
    """Per cache leaf, its batch axis: the one whose size differs between caches of 1 and 2
    rows (stacked layer caches put it behind the layer axis, `position` has it first)."""
    one, two = (
        jax.eval_shape(functools.partial(model.init_cache, batch, capacity, cache_dtype))
        for batch in (1, 2)
    )
    return jax.tree.map(
        lambda a, b: int(np.flatnonzero(np.array(a.shape) != np.array(b.shape))[0]), one, two
    )


def _take_rows(cache: Any, rows: jax.Array, axes: Any) -> Any:
    """The cache whose row i is row `rows[i]` of `cache`."""
    return jax.tree.map(lambda leaf, axis: jnp.take(leaf, rows, axis=axis), cache, axes)


def _normalized(log_probs: jax.Array, length: jax.Array, length_penalty: jax.Array) -> jax.Array:
    # The empty continuation (length 0) scores its log-prob, 0, instead of 0 / 0.
    length = jnp.maximum(length, 1).astype(jnp.float32)
    return log_probs / length**length_penalty


def _best(hypotheses: BeamSearchResult, k: int) -> BeamSearchResult:
    """The `k` best of `hypotheses` (`[B, M, ...]`) by score, best first."""
    scores, index = jax.lax.top_k(hypotheses.scores, k)
    tokens = jnp.take_along_axis(hypotheses.tokens, index[..., None], axis=1)
    log_probs = jnp.take_along_axis(hypotheses.log_probs, index, axis=1)
    lengths = jnp.take_along_axis(hypotheses.lengths, index, axis=1)
    return BeamSearchResult(tokens, scores, log_probs, lengths)


def _extend(live: _Live, flat_index: jax.Array, candidates: jax.Array, step: jax.Array):
    """`(parents [B, k], tokens [B, k, N], log_probs [B, k])` of the candidates at
    `flat_index [B, k]` into `candidates [B, K' * V]`."""
    vocab_size = candidates.shape[1] // live.tokens.shape[1]
    parents, token = flat_index // vocab_size, flat_index % vocab_size
    tokens = jnp.take_along_axis(live.tokens, parents[..., None], axis=1)
    tokens = tokens.at[:, :, step].set(token)
    return parents, tokens, jnp.take_along_axis(candidates, flat_index, axis=1)


def _expand_group(
    live: _Live,
    finished: BeamSearchResult,
    token_log_probs: jax.Array,
    counts: jax.Array,
    step: jax.Array,
    *,
    is_stop: jax.Array,
    length_penalty: jax.Array,
    diversity_penalty: jax.Array,
):
    """One step of one group (`[B, K', ...]`): `(live, finished, parents [B, K'], counts)`.
    `token_log_probs: [B, K', V]`; `counts: [B, V]`, how often the groups before this one chose
    each token at this step (returned with this group's choices added)."""
    batch, width, vocab_size = token_log_probs.shape
    candidates = live.log_probs[..., None] + token_log_probs
    continuing = jnp.where(is_stop, -jnp.inf, candidates)
    stopping = jnp.where(is_stop, candidates, -jnp.inf).reshape(batch, width * vocab_size)

    ranked = continuing - diversity_penalty * counts[:, None, :]
    _, index = jax.lax.top_k(ranked.reshape(batch, -1), width)
    continuing = continuing.reshape(batch, width * vocab_size)
    parents, tokens, log_probs = _extend(live, index, continuing, step)
    chosen = jax.nn.one_hot(tokens[:, :, step], vocab_size) * jnp.isfinite(log_probs)[..., None]
    counts = counts + jnp.sum(chosen, axis=1)

    stop_scores, stop_index = jax.lax.top_k(_normalized(stopping, step + 1, length_penalty), width)
    _, stopped_tokens, stop_log_probs = _extend(live, stop_index, stopping, step)
    stopped = BeamSearchResult(
        stopped_tokens, stop_scores, stop_log_probs, jnp.full_like(stop_index, step + 1)
    )
    both = jax.tree.map(lambda a, b: jnp.concatenate([a, b], axis=1), finished, stopped)
    return _Live(tokens, log_probs), _best(both, width), parents, counts


def _searching(state: _SearchState, length_penalty: jax.Array) -> jax.Array:
    """Whether another step can change the result: tokens remain and, in some row and group,
    a live beam could still beat the worst finished hypothesis."""
    max_new_tokens = state.live.tokens.shape[-1]
    best_live = jnp.max(state.live.log_probs, axis=-1)
    reachable = jnp.maximum(
        _normalized(best_live, state.step + 1, length_penalty),
        _normalized(best_live, max_new_tokens, length_penalty),
    )
    settled = state.finished.scores[..., -1] >= reachable
    return (state.step < max_new_tokens) & ~jnp.all(settled)


def _search_step(
    model: nn.Module,
    params: Any,
    state: _SearchState,
    *,
    cache_axes: Any,
    is_stop: jax.Array,
    length_penalty: jax.Array,
    diversity_penalty: jax.Array,
) -> _SearchState:
    """Expands the groups in order, then (unless the search is over) reorders the cache by
    parent and runs the model on the chosen tokens."""
    groups, batch, width, _ = state.logits.shape
    expand = functools.partial(
        _expand_group,
        step=state.step,
        is_stop=is_stop,
        length_penalty=length_penalty,
        diversity_penalty=diversity_penalty,
    )

    def group(counts, beams):
        live, finished, token_log_probs = beams
        live, finished, parents, counts = expand(live, finished, token_log_probs, counts)
        return counts, (live, finished, parents)

    token_log_probs = jax.nn.log_softmax(state.logits, axis=-1)
    counts = jnp.zeros((batch, state.logits.shape[-1]), jnp.float32)
    _, (live, finished, parents) = jax.lax.scan(
        group, counts, (state.live, state.finished, token_log_probs)
    )
    rows = jnp.arange(groups * batch)[:, None] * width + parents.reshape(groups * batch, width)
    token = live.tokens[..., state.step].reshape(-1)
    state = _SearchState(state.step + 1, state.logits, state.cache, live, finished)

    def advance(cache):
        cache = _take_rows(cache, rows.reshape(-1), cache_axes)
        logits, cache = model.apply({"params": params}, token[:, None], cache=cache)
        return logits[:, -1].reshape(state.logits.shape), cache

    def stay(cache):
        return state.logits, cache

    logits, cache = jax.lax.cond(_searching(state, length_penalty), advance, stay, state.cache)
    return state._replace(logits=logits, cache=cache)


@functools.partial(
    jax.jit,
    static_argnames=(
        "model",
        "beam_size",
        "num_groups",
        "max_new_tokens",
        "capacity",
        "cache_dtype",
    ),
)
def _beam_search(
    model: nn.Module,
    params: Any,
    prompt_tokens: jax.Array,
    prompt_lengths: jax.Array,
    is_stop: jax.Array,
    pad_token: jax.Array,
    length_penalty: jax.Array,
    diversity_penalty: jax.Array,
    *,
    beam_size: int,
    num_groups: int,
    max_new_tokens: int,
    capacity: int,
    cache_dtype: Any,
) -> BeamSearchResult:
    """The search (the module docstring); `is_stop: [V]` bool marks the stop tokens."""
    batch = prompt_tokens.shape[0]
    width = beam_size // num_groups
    tokens, segment_ids, _ = right_align(prompt_tokens, prompt_lengths)
    cache = model.init_cache(batch, capacity, cache_dtype)
    logits, cache = model.apply({"params": params}, tokens, segment_ids=segment_ids, cache=cache)

    # Row (g, b, k) of the search starts from prompt b.
    prompt_rows = jnp.tile(jnp.repeat(jnp.arange(batch), width), num_groups)
    cache_axes = _batch_axes(model, capacity, cache_dtype)
    shape = (num_groups, batch, width)
    alive = jnp.arange(width) == 0
    state = _SearchState(
        step=jnp.zeros((), jnp.int32),
        logits=logits[prompt_rows, -1].reshape(*shape, logits.shape[-1]),
        cache=_take_rows(cache, prompt_rows, cache_axes),
        live=_Live(
            tokens=jnp.full((*shape, max_new_tokens), pad_token, jnp.int32),
            log_probs=jnp.broadcast_to(jnp.where(alive, 0.0, -jnp.inf).astype(jnp.float32), shape),
        ),
        finished=BeamSearchResult(
            tokens=jnp.full((*shape, max_new_tokens), pad_token, jnp.int32),
            scores=jnp.full(shape, -jnp.inf, jnp.float32),
            log_probs=jnp.full(shape, -jnp.inf, jnp.float32),
            lengths=jnp.zeros(shape, jnp.int32),
        ),
    )
    step = functools.partial(
        _search_step,
        model,
        params,
        cache_axes=cache_axes,
        is_stop=is_stop,
        length_penalty=length_penalty,
        diversity_penalty=diversity_penalty,
    )
    if max_new_tokens > 0:  # a step writes column `step`, which an empty output lacks
        state = jax.lax.while_loop(lambda s: _searching(s, length_penalty), step, state)

    # Live beams that used every token are finished by length; after an early stop they are
    # unfinished, and none could have beaten the finished hypotheses.
    complete = state.step == max_new_tokens
    live = state.live
    by_length = BeamSearchResult(
        live.tokens,
        jnp.where(complete, _normalized(live.log_probs, max_new_tokens, length_penalty), -jnp.inf),
        live.log_probs,
        jnp.full(shape, max_new_tokens, jnp.int32),
    )
    both = jax.tree.map(lambda a, b: jnp.concatenate([a, b], axis=2), state.finished, by_length)
    best = jax.vmap(functools.partial(_best, k=width))(both)
    # [G, B, K', ...] -> [B, G * K', ...]
    return jax.tree.map(
        lambda x: jnp.moveaxis(x, 0, 1).reshape(batch, beam_size, *x.shape[3:]), best
    )


def beam_search(
    model: nn.Module,
    params: Any,
    prompt_tokens: jax.Array,
    *,
    beam_size: int,
    max_new_tokens: int,
    length_penalty: float = 1.0,
    stop_tokens: tuple[int, ...] = (),
    prompt_lengths: jax.Array | None = None,
    max_length: int | None = None,
    pad_token: int = 0,
    num_groups: int = 1,
    diversity_penalty: float = 0.0,
    cache_dtype: Any = jnp.float32,
) -> BeamSearchResult:
    """The `beam_size` best continuations of each prompt by (diverse) beam search (the module
    docstring states the algorithm, the finished-beam handling and the score).

    Args:
      model: a `LanguageModel` (any mixers); params: its parameters (`variables["params"]`).
      prompt_tokens: `[B, P]` int, right-padded when `prompt_lengths` is given.
      beam_size: K, hypotheses kept per prompt (>= 1).
      max_new_tokens: N, the most tokens a hypothesis has (>= 0).
      length_penalty: the exponent of `score = log_prob / length ** length_penalty`.
      stop_tokens: ids in [0, V) that finish a hypothesis (emitted, then padding).
      prompt_lengths: `[B]` real tokens per row, in [1, P]; None means P.
      max_length: the context attention caches hold (default `P + max_new_tokens`).
      pad_token: what fills a hypothesis after its stop token.
      num_groups: G, the groups of diverse beam search; must divide `beam_size`.
      diversity_penalty: the Hamming diversity strength (>= 0).
      cache_dtype: dtype of the attention caches and convolution tails.

    Returns:
      `BeamSearchResult(tokens [B, K, N], scores [B, K], log_probs [B, K], lengths [B, K])`,
      each group's beams best first.
    """
    check_positive("beam_size", beam_size)
    check_positive("num_groups", num_groups)
    if beam_size % num_groups:
        raise ValueError(
            f"num_groups: expected a divisor of beam_size = {beam_size}, got {num_groups}"
        )
    if not (np.isfinite(diversity_penalty) and diversity_penalty >= 0):
        raise ValueError(
            f"diversity_penalty: expected a finite number >= 0, got {diversity_penalty!r}"
        )
    if not np.isfinite(length_penalty):
        raise ValueError(f"length_penalty: expected a finite number, got {length_penalty!r}")
    capacity = check_request(prompt_tokens, prompt_lengths, max_new_tokens, max_length)
    vocab_size = model.config.vocab_size
    stop_tokens = tuple(int(t) for t in stop_tokens)
    if any(not 0 <= t < vocab_size for t in stop_tokens):
        raise ValueError(f"stop_tokens: expected ids in [0, V = {vocab_size}), got {stop_tokens}")
    return _beam_search(
        model,
        params,
        jnp.asarray(prompt_tokens, jnp.int32),
        full_lengths(prompt_tokens, prompt_lengths),
        jnp.isin(jnp.arange(vocab_size), jnp.asarray(stop_tokens, jnp.int32)),
        jnp.asarray(pad_token, jnp.int32),
        jnp.asarray(length_penalty, jnp.float32),
        jnp.asarray(diversity_penalty, jnp.float32),
        beam_size=beam_size,
        num_groups=num_groups,
        max_new_tokens=max_new_tokens,
        capacity=capacity,
        cache_dtype=cache_dtype,
    )
