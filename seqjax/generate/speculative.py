"""Speculative decoding with a small draft model (Leviathan et al. 2023, "Fast Inference from
Transformers via Speculative Decoding"; Chen et al. 2023, "Accelerating Large Language Model
Decoding with Speculative Sampling").

Each round, from the state after every token emitted so far:

1. the draft proposes `gamma` tokens `d_1 .. d_gamma`, each sampled from its (processed)
   distribution `q_i`, one draft step per token;
2. the target scores them in ONE parallel call from its cache, giving `p_1 .. p_{gamma+1}`
   (`p_1` it already had);
3. `d_i` is accepted with probability `min(1, p_i(d_i) / q_i(d_i))`; at the first rejection
   `n < gamma` a correction is drawn from `norm(max(0, p_{n+1} - q_{n+1}))`, and when all are
   accepted a bonus token from `p_{gamma+1}`. The round emits `d_1 .. d_n` and that token, and
   every emitted token is distributed exactly as sampling from the target alone.

With a greedy sampler both models take argmaxes: `d_i` is accepted iff it is the target's
argmax, the correction is the target's argmax, and the output is the target's greedy output.

Rolling back: the verification call leaves the target's cache after all `gamma` proposals, and
the draft's after its own, but only `n + 1` tokens survive. The states roll back by
recomputation: each model reruns the round's surviving tokens from its cache at the start of
the round (one parallel call of `n + 1` tokens, a `lax.switch` over the `gamma + 1` possible
lengths), which also yields both models' next-token logits. This works for every mixer (a
recurrent state cannot be un-updated, and nothing here depends on the cache's layout) at the
cost of one more target call per round; per-token states are not kept.

Rows are independent searches (`jax.vmap` over the batch): under `vmap` the `lax.switch`
evaluates every branch, so batches pay the rollback for all `gamma + 1` lengths; a batch of one
pays only its own.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from seqjax.checks import check_positive
from seqjax.generate.engine import check_request, full_lengths, right_align
from seqjax.generate.samplers import Sampler


class SpeculativeResult(NamedTuple):
    """`tokens: [B, N]` (`pad_token` after a stop), `lengths: [B]`, and per row the draft
    tokens `proposed` and `accepted` (their ratio is the acceptance rate)."""

    tokens: jax.Array
    lengths: jax.Array
    proposed: jax.Array
    accepted: jax.Array


class _Model(NamedTuple):
    """A model and its parameters, called on one row."""

    module: nn.Module
    params: Any

    def __call__(self, tokens, cache, segment_ids=None):
        """`tokens: [T]` -> `(logits [T, V], cache)` from `cache` (batch 1)."""
        segment_ids = None if segment_ids is None else segment_ids[None]
        logits, cache = self.module.apply(
            {"params": self.params}, tokens[None], segment_ids=segment_ids, cache=cache
        )
        return logits[0], cache


class _Round(NamedTuple):
    emitted: jax.Array  # [N + gamma + 1] int32, the output so far
    count: jax.Array  # tokens emitted
    done: jax.Array
    target_cache: Any
    draft_cache: Any
    target_next: jax.Array  # [V]: the target's logits for the next token
    draft_next: jax.Array  # [V]
    rng: jax.Array
    proposed: jax.Array
    accepted: jax.Array


def _processed(sampler: Sampler, logits: jax.Array) -> jax.Array:
    """The stateless processors of `sampler` applied to `logits: [R, V]`."""
    for processor in sampler.processors:
        logits, _ = processor(logits, ())
    return logits


def _check_stateless(sampler: Sampler, vocab_size: int) -> None:
    state = jax.eval_shape(
        lambda tokens, mask: sampler.init(tokens, mask, vocab_size),
        jnp.zeros((1, 1), jnp.int32),
        jnp.ones((1, 1), bool),
    )
    if jax.tree.leaves(state):
        raise ValueError(
            "sampler: speculative decoding needs stateless processors (temperature and "
            "truncations); penalties and Mirostat carry state the draft cannot share"
        )


def _propose(draft: _Model, sampler: Sampler, state: _Round, gamma: int, key: jax.Array):
    """`(tokens [gamma], draft log-probs [gamma, V])`: the draft's proposals."""

    def step(carry, key):
        cache, logits = carry
        log_q = jax.nn.log_softmax(_processed(sampler, logits[None])[0])
        token = jnp.argmax(log_q) if sampler.greedy else jax.random.categorical(key, log_q)
        token = token.astype(jnp.int32)
        next_logits, cache = draft(token[None], cache)
        return (cache, next_logits[0]), (token, log_q)

    keys = jax.random.split(key, gamma)
    _, (tokens, log_q) = jax.lax.scan(step, (state.draft_cache, state.draft_next), keys)
    return tokens, log_q


