"""The online-softmax combine: softmax attention as a monoid over sets of keys.

A set of scores `s_i` with values `v_i` is summarized, relative to a reference `m`, by

    m = max_i s_i,    u = sum_i exp(s_i - m),    w = sum_i exp(s_i - m) v_i,

and the softmax-weighted average over the set is `w / u`. Two disjoint sets merge by

    (m_A, u_A, w_A) + (m_B, u_B, w_B) = (m, u_A e^{m_A - m} + u_B e^{m_B - m},
                                           w_A e^{m_A - m} + w_B e^{m_B - m}),  m = max(m_A, m_B),

which is associative (Feng et al., "Attention as an RNN", eq. 4; Milakov & Gimelshein,
"Online normalizer calculation for softmax"). It is the step of Aaren's prefix scan, of the
key-block loop of blockwise (flash) attention, and of ring attention's merge across devices.
The empty set is `(-inf, 0, 0)`; merging two empty sets stays empty rather than producing
`nan`, so padded and fully masked blocks need no special case.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class SoftmaxPartial(NamedTuple):
    """A softmax-weighted sum over some keys: `max: [...]`, `denominator: [...]`,
    `numerator: [..., V]` (the `m`, `u`, `w` of the module docstring)."""

    max: jax.Array
    denominator: jax.Array
    numerator: jax.Array


def empty_partial(shape: tuple[int, ...], value_dim: int, dtype=jnp.float32) -> SoftmaxPartial:
    """The partial of no keys, `(-inf, 0, 0)`, for `[*shape]` queries."""
    return SoftmaxPartial(
        jnp.full(shape, -jnp.inf, dtype),
        jnp.zeros(shape, dtype),
        jnp.zeros((*shape, value_dim), dtype),
    )


def shift(old_max: jax.Array, new_max: jax.Array) -> jax.Array:
    """`exp(old_max - new_max)`, and 0 where both are `-inf` (an empty set stays empty)."""
    return jnp.exp(old_max - jnp.where(jnp.isneginf(new_max), 0.0, new_max))


def combine(a: SoftmaxPartial, b: SoftmaxPartial) -> SoftmaxPartial:
    """The merge of two partials over disjoint key sets (associative and commutative)."""
    m = jnp.maximum(a.max, b.max)
    wa, wb = shift(a.max, m), shift(b.max, m)
    return SoftmaxPartial(
        m,
        a.denominator * wa + b.denominator * wb,
        a.numerator * wa[..., None] + b.numerator * wb[..., None],
    )


def normalize(p: SoftmaxPartial) -> jax.Array:
    """The softmax-weighted average `w / u` `[..., V]`; 0 for a partial of no keys."""
    u = p.denominator[..., None]
    return jnp.where(u > 0, p.numerator / jnp.where(u > 0, u, 1.0), 0.0)
