"""Self-consistency (Wang et al. 2023, "Self-Consistency Improves Chain of Thought Reasoning in
Language Models"): sample `n` completions per prompt, extract each one's answer, and return the
answer most completions agree on.

The extractor is the user's: a host function from one completion (its token ids up to its
length) to a hashable answer, or None when the completion gives none; completions without an
answer do not vote. Ties go to the answer reached first in sample order.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Hashable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from seqjax.checks import check_positive
from seqjax.generate.engine import generate
from seqjax.generate.samplers import Sampler


class Vote(NamedTuple):
    """Per prompt: the majority `answer` (None if no completion gave one), its `votes`, and
    every completion's answer in sample order."""

    answer: Hashable | None
    votes: int
    answers: list[Hashable | None]


def self_consistency(
    model: nn.Module,
    params: Any,
    prompt_tokens: jax.Array,
    *,
    num_samples: int,
    extract_answer: Callable[[Sequence[int]], Hashable | None],
    max_new_tokens: int,
    sampler: Sampler,
    rng: jax.Array,
    prompt_lengths: jax.Array | None = None,
    **options: Any,
) -> list[Vote]:
    """`num_samples` completions of each prompt of `prompt_tokens: [B, P]` in one batch of
    `B * num_samples` rows (`seqjax.generate.engine.generate`, whose `options` it takes), and
    the majority vote over `extract_answer` of each; one `Vote` per prompt."""
    check_positive("num_samples", num_samples)
    batch = np.shape(prompt_tokens)[0]
    tokens = jnp.repeat(jnp.asarray(prompt_tokens), num_samples, axis=0)
    lengths = None if prompt_lengths is None else jnp.repeat(prompt_lengths, num_samples)
    out = generate(
        model,
        params,
        tokens,
        max_new_tokens=max_new_tokens,
        sampler=sampler,
        rng=rng,
        prompt_lengths=lengths,
        **options,
    )
    completions = np.asarray(out.tokens).reshape(batch, num_samples, -1)
    counts = np.asarray(out.lengths).reshape(batch, num_samples)
    votes = []
    for rows, row_lengths in zip(completions, counts, strict=True):
        answers = [
            extract_answer(row[:length].tolist())
            for row, length in zip(rows, row_lengths, strict=True)
        ]
        tally = Counter(answer for answer in answers if answer is not None)
        if not tally:
            votes.append(Vote(None, 0, answers))
            continue
        # Counter.most_common keeps first-seen order among equal counts.
        answer, count = tally.most_common(1)[0]
        votes.append(Vote(answer, count, answers))
    return votes