def _verify(sampler: Sampler, tokens, log_q, log_p, key):
    """`(n, token)`: how many proposals survive and the token drawn after them (the
    correction, or the bonus when all survive). `log_p: [gamma + 1, V]`."""
    gamma = tokens.shape[0]
    rows = jnp.arange(gamma)
    if sampler.greedy:
        target_choice = jnp.argmax(log_p, axis=-1).astype(jnp.int32)
        accept = tokens == target_choice[:gamma]
        n = jnp.sum(jnp.cumprod(accept.astype(jnp.int32)))
        return n, target_choice[n]
    uniform_key, residual_key = jax.random.split(key)
    ratio = jnp.exp(log_p[rows, tokens] - log_q[rows, tokens])
    accept = jax.random.uniform(uniform_key, (gamma,)) < jnp.minimum(1.0, ratio)
    n = jnp.sum(jnp.cumprod(accept.astype(jnp.int32)))
    p = jnp.exp(log_p[n])
    q = jnp.where(n < gamma, jnp.exp(log_q[jnp.minimum(n, gamma - 1)]), 0.0)
    residual = jnp.maximum(p - q, 0.0)
    # p > q somewhere whenever a rejection happened (both sum to one and they differ there).
    token = jax.random.categorical(residual_key, jnp.log(residual))
    return n, token.astype(jnp.int32)


def _rollback(model: _Model, cache, tokens: jax.Array, n: jax.Array):
    """The model's logits and cache after `tokens[: n + 1]` from `cache`, `tokens:
    [gamma + 1]`: one branch per length."""

    def branch(length):
        def run(cache):
            logits, cache = model(tokens[:length], cache)
            return logits[-1], cache

        return run

    return jax.lax.switch(n, [branch(length) for length in range(1, tokens.shape[0] + 1)], cache)


def _generate_row(
    target: _Model,
    draft: _Model,
    prompt: jax.Array,
    segment_ids: jax.Array,
    rng: jax.Array,
    *,
    sampler: Sampler,
    gamma: int,
    max_new_tokens: int,
    capacity: int,
    stop_tokens: tuple[int, ...],
    pad_token: int,
):
    """One row's speculative decoding (`prompt, segment_ids: [P]`, right-aligned)."""
    target_logits, target_cache = target(prompt, target.module.init_cache(1, capacity), segment_ids)
    draft_logits, draft_cache = draft(prompt, draft.module.init_cache(1, capacity), segment_ids)
    zero = jnp.zeros((), jnp.int32)
    state = _Round(
        emitted=jnp.full((max_new_tokens + gamma + 1,), pad_token, jnp.int32),
        count=zero,
        done=jnp.asarray(max_new_tokens == 0),
        target_cache=target_cache,
        draft_cache=draft_cache,
        target_next=target_logits[-1],
        draft_next=draft_logits[-1],
        rng=rng,
        proposed=zero,
        accepted=zero,
    )
    stops = jnp.asarray(stop_tokens, jnp.int32)

    def round_(state: _Round) -> _Round:
        rng, propose_key, verify_key = jax.random.split(state.rng, 3)
        tokens, log_q = _propose(draft, sampler, state, gamma, propose_key)
        verified, _ = target(tokens, state.target_cache)
        logits = jnp.concatenate([state.target_next[None], verified], axis=0)
        log_p = jax.nn.log_softmax(_processed(sampler, logits), axis=-1)
        n, token = _verify(sampler, tokens, log_q, log_p, verify_key)
        survivors = jnp.concatenate([tokens, jnp.zeros((1,), jnp.int32)]).at[n].set(token)
        target_next, target_cache = _rollback(target, state.target_cache, survivors, n)
        draft_next, draft_cache = _rollback(draft, state.draft_cache, survivors, n)
        # Only the first n + 1 survive, and a stop token ends the row after itself.
        index = jnp.arange(gamma + 1)
        kept = index <= n
        stopped = kept & jnp.isin(survivors, stops)
        first_stop = jnp.argmax(stopped)
        kept = kept & (index <= jnp.where(jnp.any(stopped), first_stop, gamma))
        new = jnp.where(kept, survivors, pad_token)
        emitted = jax.lax.dynamic_update_slice(state.emitted, new, (state.count,))
        count = state.count + jnp.sum(kept)
        return _Round(
            emitted=emitted,
            count=count,
            done=jnp.any(stopped) | (count >= max_new_tokens),
            target_cache=target_cache,
            draft_cache=draft_cache,
            target_next=target_next,
            draft_next=draft_next,
            rng=rng,
            proposed=state.proposed + gamma,
            accepted=state.accepted + n,
        )

    state = jax.lax.while_loop(lambda s: ~s.done, round_, state)
    length = jnp.minimum(state.count, max_new_tokens)
    tokens = jnp.where(
        jnp.arange(max_new_tokens) < length, state.emitted[:max_new_tokens], pad_token
    )
    return tokens, length, state.proposed, state.accepted


