"""Prefix linear attention: JRT-RNN (Arora et al., "Just Read Twice", 2024).

The first `prefix_len` tokens of a sequence are an encoder region with their own keys and
values `k_enc, v_enc`, read non-causally: every token, inside the prefix or after it, sees the
whole prefix, plus its own causal history of decoder keys and values (feature maps, such as
Based's Taylor map, already applied):

    S_enc = sum_{j < M} k_enc_j v_enc_j^T,          z_enc = sum_{j < M} k_enc_j
    y_i   = q_i^T (S_enc + sum_{j <= i} k_j v_j^T) / (q_i . (z_enc + sum_{j <= i} k_j) + eps)

with `M = prefix_len`, `q` scaled by `scale` and `eps = 1e-10` (the normalizer of
`linear_attention(normalize=True)`). Decoding continues from `S_enc + S_dec`: the state is a
`LinearAttentionState(S, z)`, and `linear_attention_step(..., normalize=True)` advances it.

With `segment_ids`, every segment is a sequence of its own: its first `prefix_len` tokens are
its prefix. `initial_state` is added to the first segment's decoder state.

The fast impls are three calls of the linear-attention engine on value columns extended by a
column of ones (whose output is the normalizer): the decoder's causal part; the encoder keys
(zero outside the prefix) read causally; and, for tokens inside the prefix, the encoder keys
after them, read by the same engine backwards in time.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from seqjax import checks
from seqjax.ops import chunked_linear_attention as engine
from seqjax.ops.common import reset, scan_tokens, token_starts
from seqjax.ops.gla import (
    GLA_IMPLS,
    GLAImpl,
    LinearAttentionState,
    linear_attention,
    normalized_output,
)
from seqjax.scan.linear_recurrence import accumulation_dtype

DEFAULT_CHUNK_SIZE = 64


def positions_in_segment(segment_ids: jax.Array | None, batch: int, length: int) -> jax.Array:
    """`[B, T]` int32: each token's position counted from the start of its segment."""
    t = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    starts = token_starts(segment_ids, batch, length)
    return t - jax.lax.cummax(jnp.where(starts, t, 0), axis=1)


def prefix_linear_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    k_enc: jax.Array,
    v_enc: jax.Array,
    prefix_len: int | jax.Array,
    *,
    scale: float | None = None,
    initial_state: LinearAttentionState | None = None,
    segment_ids: jax.Array | None = None,
    impl: GLAImpl = "auto",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[jax.Array, LinearAttentionState]:
    """JRT-RNN's prefix linear attention (module docstring).

    Args:
      q, k, k_enc: `[B, T, H, K]`, feature-mapped; v, v_enc: `[B, T, H, V]`. Only the first
        `prefix_len` positions (of each segment) of `k_enc` and `v_enc` are read.
      prefix_len: the prefix length M, an int or `[B]` ints (one per row), `0 <= M`.
      scale: multiplies `q`; None means `K ** -0.5` (it cancels but for `eps`).
      initial_state: a `LinearAttentionState` `(S [B, H, K, V], z [B, H, K])`; None: zeros.
      segment_ids: `[B, T]` ints; each segment is its own sequence with its own prefix.
      impl: `"reference"`, or an impl of `linear_attention` (`"chunked"`, `"parallel"`,
        `"pallas"`, `"auto"`) for its three passes.
      chunk_size: tokens per chunk of `"chunked"`.

    Returns:
      `y: [B, T, H, V]` in the dtype of `v`, and the state after each row's last token,
      `S_enc + S_dec` of its last segment.
    """
    dims = checks.Dims()
    for name, x, layout in (
        ("q", q, "B T H K"),
        ("k", k, "B T H K"),
        ("v", v, "B T H V"),
        ("k_enc", k_enc, "B T H K"),
        ("v_enc", v_enc, "B T H V"),
    ):
        dims.check(name, x, layout)
        checks.check_floating(name, x)
    batch, length = q.shape[:2]
    prefix_len = jnp.asarray(prefix_len)
    if prefix_len.ndim == 0:
        prefix_len = jnp.broadcast_to(prefix_len, (batch,))
    dims.check("prefix_len", prefix_len, "B")
    if not jnp.issubdtype(prefix_len.dtype, jnp.integer):
        raise TypeError(f"prefix_len: expected an int or integer [B] array, got {prefix_len.dtype}")
    checks.check_values("prefix_len", prefix_len >= 0, "prefix_len >= 0")
    if initial_state is not None:
        if not isinstance(initial_state, LinearAttentionState):
            raise TypeError(
                "initial_state: expected a LinearAttentionState(S, z), "
                f"got {type(initial_state).__name__}"
            )
        dims.check("initial_state.S", initial_state.S, "B H K V")
        dims.check("initial_state.z", initial_state.z, "B H K")
    checks.check_segment_ids(segment_ids, batch, length)
    checks.check_choice("impl", impl, GLA_IMPLS)

    acc = accumulation_dtype(q.dtype, k.dtype, v.dtype, k_enc.dtype, v_enc.dtype)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    in_prefix = positions_in_segment(segment_ids, batch, length) < prefix_len[:, None]
    k_enc = jnp.where(in_prefix[..., None, None], k_enc, 0).astype(acc)
    v_aug, v_enc_aug = (engine.with_ones_column(x.astype(acc)) for x in (v, v_enc))
    state = None
    if initial_state is not None:
        state = engine.with_key_sum(initial_state.S, initial_state.z)
    if impl == "reference":
        read, final = _reference(q, k, v_aug, k_enc, v_enc_aug, state, segment_ids, scale)
    else:
        read, final = _engine_form(
            q, k, v_aug, k_enc, v_enc_aug, state, segment_ids, scale, impl, chunk_size
        )
    y = normalized_output(read).astype(v.dtype)
    return y, LinearAttentionState(final[..., :-1], final[..., -1])


