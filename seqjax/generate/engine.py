"""The decoding engine: prefill a batch of prompts with the parallel form, then decode token by
token inside one jitted `lax.while_loop`.

Prompts come right-padded, `prompt_tokens: [B, P]` with `prompt_lengths: [B]` real tokens per
row. The engine right-aligns them (row b's prompt occupies the last `prompt_lengths[b]`
columns) and gives the padding segment 0 and the prompt segment 1: every mixer restarts its
state at a segment start and its cache keeps only the last segment (recurrent states, short
convolution tails, attention caches, whose earlier-segment slots are emptied), and positions
restart there too, so padding never enters the state and every row's next token is read at
the same column, `P - 1`.

The prefill is one call of the model on the whole prompt from an empty cache of capacity
`max_length` (what a full-attention layer's KV cache holds; recurrent layers' states do not
grow); it returns the cache. Each decode step feeds the last token with that cache. A row that
emits one of `stop_tokens` is done: its later tokens are `pad_token` with log-probability 0,
and the loop ends when every row is done or `max_new_tokens` are out.

`log_probs` are the model's own log-probabilities of the emitted tokens (log-softmax of the
logits before any processor), the quantity that scores a sequence.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from seqjax.generate.samplers import Sampler


class Generation(NamedTuple):
    """`tokens: [B, N]` int32 (`pad_token` after a row's stop token), `log_probs: [B, N]`
    float32 (the model's, 0 after the stop), `lengths: [B]` int32 (tokens emitted, the stop
    token included)."""

    tokens: jax.Array
    log_probs: jax.Array
    lengths: jax.Array


class DecodeState(NamedTuple):
    """What one decode step carries: the number of tokens emitted `step`, the next token's
    logits `[B, V]`, the model's cache, the sampler's state, the key, the outputs so far
    (`[B, N]` each), and per row `done` and `lengths`."""

    step: jax.Array
    logits: jax.Array
    cache: Any
    sampler_state: Any
    rng: jax.Array
    tokens: jax.Array
    log_probs: jax.Array
    done: jax.Array
    lengths: jax.Array


def right_align(prompt_tokens: jax.Array, prompt_lengths: jax.Array) -> tuple[jax.Array, ...]:
    """`(tokens, segment_ids, mask)`, each `[B, P]`: right-padded prompts moved to the end of
    their rows, the padding (now in front) in segment 0 and masked out, the prompt in
    segment 1."""
    length = prompt_tokens.shape[1]
    shift = length - prompt_lengths[:, None]
    column = jnp.arange(length, dtype=jnp.int32)[None]
    mask = column >= shift
    source = jnp.clip(column - shift, 0, length - 1)
    tokens = jnp.where(mask, jnp.take_along_axis(prompt_tokens, source, axis=1), 0)
    return tokens, mask.astype(jnp.int32), mask


def check_request(
    prompt_tokens: Any, prompt_lengths: Any, max_new_tokens: int, max_length: int | None
) -> int:
    """Validates a request on the host, naming the argument; returns the cache capacity."""
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens: expected an int >= 0, got {max_new_tokens!r}")
    shape = np.shape(prompt_tokens)
    if len(shape) != 2 or shape[1] < 1:
        raise ValueError(f"prompt_tokens: expected shape [B, P] with P >= 1, got {shape}")
    if not jnp.issubdtype(jnp.asarray(prompt_tokens).dtype, jnp.integer):
        raise ValueError("prompt_tokens: expected integer token ids")
    if prompt_lengths is not None:
        if np.shape(prompt_lengths) != shape[:1]:
            raise ValueError(
                f"prompt_lengths: expected shape [B] = [{shape[0]}] (one length per prompt row), "
                f"got {np.shape(prompt_lengths)}"
            )
        if not isinstance(prompt_lengths, jax.core.Tracer):
            lengths = np.asarray(prompt_lengths)
            if np.any(lengths < 1) or np.any(lengths > shape[1]):
                raise ValueError(
                    f"prompt_lengths: expected values in [1, P = {shape[1]}], got {lengths}"
                )
    needed = shape[1] + max_new_tokens
    if max_length is None:
        return needed
    if needed > max_length:
        raise ValueError(
            f"max_length: the prompt ({shape[1]} tokens) and max_new_tokens ({max_new_tokens}) "
            f"need {needed} positions, more than max_length = {max_length}, the context the "
            f"attention caches hold"
        )
    return max_length


def full_lengths(prompt_tokens: jax.Array, prompt_lengths: jax.Array | None) -> jax.Array:
    """`[B]` int32 prompt lengths: `prompt_lengths`, or every row's P when None."""
    if prompt_lengths is None:
        return jnp.full(np.shape(prompt_tokens)[:1], np.shape(prompt_tokens)[1], jnp.int32)
    return jnp.asarray(prompt_lengths, jnp.int32)


def _model_log_prob(logits: jax.Array, token: jax.Array) -> jax.Array:
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    return jnp.take_along_axis(log_probs, token[:, None], axis=-1)[:, 0]


@functools.partial(
    jax.jit, static_argnames=("model", "sampler", "max_new_tokens", "capacity", "cache_dtype")
)
def prefill(
    model: nn.Module,
    params: Any,
    prompt_tokens: jax.Array,
    prompt_lengths: jax.Array,
    rng: jax.Array,
    *,
    sampler: Sampler,
    max_new_tokens: int,
    capacity: int,
    cache_dtype: Any = jnp.float32,
) -> DecodeState:
    """The state before the first new token: the prompts right-aligned and run through the
    model in one parallel call from an empty cache of `capacity` tokens."""
    batch = prompt_tokens.shape[0]
    tokens, segment_ids, mask = right_align(prompt_tokens, prompt_lengths)
    cache = model.init_cache(batch, capacity, cache_dtype)
    logits, cache = model.apply({"params": params}, tokens, segment_ids=segment_ids, cache=cache)
    vocab_size = logits.shape[-1]
    return DecodeState(
        step=jnp.zeros((), jnp.int32),
        logits=logits[:, -1],
        cache=cache,
        sampler_state=sampler.init(tokens, mask, vocab_size),
        rng=rng,
        tokens=jnp.zeros((batch, max_new_tokens), jnp.int32),
        log_probs=jnp.zeros((batch, max_new_tokens), jnp.float32),
        done=jnp.zeros((batch,), bool),
        lengths=jnp.zeros((batch,), jnp.int32),
    )


def decode_step(
    model: nn.Module,
    params: Any,
    state: DecodeState,
    *,
    sampler: Sampler,
    stop_tokens: tuple[int, ...],
    pad_token: int,
) -> DecodeState:
    """Emits one token per row (from `state.logits`) and, unless it was the last one, runs
    the model on it for the next logits."""
    rng, key = jax.random.split(state.rng)
    token, sampler_state = sampler.sample(state.logits, state.sampler_state, key)
    log_prob = _model_log_prob(state.logits, token)
    token = jnp.where(state.done, pad_token, token)
    log_prob = jnp.where(state.done, 0.0, log_prob)
    lengths = state.lengths + (~state.done).astype(jnp.int32)
    done = state.done | jnp.isin(token, jnp.asarray(stop_tokens, jnp.int32))
    tokens = state.tokens.at[:, state.step].set(token)
    log_probs = state.log_probs.at[:, state.step].set(log_prob)
    step = state.step + 1

    def advance(cache):
        logits, cache = model.apply({"params": params}, token[:, None], cache=cache)
        return logits[:, -1], cache

    def stay(cache):
        return state.logits, cache

    more = (step < tokens.shape[1]) & ~jnp.all(done)
    logits, cache = jax.lax.cond(more, advance, stay, state.cache)
    return DecodeState(step, logits, cache, sampler_state, rng, tokens, log_probs, done, lengths)


def _more(state: DecodeState) -> jax.Array:
    return (state.step < state.tokens.shape[1]) & ~jnp.all(state.done)


@functools.partial(jax.jit, static_argnames=("model", "sampler", "stop_tokens", "pad_token"))
def decode(
    model: nn.Module,
    params: Any,
    state: DecodeState,
    *,
    sampler: Sampler,
    stop_tokens: tuple[int, ...],
    pad_token: int,
) -> DecodeState:
    """Decode steps in one `lax.while_loop` until every row is done or the outputs are full."""
    step = functools.partial(
        decode_step, model, params, sampler=sampler, stop_tokens=stop_tokens, pad_token=pad_token
    )
    return jax.lax.while_loop(_more, step, state)


_jitted_step = jax.jit(
    decode_step, static_argnames=("model", "sampler", "stop_tokens", "pad_token")
)


def _start(
    model,
    params,
    prompt_tokens,
    prompt_lengths,
    rng,
    sampler,
    max_new_tokens,
    stop_tokens,
    max_length,
    cache_dtype,
) -> tuple[DecodeState, tuple[int, ...]]:
    capacity = check_request(prompt_tokens, prompt_lengths, max_new_tokens, max_length)
    stop_tokens = tuple(int(t) for t in stop_tokens)
    state = prefill(
        model,
        params,
        jnp.asarray(prompt_tokens, jnp.int32),
        full_lengths(prompt_tokens, prompt_lengths),
        rng,
        sampler=sampler,
        max_new_tokens=max_new_tokens,
        capacity=capacity,
        cache_dtype=cache_dtype,
    )
    return state, stop_tokens


def generate(
    model: nn.Module,
    params: Any,
    prompt_tokens: jax.Array,
    *,
    max_new_tokens: int,
    sampler: Sampler,
    rng: jax.Array,
    stop_tokens: tuple[int, ...] = (),
    prompt_lengths: jax.Array | None = None,
    max_length: int | None = None,
    pad_token: int = 0,
    cache_dtype: Any = jnp.float32,
) -> Generation:
    """Generates up to `max_new_tokens` tokens after each prompt.

    Args:
      model: a `LanguageModel` (any mixers); params: its parameters (`variables["params"]`).
      prompt_tokens: `[B, P]` int, right-padded when `prompt_lengths` is given.
      max_new_tokens: tokens to emit per row (>= 0).
      sampler: `seqjax.generate.samplers.Sampler` (processors, then greedy or categorical).
      rng: a `jax.random` key.
      stop_tokens: ids that end a row (emitted, then padding).
      prompt_lengths: `[B]` real tokens per row, in [1, P]; None means P.
      max_length: the context attention caches hold (default `P + max_new_tokens`); a
        request that needs more fails.
      pad_token: what fills a row after its stop token.
      cache_dtype: dtype of the attention caches and convolution tails.

    Returns:
      `Generation(tokens [B, N], log_probs [B, N], lengths [B])`, N = max_new_tokens.
    """
    state, stop_tokens = _start(
        model,
        params,
        prompt_tokens,
        prompt_lengths,
        rng,
        sampler,
        max_new_tokens,
        stop_tokens,
        max_length,
        cache_dtype,
    )
    state = decode(
        model, params, state, sampler=sampler, stop_tokens=stop_tokens, pad_token=pad_token
    )
    return Generation(state.tokens, state.log_probs, state.lengths)


def stream(
    model: nn.Module,
    params: Any,
    prompt_tokens: jax.Array,
    *,
    max_new_tokens: int,
    sampler: Sampler,
    rng: jax.Array,
    stop_tokens: tuple[int, ...] = (),
    prompt_lengths: jax.Array | None = None,
    max_length: int | None = None,
    pad_token: int = 0,
    cache_dtype: Any = jnp.float32,
) -> Iterator[jax.Array]:
    """`generate`, one step at a time: yields each step's tokens `[B]` (`pad_token` for rows
    already done) as they are produced, for a notebook or a terminal. The same jitted
    prefill and step as `generate` (compiled once), with a host round trip per token; the
    tokens equal `generate`'s for the same arguments."""
    state, stop_tokens = _start(
        model,
        params,
        prompt_tokens,
        prompt_lengths,
        rng,
        sampler,
        max_new_tokens,
        stop_tokens,
        max_length,
        cache_dtype,
    )
    while bool(_more(state)):
        state = _jitted_step(
            model, params, state, sampler=sampler, stop_tokens=stop_tokens, pad_token=pad_token
        )
        yield state.tokens[:, state.step - 1]