@functools.partial(
    jax.jit,
    static_argnames=(
        "target",
        "draft",
        "sampler",
        "gamma",
        "max_new_tokens",
        "capacity",
        "stop_tokens",
        "pad_token",
    ),
)
def _speculative(target, target_params, draft, draft_params, prompt, lengths, rng, **static):
    tokens, segment_ids, _ = right_align(prompt, lengths)
    rngs = jax.random.split(rng, prompt.shape[0])
    row = functools.partial(
        _generate_row, _Model(target, target_params), _Model(draft, draft_params), **static
    )
    return jax.vmap(row)(tokens, segment_ids, rngs)


def speculative_generate(
    target: nn.Module,
    target_params: Any,
    draft: nn.Module,
    draft_params: Any,
    prompt_tokens: jax.Array,
    *,
    max_new_tokens: int,
    sampler: Sampler,
    rng: jax.Array,
    gamma: int = 4,
    stop_tokens: tuple[int, ...] = (),
    prompt_lengths: jax.Array | None = None,
    max_length: int | None = None,
    pad_token: int = 0,
) -> SpeculativeResult:
    """Samples up to `max_new_tokens` tokens from `target` with `draft` proposing `gamma` per
    round (the module docstring); arguments as `seqjax.generate.engine.generate`'s. The
    sampler's processors must be stateless (temperature, truncations): the draft and the
    target apply the same ones. The models must share the vocabulary."""
    check_positive("gamma", gamma)
    capacity = check_request(prompt_tokens, prompt_lengths, max_new_tokens, max_length)
    vocabularies = (target.config.vocab_size, draft.config.vocab_size)
    if vocabularies[0] != vocabularies[1]:
        raise ValueError(
            f"draft: its vocabulary ({vocabularies[1]} tokens) differs from the target's "
            f"({vocabularies[0]})"
        )
    _check_stateless(sampler, vocabularies[0])
    tokens, lengths, proposed, accepted = _speculative(
        target,
        target_params,
        draft,
        draft_params,
        jnp.asarray(prompt_tokens, jnp.int32),
        full_lengths(prompt_tokens, prompt_lengths),
        rng,
        sampler=sampler,
        gamma=gamma,
        max_new_tokens=max_new_tokens,
        # The verification call writes gamma tokens past the emitted ones.
        capacity=capacity + gamma + 1,
        stop_tokens=tuple(int(t) for t in stop_tokens),
        pad_token=pad_token,
    )
    return SpeculativeResult(tokens, lengths, proposed, accepted)