def _engine_form(q, k, v_aug, k_enc, v_enc_aug, state, segment_ids, scale, impl, chunk_size):
    """`[num, den]` per token from three linear-attention passes; `(read, final state)`."""

    def attend(q, k, v, state, ids):
        return linear_attention(
            q,
            k,
            v,
            scale=scale,
            initial_state=state,
            segment_ids=ids,
            impl=impl,
            chunk_size=chunk_size,
        )

    def flip(x):
        return None if x is None else jnp.flip(x, axis=1)

    decoder, decoder_final = attend(q, k, v_aug, state, segment_ids)
    encoder_before, encoder_final = attend(q, k_enc, v_enc_aug, None, segment_ids)
    encoder_after = flip(attend(flip(q), flip(k_enc), flip(v_enc_aug), None, flip(segment_ids))[0])
    # Both encoder passes read token i's own encoder key; count it once.
    own = jnp.sum(q.astype(k_enc.dtype) * scale * k_enc, axis=-1, keepdims=True) * v_enc_aug
    return decoder + encoder_before + encoder_after - own, decoder_final + encoder_final


def _reference(q, k, v_aug, k_enc, v_enc_aug, state, segment_ids, scale):
    """The definition, token by token: each token reads its segment's whole encoder state
    `S_enc` (every encoder key of its segment; those outside the prefix are zero) plus its
    causal decoder state."""
    batch, length, heads, key_dim = q.shape
    ids = jnp.zeros((batch, length), jnp.int32) if segment_ids is None else segment_ids
    same_segment = (ids[:, :, None] == ids[:, None, :]).astype(k_enc.dtype)  # [B, T, T]
    encoder_states = jnp.einsum("bij,bjhk,bjhv->bihkv", same_segment, k_enc, v_enc_aug)
    if state is None:
        state = jnp.zeros((batch, heads, key_dim, v_aug.shape[-1]), k_enc.dtype)

    def step(decoder_state, xs):
        start, (q_t, k_t, v_t, encoder_state_t) = xs
        decoder_state = reset(start, decoder_state) + k_t[..., :, None] * v_t[..., None, :]
        read = jnp.einsum("bhk,bhkv->bhv", q_t, encoder_state_t + decoder_state)
        return decoder_state, read

    inputs = (q.astype(k_enc.dtype) * scale, k.astype(k_enc.dtype), v_aug, encoder_states)
    read, decoder_final = scan_tokens(step, state.astype(k_enc.dtype), inputs, segment_ids)
    return read, decoder_final + encoder_states[:, -1]
