"""Sliding-window softmax attention plus linear attention before the window (LoLCATs, Based).

For each head, query i, a window of `W` tokens and a window factor `gamma`:

    s_ij   = scale q_i . k_j
    win(i) = {j : i - W < j <= i},        far(i) = {j : j <= i - W}        (same segment)
    m_i    = max_{j in win(i)} s_ij
    y_i    = ( sum_{win(i)} gamma exp(s_ij - m_i) v_j + sum_{far(i)} phi(q_i).phi(k_j) v_j )
           / ( sum_{win(i)} gamma exp(s_ij - m_i)     + sum_{far(i)} phi(q_i).phi(k_j)     )

One normalizer is shared by both kinds of terms (Zhang et al., "LoLCATs", the layer of
`linear_window_attention_tk.py`; `gamma` is the sigmoid of the layer's window factor). As in
that code the softmax terms are shifted by their own maximum `m_i` and the linear terms are
not, so the mixture depends on `m_i`: this is the function the authors train, not a
shift-invariant one. LoLCATs' code windows by "terraced" 64-token blocks (a query sees the whole
previous block and its own block causally) for its kernel's sake; here the window slides by
token, as the equations say.

Impls: `"reference"` runs `sliding_window_hybrid_attention_step` token by token (the state: a
ring buffer of the window's keys, values and key features, plus the linear state
`S = sum phi(k_j) v_j^T`, `z = sum phi(k_j)` of the tokens that left it). `"chunked"` (what
`"auto"` picks) computes the window terms block-banded, memory O(T W), and the linear terms
with `linear_attention` over keys delayed by `W` tokens, memory O(T).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp

from seqjax import checks
from seqjax.ops.attention import ring_write
from seqjax.ops.common import scan_tokens, take_rows
from seqjax.ops.gla import linear_attention
from seqjax.scan import segment_index
from seqjax.scan.linear_recurrence import accumulation_dtype

HybridImpl = Literal["auto", "reference", "chunked"]
HYBRID_IMPLS: tuple[str, ...] = ("auto", "reference", "chunked")
DEFAULT_CHUNK_SIZE = 64


class HybridAttentionState(NamedTuple):
    """The window as a ring buffer of `W` slots (`k: [B, W, H, K]`, `v: [B, W, H, V]`,
    `phi_k: [B, W, H, F]`, `positions: [B, W]` int32 with -1 for empty, `length: [B]` int32
    tokens seen) and the float32 linear state of the tokens before it (`S: [B, H, F, V]`,
    `z: [B, H, F]`)."""

    k: jax.Array
    v: jax.Array
    phi_k: jax.Array
    positions: jax.Array
    length: jax.Array
    S: jax.Array
    z: jax.Array


def init_hybrid_state(
    batch: int,
    window: int,
    heads: int,
    key_dim: int,
    value_dim: int,
    feature_dim: int,
    dtype=jnp.float32,
) -> HybridAttentionState:
    """The state before any token: an empty window and zero linear state."""
    for name, value in (("batch", batch), ("window", window), ("heads", heads)):
        checks.check_positive(name, value)
    return HybridAttentionState(
        jnp.zeros((batch, window, heads, key_dim), dtype),
        jnp.zeros((batch, window, heads, value_dim), dtype),
        jnp.zeros((batch, window, heads, feature_dim), dtype),
        jnp.full((batch, window), -1, jnp.int32),
        jnp.zeros((batch,), jnp.int32),
        jnp.zeros((batch, heads, feature_dim, value_dim), jnp.float32),
        jnp.zeros((batch, heads, feature_dim), jnp.float32),
    )


def _factor(window_factor, heads: int, dtype) -> jax.Array:
    """`gamma` as `[H]`."""
    return jnp.broadcast_to(jnp.asarray(window_factor, dtype), (heads,))


def _check_state(dims: checks.Dims, state: HybridAttentionState, name: str) -> None:
    dims.check(f"{name}.k", state.k, "B W H K")
    dims.check(f"{name}.v", state.v, "B W H V")
    dims.check(f"{name}.phi_k", state.phi_k, "B W H F")
    dims.check(f"{name}.positions", state.positions, "B W")
    dims.check(f"{name}.length", state.length, "B")
    dims.check(f"{name}.S", state.S, "B H F V")
    dims.check(f"{name}.z", state.z, "B H F")


def _check_factor(window_factor, heads: int) -> None:
    shape = jnp.shape(window_factor)
    if shape not in ((), (1,), (heads,)):
        raise ValueError(f"window_factor: expected a scalar or shape [H] = [{heads}], got {shape}")


# ----------------------------------------------------------------------------- step


def sliding_window_hybrid_attention_step(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    phi_q: jax.Array,
    phi_k: jax.Array,
    state: HybridAttentionState,
    *,
    window_factor: jax.Array | float,
    scale: float | None = None,
) -> tuple[jax.Array, HybridAttentionState]:
    """One token (`q, k: [B, H, K]`, `v: [B, H, V]`, `phi_q, phi_k: [B, H, F]`); the window is
    the state's ring size. The token in the slot about to be written is the one leaving the
    window: it moves into the linear state first. Returns `(y [B, H, V], state)`."""
    dims = checks.Dims()
    for name, x, layout in (
        ("q", q, "B H K"),
        ("k", k, "B H K"),
        ("v", v, "B H V"),
        ("phi_q", phi_q, "B H F"),
        ("phi_k", phi_k, "B H F"),
    ):
        dims.check(name, x, layout)
        checks.check_floating(name, x)
    _check_state(dims, state, "state")
    _check_factor(window_factor, q.shape[1])
    window = state.k.shape[1]
    acc = accumulation_dtype(q.dtype, k.dtype, v.dtype, phi_q.dtype, phi_k.dtype)
    scale = q.shape[-1] ** -0.5 if scale is None else scale

    slot = jnp.mod(state.length, window)
    leaving = (take_rows(state.positions, slot) >= 0).astype(acc)[:, None, None]
    old_phi = take_rows(state.phi_k, slot).astype(acc) * leaving
    S = state.S + old_phi[..., :, None] * take_rows(state.v, slot).astype(acc)[..., None, :]
    z = state.z + old_phi
    (ring_k, ring_v, ring_phi), positions, length = ring_write(
        (state.k, state.v, state.phi_k),
        state.positions,
        state.length,
        (k[:, None], v[:, None], phi_k[:, None]),
        None,
    )
    s = jnp.einsum("bhk,bwhk->bhw", q, ring_k, preferred_element_type=acc) * scale
    visible = (positions >= 0)[:, None, :]
    m = jnp.max(jnp.where(visible, s, -jnp.inf), axis=-1, keepdims=True)
    gamma = _factor(window_factor, q.shape[1], acc)[None, :, None]
    a = jnp.where(visible, gamma * jnp.exp(s - m), 0.0)
    phi_q = phi_q.astype(acc)
    numerator = jnp.einsum("bhw,bwhv->bhv", a, ring_v.astype(acc)) + jnp.einsum(
        "bhf,bhfv->bhv", phi_q, S
    )
    denominator = jnp.sum(a, axis=-1) + jnp.einsum("bhf,bhf->bh", phi_q, z)
    y = _divide(numerator, denominator)
    return y.astype(v.dtype), HybridAttentionState(
        ring_k, ring_v, ring_phi, positions, length, S, z
    )


def _divide(numerator: jax.Array, denominator: jax.Array) -> jax.Array:
    """`numerator / denominator[..., None]`, 0 where nothing was attended to."""
    d = denominator[..., None]
    return jnp.where(d != 0, numerator / jnp.where(d != 0, d, 1.0), 0.0)


# ----------------------------------------------------------------------------- parallel


def _reference(q, k, v, phi_q, phi_k, window_factor, scale, state, segment_ids):
    fresh = init_hybrid_state(
        q.shape[0], state.k.shape[1], *k.shape[2:], v.shape[-1], phi_k.shape[-1], state.k.dtype
    )

    def step(state, xs):
        start, (q_t, k_t, v_t, phi_q_t, phi_k_t) = xs
        # A new segment forgets the window and the linear state; positions keep counting.
        restart = fresh._replace(length=state.length)
        state = jax.tree.map(
            lambda new, old: jnp.where(start.reshape(-1, *[1] * (old.ndim - 1)), new, old),
            restart,
            state,
        )
        y, state = sliding_window_hybrid_attention_step(
            q_t, k_t, v_t, phi_q_t, phi_k_t, state, window_factor=window_factor, scale=scale
        )
        return state, y

    return scan_tokens(step, state, (q, k, v, phi_q, phi_k), segment_ids)


def _window_terms(q, k, v, valid, segments, window, window_factor, scale, block, acc):
    """The softmax terms `(sum a_ij v_j [B, N, H, V], sum a_ij [B, N, H])` over keys banded
    by blocks: query block n sees key blocks n - P .. n, `P = ceil((W - 1) / block)`."""
    batch, length, heads, _ = q.shape
    back = -(-(window - 1) // block)
    num_blocks = -(-length // block)
    padded = num_blocks * block

    def band(x, fill=0):
        # [B, N, ...] -> [B, n, (P + 1) block, ...]: each query block's keys, oldest first.
        pad = ((0, 0), (back * block, padded - length)) + ((0, 0),) * (x.ndim - 2)
        x = jnp.pad(x, pad, constant_values=fill)
        x = x.reshape(x.shape[0], num_blocks + back, block, *x.shape[2:])
        return jnp.concatenate([x[:, p : p + num_blocks] for p in range(back + 1)], axis=2)

    index = jnp.arange(length)
    q_index = jnp.pad(index, (0, padded - length)).reshape(num_blocks, block)
    k_index = band(index[None], -padded)[0]
    qb = jnp.pad(q, ((0, 0), (0, padded - length), (0, 0), (0, 0)))
    qb = qb.reshape(batch, num_blocks, block, *q.shape[2:])
    q_segments = jnp.pad(segments, ((0, 0), (0, padded - length))).reshape(qb.shape[:3])
    s = jnp.einsum("bnchk,bndhk->bhncd", qb, band(k), preferred_element_type=acc) * scale
    visible = (
        band(valid, False)[:, :, None]
        & (q_segments[..., None] == band(segments)[:, :, None])
        & (k_index[None, :, None] <= q_index[None, :, :, None])
        & (k_index[None, :, None] > q_index[None, :, :, None] - window)
    )[:, None]
    m = jnp.max(jnp.where(visible, s, -jnp.inf), axis=-1, keepdims=True)
    gamma = _factor(window_factor, heads, acc)[None, :, None, None, None]
    a = jnp.where(visible, gamma * jnp.exp(s - jnp.where(jnp.isneginf(m), 0.0, m)), 0.0)
    numerator = jnp.einsum("bhncd,bndhv->bnchv", a, band(v).astype(acc))
    denominator = jnp.moveaxis(jnp.sum(a, axis=-1), 1, -1)
    numerator = numerator.reshape(batch, padded, heads, -1)[:, :length]
    return numerator, denominator.reshape(batch, padded, heads)[:, :length]


def _far_terms(phi_q, phi_k, v, valid, segments, window, S, z, chunk_size, acc):
    """The linear terms `(sum b_ij v_j, sum b_ij)` and the final `(S, z)`: linear attention
    over keys delayed by `W` tokens, its value augmented with a column of ones (the
    normalizer). A delayed key that lands in a later segment than its own is zeroed."""
    length = phi_k.shape[1]  # > window: the window's slots come first

    def delayed(x):
        return jnp.pad(x, ((0, 0), (window, 0)) + ((0, 0),) * (x.ndim - 2))[:, :length]

    keep = (delayed(valid) & (delayed(segments) == segments))[..., None, None]
    ones = jnp.ones((*v.shape[:-1], 1), acc)
    values = jnp.concatenate([v.astype(acc), ones], axis=-1) * valid[..., None, None]
    keys = jnp.where(keep, delayed(phi_k.astype(acc)), 0.0)
    out, state = linear_attention(
        phi_q.astype(acc),
        keys,
        delayed(values),
        scale=1.0,
        initial_state=jnp.concatenate([S, z[..., None]], axis=-1),
        segment_ids=segments,
        impl="chunked",
        chunk_size=chunk_size,
    )
    return out[..., :-1], out[..., -1], state[..., :-1], state[..., -1]


def _chunked(q, k, v, phi_q, phi_k, window_factor, scale, state, segment_ids, chunk_size):
    """Runs on the window's tokens from `state` (oldest first) followed by the new ones, so
    the first new queries see them in both kinds of terms; outputs of the new tokens only."""
    batch, length = q.shape[:2]
    window = state.k.shape[1]
    acc = accumulation_dtype(q.dtype, k.dtype, v.dtype, phi_q.dtype, phi_k.dtype)
    segments = (
        jnp.zeros((batch, length), jnp.int32) if segment_ids is None else segment_index(segment_ids)
    )
    # Empty slots (-1) sort first: the window's tokens then sit at positions length - W + e.
    order = jnp.argsort(state.positions, axis=1)
    ring = [take_rows(x, order).astype(acc) for x in (state.k, state.v, state.phi_k)]
    ring_q = jnp.zeros((batch, window, *q.shape[2:]), acc)
    ring_phi_q = jnp.zeros((batch, window, *phi_q.shape[2:]), acc)
    q_all, k_all, v_all, phi_q_all, phi_k_all = (
        jnp.concatenate([old, new.astype(acc)], axis=1)
        for old, new in zip(
            (ring_q, *ring[:2], ring_phi_q, ring[2]), (q, k, v, phi_q, phi_k), strict=True
        )
    )
    valid = jnp.concatenate(
        [take_rows(state.positions, order) >= 0, jnp.ones_like(segments, bool)], 1
    )
    segments = jnp.concatenate([jnp.broadcast_to(segments[:, :1], (batch, window)), segments], 1)
    num_w, den_w = _window_terms(
        q_all, k_all, v_all, valid, segments, window, window_factor, scale, chunk_size, acc
    )
    num_l, den_l, S, z = _far_terms(
        phi_q_all, phi_k_all, v_all, valid, segments, window, state.S, state.z, chunk_size, acc
    )
    y = _divide(num_w + num_l, den_w + den_l)[:, window:]
    (ring_k, ring_v, ring_phi), positions, end = ring_write(
        (state.k, state.v, state.phi_k), state.positions, state.length, (k, v, phi_k), segment_ids
    )
    return y, HybridAttentionState(ring_k, ring_v, ring_phi, positions, end, S, z)


def sliding_window_hybrid_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    phi_q: jax.Array,
    phi_k: jax.Array,
    window: int,
    window_factor: jax.Array | float,
    *,
    scale: float | None = None,
    initial_state: HybridAttentionState | None = None,
    segment_ids: jax.Array | None = None,
    impl: HybridImpl = "auto",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[jax.Array, HybridAttentionState]:
    """Softmax attention over the last `window` tokens, linear attention before them.

    Args:
      q, k: `[B, T, H, K]` (softmax side); v: `[B, T, H, V]`.
      phi_q, phi_k: `[B, T, H, F]`, the feature maps of q and k (`seqjax.ops.feature_maps`).
      window: tokens a query sees by softmax, itself included.
      window_factor: `gamma > 0`, scalar or `[H]`, weighing the softmax terms.
      scale: on the softmax scores; None means `K ** -0.5`. The linear terms are unscaled.
      initial_state: a `HybridAttentionState` whose ring has `window` slots; None: empty.
      segment_ids: `[B, T]` int; a new segment forgets the window and the linear state.
      impl: `"reference"`, `"chunked"` or `"auto"` (`"chunked"`).
      chunk_size: block length of the banded window terms and of the linear attention.

    Returns:
      `y: [B, T, H, V]` in `v`'s dtype and the state after each row's last token.
    """
    dims = checks.Dims()
    for name, x, layout in (
        ("q", q, "B T H K"),
        ("k", k, "B T H K"),
        ("v", v, "B T H V"),
        ("phi_q", phi_q, "B T H F"),
        ("phi_k", phi_k, "B T H F"),
    ):
        dims.check(name, x, layout)
        checks.check_floating(name, x)
    checks.check_positive("window", window)
    _check_factor(window_factor, q.shape[2])
    checks.check_values("window_factor", jnp.asarray(window_factor) > 0, "window_factor > 0")
    checks.check_segment_ids(segment_ids, *q.shape[:2])
    checks.check_choice("impl", impl, HYBRID_IMPLS)
    checks.check_positive("chunk_size", chunk_size)
    batch, _, heads, key_dim = q.shape
    if initial_state is None:
        initial_state = init_hybrid_state(
            batch, window, heads, key_dim, v.shape[-1], phi_k.shape[-1], k.dtype
        )
    _check_state(
        checks.Dims(**{n: dims.sizes[n] for n in "BHKVF"}, W=window), initial_state, "initial_state"
    )
    scale = key_dim**-0.5 if scale is None else scale
    if impl == "reference":
        y, final = _reference(
            q, k, v, phi_q, phi_k, window_factor, scale, initial_state, segment_ids
        )
    else:
        y, final = _chunked(
            q, k, v, phi_q, phi_k, window_factor, scale, initial_state, segment_ids, chunk_size
        )
    return y.astype(v.dtype), final
