"""Aaren (Feng et al., "Attention as an RNN"): softmax attention of one query over each prefix.

For each head, a query `q` that does not depend on the token (in the layer, a learned
parameter) attends over the growing prefix of keys and values:

    s_t = scale q . k_t,        o_t = sum_{i <= t} exp(s_i) v_i / sum_{i <= t} exp(s_i),

which is a prefix scan of the elements `(s_t, 1, v_t)` under the online-softmax combine of
`seqjax.scan.online_softmax` (the state is its `(max, denominator, numerator)` partial, O(1)
per head). `impl="reference"` folds the tokens in one at a time (the RNN view);
`"associative"` (what `"auto"` picks) runs `lax.associative_scan`, O(log T) steps deep.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax

from seqjax import checks
from seqjax.ops.common import scan_tokens
from seqjax.scan import segment_starts
from seqjax.scan.linear_recurrence import accumulation_dtype
from seqjax.scan.online_softmax import SoftmaxPartial, combine, empty_partial, normalize

AarenImpl = Literal["auto", "reference", "associative"]
AAREN_IMPLS: tuple[str, ...] = ("auto", "reference", "associative")


def _validate(q, k, v, initial_state, segment_ids, impl) -> None:
    dims = checks.Dims()
    dims.check("q", q, "B H K")
    dims.check("k", k, "B T H K")
    dims.check("v", v, "B T H V")
    for name, x in (("q", q), ("k", k), ("v", v)):
        checks.check_floating(name, x)
    if initial_state is not None:
        dims.check("initial_state.max", initial_state.max, "B H")
        dims.check("initial_state.denominator", initial_state.denominator, "B H")
        dims.check("initial_state.numerator", initial_state.numerator, "B H V")
    checks.check_segment_ids(segment_ids, *k.shape[:2])
    checks.check_choice("impl", impl, AAREN_IMPLS)


def _elements(q, k, v, scale) -> SoftmaxPartial:
    """Each token's partial `(s_t, 1, v_t)`: `[B, T, H]`, `[B, T, H]`, `[B, T, H, V]`."""
    acc = accumulation_dtype(q.dtype, k.dtype, v.dtype)
    s = jnp.einsum("bhk,bthk->bth", q, k, preferred_element_type=acc) * scale
    return SoftmaxPartial(s, jnp.ones_like(s), v.astype(acc))


def _select(start: jax.Array, new: SoftmaxPartial, old: SoftmaxPartial) -> SoftmaxPartial:
    """`new` where `start` (a prefix of the partial's shape) is True, else `old`."""

    def pick(n, o):
        return jnp.where(start.reshape(start.shape + (1,) * (o.ndim - start.ndim)), n, o)

    return jax.tree.map(pick, new, old)


def _reference(elements, initial_state, segment_ids):
    batch, _, heads = elements.max.shape
    empty = empty_partial((batch, heads), elements.numerator.shape[-1], elements.max.dtype)

    def step(state, xs):
        start, element = xs
        state = combine(_select(start, empty, state), element)
        return state, normalize(state)

    o, final = scan_tokens(step, initial_state, elements, segment_ids)
    return o, final


def _associative(elements, initial_state, segment_ids):
    batch, length = elements.max.shape[:2]
    # The initial state enters through the first token (which never opens a segment).
    first = combine(initial_state, jax.tree.map(lambda x: x[:, 0], elements))
    elements = jax.tree.map(lambda x, f: x.at[:, 0].set(f), elements, first)
    starts = (
        jnp.zeros((batch, length), bool) if segment_ids is None else segment_starts(segment_ids)
    )

    def merge(a, b):
        # A segmented scan: a span that opens a segment discards everything before it.
        (start_a, pa), (start_b, pb) = a, b
        return start_a | start_b, _select(start_b, pb, combine(pa, pb))

    starts_h = jnp.broadcast_to(starts[..., None], elements.max.shape)
    _, prefixes = lax.associative_scan(merge, (starts_h, elements), axis=1)
    final = jax.tree.map(lambda x: x[:, -1], prefixes)
    return normalize(prefixes), final


def aaren(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    scale: float | None = None,
    initial_state: SoftmaxPartial | None = None,
    segment_ids: jax.Array | None = None,
    impl: AarenImpl = "auto",
) -> tuple[jax.Array, SoftmaxPartial]:
    """Attention of the query `q: [B, H, K]` over each prefix of `k: [B, T, H, K]`,
    `v: [B, T, H, V]`; returns `(o [B, T, H, V], state)`.

    The state is the `SoftmaxPartial` of the keys seen, `[B, H]`, `[B, H]`, `[B, H, V]`,
    float32 (float64 for float64 inputs); `initial_state=None` means no keys
    (`empty_partial`). `scale=None` means `K ** -0.5`. A new segment forgets the keys before
    it.
    """
    _validate(q, k, v, initial_state, segment_ids, impl)
    batch, _, heads, key_dim = k.shape
    scale = key_dim**-0.5 if scale is None else scale
    elements = _elements(q, k, v, scale)
    acc = elements.max.dtype
    if initial_state is None:
        initial_state = empty_partial((batch, heads), v.shape[-1], acc)
    initial_state = jax.tree.map(lambda x: x.astype(acc), initial_state)
    if impl == "reference":
        o, final = _reference(elements, initial_state, segment_ids)
    else:
        o, final = _associative(elements, initial_state, segment_ids)
    return o.astype(v.dtype), final


def aaren_step(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    state: SoftmaxPartial | None,
    *,
    scale: float | None = None,
) -> tuple[jax.Array, SoftmaxPartial]:
    """One token: `q, k: [B, H, K]`, `v: [B, H, V]`; returns `(o [B, H, V], state)`."""
    dims = checks.Dims()
    dims.check("q", q, "B H K")
    dims.check("k", k, "B H K")
    dims.check("v", v, "B H V")
    scale = k.shape[-1] ** -0.5 if scale is None else scale
    element = jax.tree.map(lambda x: x[:, 0], _elements(q, k[:, None], v[:, None], scale))
    if state is None:
        state = empty_partial(k.shape[:2], v.shape[-1], element.max.dtype)
    state = combine(state, element)
    return normalize(state).astype(v.dtype), state
