"""The MoM layer (Du et al., "MoM: Linear Sequence Modeling with Mixture-of-Memories"; the
authors' `mom/layers/mom.py` in OpenSparseLLMs/MoM and fla's `layers/mom.py`, defaults from
fla's `models/mom/configuration_mom.py` and the authors' `training/configs/mom_340M.json`).

A router sends each token to `topk` of `M` memories; each memory is a linear-attention state
that only its routed tokens write to, and the output mixes what the token's memories read:

    s_t     = softmax(x_t W_r)                       [M]    (router, float32)
    I_t     = topk(s_t),   w_tm = s_tm / sum_{m' in I_t} s_tm'   for m in I_t, else 0
    q^m_t   = SiLU(conv_q(x W_q)  over memory m's routed tokens)       (W_q shared)
    k^m_t   = SiLU(conv_k(x W_k^m) over memory m's routed tokens)      [H, K]
    v^m_t   = SiLU(conv_v(x W_v^m) over memory m's routed tokens)      [H, V],  V = expand_v K
    S^m_t   = Update(S^m_{t-1}; q^m_t, k^m_t, v^m_t, gates^m_t)   if m in I_t, else S^m_{t-1}
    o_t     = sum_m w_tm S^m_t^T q^m_t  +  S^s_t^T q^s_t     (shared memory s: every token, w = 1)
    y       = (RMSNorm(o) * swish(x W_g)) W_o                (norm per head, output gate)

`memory` chooses `Update` (the gates' projections are per memory, `A_log` and `dt_bias` shared):

    "gated_delta" (the paper's): S = exp(g)(I - beta k k^T) S + beta k v^T,  q, k L2-normalized,
                  beta = sigmoid(x W_b^m),  g = -exp(A_log) softplus(x W_a^m + dt_bias)
    "delta":      S = (I - beta k k^T) S + beta k v^T,  q, k L2-normalized
    "linear":     S = S + k v^T
    "gla":        S = diag(exp(gk)) S + k v^T,  gk = logsigmoid(x W_1^m W_2^m + b^m) / 16
                  (the authors' MoM-GLA, `mom_naive/layers/mom_gla.py`)

The shared memory (`shared_memory=True`) is memory `M`, the last of the `M + 1` along every
per-memory axis: it has its own k, v and gate projections and is routed every token with weight
1. The convolution kernels of q, k and v are shared by all memories, as the authors' are.

**Convolution semantics.** As in the authors' code, a memory's short convolution sees only the
tokens routed to it: token t's window is t and the `W - 1` tokens routed to the same memory
before it (of its own segment; at the start, the cache). The decode cache therefore holds, per
memory, the last `W - 1` routed inputs of q, k and v, and its state. (fla's layer drops the
per-memory boundaries of the convolution in training mode; we keep them.)

**Two formulations** (`impl`), equal in values and gradients:
- `"reference"`: every memory runs over the whole sequence under the routing mask (a token not
  routed to it writes nothing and does not decay: beta 0, log-decay 0, key 0), and its
  convolution gathers the memory's previous routed tokens;
- `"routed"` (what `"auto"` picks): per memory, the routed tokens are gathered to the front of a
  `[B, T]` buffer in time order, the convolution and the op run on that compacted sub-sequence
  (the tail is masked padding), and the outputs are scattered back. Shapes are static (each
  memory has room for all T tokens) and no token is dropped (the 340M config's capacity 1.0).
Decoding one token with a cache runs the masked form with the op's `*_step`.

**Load balancing.** Each call sows `aux_loss_scale * M * sum_m f_m p_m` (Switch Transformer's
loss as the authors compute it: `f_m` the fraction of the call's tokens routed to memory m,
counting every top-k slot, `p_m` the mean router probability) into the collection
`"intermediates"` under the name `"aux_loss"`; a training loop applies the model with
`mutable=["intermediates"]` and adds the sown values. The authors pool the router statistics of
all layers before taking the product; here each layer sows its own term.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from seqjax.nn.gated_delta_net import a_log_init, dt_bias_init
from seqjax.nn.layers import GatedRMSNorm, RMSNorm, dense, l2_normalize
from seqjax.nn.mixer import frozen, positive, require
from seqjax.ops.delta_rule import (
    DELTA_IMPLS,
    delta_rule,
    delta_rule_step,
    gated_delta_rule,
    gated_delta_rule_step,
)
from seqjax.ops.gla import gla, gla_step, linear_attention, linear_attention_step
from seqjax.ops.short_conv import causal_conv
from seqjax.scan import segment_index

MEMORIES: tuple[str, ...] = ("gated_delta", "delta", "linear", "gla")
MOM_IMPLS: tuple[str, ...] = ("auto", "reference", "routed")
# The op and its one-token step per memory kind; their arguments after q are `memory_inputs`.
MEMORY_OPS = {
    "gated_delta": (gated_delta_rule, gated_delta_rule_step),
    "delta": (delta_rule, delta_rule_step),
    "linear": (linear_attention, linear_attention_step),
    "gla": (gla, gla_step),
}
L2_NORMALIZED = frozenset({"gated_delta", "delta"})


@frozen
class MoMConfig:
    width: int
    num_heads: int = 4
    head_dim: int = 256
    expand_v: float = 1.0
    num_memories: int = 4
    topk: int = 2
    shared_memory: bool = True
    memory: str = "gated_delta"
    conv_size: int = 4
    use_output_gate: bool = True
    gate_low_rank: int = 16
    gate_logit_normalizer: float = 16.0
    aux_loss_scale: float = 0.01
    norm_eps: float = 1e-6
    impl: str = "auto"
    op_impl: str = "auto"
    chunk_size: int = 64

    def __post_init__(self):
        fields = ("num_heads", "head_dim", "num_memories", "topk", "conv_size", "gate_low_rank")
        positive(self, "width", *fields, "chunk_size")
        value = self.expand_v * self.head_dim
        ok = value == int(value) and value > 0
        require(ok, "expand_v", f"expand_v * head_dim must be a positive integer, got {value}")
        message = f"topk = {self.topk} must be at most num_memories = {self.num_memories}"
        require(self.topk <= self.num_memories, "topk", message)
        require(self.memory in MEMORIES, "memory", f"expected one of {MEMORIES}")
        require(self.gate_logit_normalizer > 0, "gate_logit_normalizer", "must be positive")
        require(self.aux_loss_scale >= 0, "aux_loss_scale", "must be non-negative")
        require(self.impl in MOM_IMPLS, "impl", f"expected one of {MOM_IMPLS}")
        require(self.op_impl in DELTA_IMPLS, "op_impl", f"expected one of {DELTA_IMPLS}")

    @property
    def value_dim(self) -> int:
        return int(self.expand_v * self.head_dim)

    @property
    def total_memories(self) -> int:
        """The routed memories plus the shared one."""
        return self.num_memories + int(self.shared_memory)


class MoMCache(NamedTuple):
    """Per memory (`M + 1` with the shared memory, last): `state: [B, M, H, K, V]` float32, and
    the last `W - 1` inputs routed to it of the q, k and v convolutions (`[B, M, W - 1, H * K]`,
    `[B, M, W - 1, H * K]`, `[B, M, W - 1, H * V]`)."""

    state: jax.Array
    conv_q: jax.Array
    conv_k: jax.Array
    conv_v: jax.Array


def init_mom_cache(batch: int, config: MoMConfig, dtype) -> MoMCache:
    memories, heads, keep = config.total_memories, config.num_heads, config.conv_size - 1
    key_width, value_width = heads * config.head_dim, heads * config.value_dim
    return MoMCache(
        jnp.zeros((batch, memories, heads, config.head_dim, config.value_dim), jnp.float32),
        jnp.zeros((batch, memories, keep, key_width), dtype),
        jnp.zeros((batch, memories, keep, key_width), dtype),
        jnp.zeros((batch, memories, keep, value_width), dtype),
    )


def route(logits: jax.Array, topk: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`logits: [B, T, M]` -> `(weights, routed, scores)`: the renormalized top-k weights
    (zero off the selection) and the selection `[B, T, M]`, and the softmax `scores`, float32."""
    scores = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    top, selected = jax.lax.top_k(scores, topk)
    slots = jax.nn.one_hot(selected, logits.shape[-1], dtype=jnp.float32)  # [B, T, k, M]
    routed = jnp.sum(slots, axis=-2)
    weights = jnp.einsum("btk,btkm->btm", top / jnp.sum(top, axis=-1, keepdims=True), slots)
    return weights, routed > 0, scores


def load_balancing_loss(scores: jax.Array, routed: jax.Array) -> jax.Array:
    """Switch Transformer's `M * sum_m f_m p_m` over all tokens of `scores, routed: [B, T, M]`."""
    fraction = jnp.mean(routed.astype(jnp.float32), axis=(0, 1))
    probability = jnp.mean(scores, axis=(0, 1))
    return scores.shape[-1] * jnp.sum(fraction * probability)


def by_memory(x: jax.Array) -> jax.Array:
    """`[B, T, M, ...]` -> `[B * M, T, ...]`: each memory of each row is a row of its own."""
    x = jnp.moveaxis(x, 2, 1)
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def gather_tokens(x: jax.Array, index: jax.Array) -> jax.Array:
    """`x[n, index[n, s]]` for `x: [N, T, ...]` and `index: [N, S]`."""
    index = index.reshape(*index.shape, *([1] * (x.ndim - 2)))
    return jnp.take_along_axis(x, index, axis=1)


def routed_order(routed: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """For `routed: [N, T]` bool, the stable order that puts the routed tokens first:
    `order` (the token at each place), `place` (each token's place; its inverse) and the
    number routed `count: [N]`."""
    length = routed.shape[1]
    count = jnp.sum(routed, axis=1, dtype=jnp.int32)
    rank = jnp.cumsum(routed, axis=1, dtype=jnp.int32) - 1
    rank_unrouted = jnp.cumsum(~routed, axis=1, dtype=jnp.int32) - 1
    place = jnp.where(routed, rank, count[:, None] + rank_unrouted)
    tokens = jnp.arange(length, dtype=jnp.int32)
    order = jax.vmap(lambda p: jnp.zeros_like(p).at[p].set(tokens))(place)
    return order, place, count


def last_inputs(
    extended: jax.Array,
    extended_segments: jax.Array,
    index: jax.Array,
    last_segment: jax.Array,
    dtype,
) -> jax.Array:
    """The convolution cache for the next call: the inputs at `index: [N, W - 1]` of
    `[cache; x]`, zeroed where they are not in the row's last segment."""
    tail = gather_tokens(extended, index)
    same = gather_tokens(extended_segments, index) == last_segment[:, None]
    return jnp.where(same[..., None], tail, 0).astype(dtype)


def masked_conv(
    x: jax.Array,
    kernel: jax.Array,
    cache: jax.Array,
    routed: jax.Array,
    segments: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """The reference convolution over routed sub-sequences, without moving tokens.

    `x: [N, T, C]`, `kernel: [W, C]`, `cache: [N, W - 1, C]`, `routed: [N, T]` bool,
    `segments: [N, T]` segment indices (0 for the row's first). Token t's window is t and the
    `W - 1` routed tokens before it (the cache's entries count as routed and belong to segment 0),
    those of another segment zero. Returns `(y [N, T, C] float32, new cache)`.
    """
    width = kernel.shape[0]
    keep, length = width - 1, x.shape[1]
    extended = jnp.concatenate([cache.astype(x.dtype), x], axis=1).astype(jnp.float32)
    extended_segments = jnp.pad(segments, ((0, 0), (keep, 0)))
    extended_routed = jnp.pad(routed, ((0, 0), (keep, 0)), constant_values=True)
    index = jnp.arange(keep + length, dtype=jnp.int32)
    latest = jax.lax.cummax(jnp.where(extended_routed, index, -1), axis=1)
    previous = jnp.pad(latest[:, :-1], ((0, 0), (1, 0)), constant_values=-1)
    source = jnp.broadcast_to(index[keep:], segments.shape)
    y = jnp.zeros(x.shape, jnp.float32)
    for lag in range(width):
        safe = jnp.maximum(source, 0)
        counted = (source >= 0) & (gather_tokens(extended_segments, safe) == segments)
        tap = kernel[keep - lag].astype(jnp.float32)
        y = y + jnp.where(counted[..., None], gather_tokens(extended, safe), 0.0) * tap
        source = jnp.where(source >= 0, gather_tokens(previous, safe), -1)
    last = [latest[:, -1]]
    for _ in range(keep - 1):
        last.insert(0, gather_tokens(previous, last[0][:, None])[:, 0])
    tail_index = jnp.stack(last, axis=1) if keep else jnp.zeros((x.shape[0], 0), jnp.int32)
    tail = last_inputs(extended, extended_segments, tail_index, segments[:, -1], cache.dtype)
    return y, tail


def compacted_conv(
    x: jax.Array,
    kernel: jax.Array,
    cache: jax.Array,
    count: jax.Array,
    segments: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """The fast convolution: a plain causal convolution of `x: [N, T, C]` whose first `count`
    tokens are a memory's routed tokens (the rest padding), with their `segments`; `cache` is
    already zeroed where the sub-sequence does not continue the cache's segment."""
    keep = kernel.shape[0] - 1
    y, _ = causal_conv(x, kernel, None, cache, segments)
    extended = jnp.concatenate([cache.astype(x.dtype), x], axis=1)
    extended_segments = jnp.pad(segments, ((0, 0), (keep, 0)))
    tail_index = count[:, None] + jnp.arange(keep, dtype=jnp.int32)
    last_segment = segments[:, -1]
    return y, last_inputs(extended, extended_segments, tail_index, last_segment, cache.dtype)


def memory_inputs(
    kind: str,
    k: jax.Array,
    v: jax.Array,
    gate: jax.Array | None,
    beta: jax.Array | None,
    routed: jax.Array,
) -> tuple[jax.Array, ...]:
    """The op's arguments after q for memory `kind`, `[N, T, ...]` each, where a token not
    `routed` neither writes nor decays (beta 0, log-decay 0, key 0)."""
    mask = routed.astype(jnp.float32)
    if kind == "gated_delta":
        return k, v, gate * mask[..., None], beta * mask[..., None]
    if kind == "delta":
        return k, v, beta * mask[..., None]
    keys = k * mask[..., None, None].astype(k.dtype)
    if kind == "linear":
        return keys, v
    return keys, v, gate * mask[..., None, None]


class MoM(nn.Module):
    config: MoMConfig

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        *,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
        cache: MoMCache | None = None,
    ) -> tuple[jax.Array, MoMCache]:
        del positions  # no position embedding
        c = self.config
        batch, length, _ = x.shape
        heads, key_dim, value_dim, memories = c.num_heads, c.head_dim, c.value_dim, c.total_memories
        logits = dense(c.num_memories, ("embed", None), "router")(x)
        weights, routed, scores = route(logits, c.topk)
        self.sow(
            "intermediates", "aux_loss", c.aux_loss_scale * load_balancing_loss(scores, routed)
        )
        if c.shared_memory:
            weights = jnp.pad(weights, ((0, 0), (0, 0), (0, 1)), constant_values=1.0)
            routed = jnp.pad(routed, ((0, 0), (0, 0), (0, 1)), constant_values=True)

        q = dense(heads * key_dim, ("embed", "heads"), "q")(x)
        k = dense((memories, heads * key_dim), ("embed", None, "heads"), "k")(x)
        v = dense((memories, heads * value_dim), ("embed", None, "heads"), "v")(x)
        q = jnp.broadcast_to(q[:, :, None], (batch, length, memories, q.shape[-1]))
        kernels = [
            self.conv_kernel(f"conv_{name}", a.shape[-1])
            for name, a in zip("qkv", (q, k, v), strict=True)
        ]
        gate, beta = self.gates(x)
        segments = jnp.zeros((batch, length), jnp.int32)
        if segment_ids is not None:
            segments = segment_index(segment_ids)
        segments = jnp.repeat(segments, memories, axis=0)
        if cache is None:
            cache = init_mom_cache(batch, c, x.dtype)
        state, *conv_caches = (a.reshape(batch * memories, *a.shape[2:]) for a in cache)
        inputs = [by_memory(a) for a in (q, k, v)]
        gate, beta = (None if a is None else by_memory(a) for a in (gate, beta))
        routed = by_memory(routed)

        if c.impl == "reference" or length == 1:
            convolved = [
                masked_conv(a, w, t, routed, segments)
                for a, w, t in zip(inputs, kernels, conv_caches, strict=True)
            ]
            o, state = self.recur(
                convolved, gate, beta, routed, state, segments, length == 1, x.dtype
            )
        else:
            order, place, count = routed_order(routed)
            compacted = gather_tokens(segments, order)
            within = jnp.arange(length) < count[:, None]
            compacted = jnp.where(within, compacted, segments[:, -1:])
            fresh = compacted[:, 0] > 0  # the first routed token does not continue the cache
            conv_caches = [jnp.where(fresh[:, None, None], 0, t) for t in conv_caches]
            state = jnp.where(fresh[:, None, None, None], 0.0, state)
            convolved = [
                compacted_conv(gather_tokens(a, order), w, t, count, compacted)
                for a, w, t in zip(inputs, kernels, conv_caches, strict=True)
            ]
            gate, beta = (None if a is None else gather_tokens(a, order) for a in (gate, beta))
            o, state = self.recur(convolved, gate, beta, within, state, compacted, False, x.dtype)
            o = gather_tokens(o, place)

        o = jnp.moveaxis(o.reshape(batch, memories, *o.shape[1:]), 1, 2)  # [B, T, M, H, V]
        o = jnp.einsum("btm,btmhv->bthv", weights, o.astype(jnp.float32)).astype(x.dtype)
        if c.use_output_gate:
            g = dense((heads, value_dim), ("embed", "heads", "kv"), "g")(x)
            o = GatedRMSNorm(c.norm_eps, axis_name="kv", name="norm")(o, g)
        else:
            o = RMSNorm(c.norm_eps, axis_name="kv", name="norm")(o)
        y = dense(c.width, ("heads", "kv", "embed"), "o", axis=(-2, -1))(o)
        conv_caches = [t.reshape(batch, memories, *t.shape[1:]) for _, t in convolved]
        return y, MoMCache(state.reshape(batch, memories, *state.shape[1:]), *conv_caches)

    def conv_kernel(self, name: str, channels: int) -> jax.Array:
        """A depthwise kernel `[W, C]`, initialized as `ShortConvolution`'s."""
        bound = self.config.conv_size**-0.5

        def uniform(key, shape, dtype=jnp.float32):
            return jax.random.uniform(key, shape, dtype, -bound, bound)

        init = nn.with_logical_partitioning(uniform, (None, "heads"))
        return self.param(name, init, (self.config.conv_size, channels))

    def gates(self, x: jax.Array) -> tuple[jax.Array | None, jax.Array | None]:
        """The per-memory log-decays (`[B, T, M, H]`, or `[B, T, M, H, K]` for "gla") and write
        strengths `[B, T, M, H]`, float32; None where the memory kind has none."""
        c = self.config
        heads, memories = c.num_heads, c.total_memories
        per_memory = ("embed", None, "heads")
        beta = None
        if c.memory in L2_NORMALIZED:
            beta = jax.nn.sigmoid(
                dense((memories, heads), per_memory, "beta")(x).astype(jnp.float32)
            )
        if c.memory == "gated_delta":
            a_log = self.param(
                "A_log", nn.with_logical_partitioning(a_log_init, ("heads",)), (heads,)
            )
            dt_bias = self.param(
                "dt_bias", nn.with_logical_partitioning(dt_bias_init, ("heads",)), (heads,)
            )
            a = dense((memories, heads), per_memory, "a")(x).astype(jnp.float32)
            return -jnp.exp(a_log) * jax.nn.softplus(a + dt_bias), beta
        if c.memory == "gla":
            return self.gla_log_decay(x), beta
        return None, beta

    def gla_log_decay(self, x: jax.Array) -> jax.Array:
        """`logsigmoid(x W_1^m W_2^m + b^m) / normalizer`, `[B, T, M, H, K]`: GLA's low-rank gate,
        one per memory."""
        c = self.config
        shape = (c.total_memories, c.num_heads, c.head_dim)
        low = dense((c.total_memories, c.gate_low_rank), ("embed", None, None), "gk_down")(x)
        up_init = nn.with_logical_partitioning(
            nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=1),
            (None, None, "heads", "kv"),
        )
        up = self.param("gk_up", up_init, (c.total_memories, c.gate_low_rank, *shape[1:]))
        bias = self.param(
            "gk_bias",
            nn.with_logical_partitioning(nn.initializers.zeros, (None, "heads", "kv")),
            shape,
        )
        logit = jnp.einsum("btmr,mrhk->btmhk", low, up.astype(low.dtype)).astype(jnp.float32)
        return jax.nn.log_sigmoid(logit + bias) / c.gate_logit_normalizer

    def recur(
        self,
        convolved: list[tuple[jax.Array, jax.Array]],
        gate: jax.Array | None,
        beta: jax.Array | None,
        routed: jax.Array,
        state: jax.Array,
        segments: jax.Array,
        step: bool,
        dtype,
    ) -> tuple[jax.Array, jax.Array]:
        """Each memory's op over its (masked or compacted) rows `[N, T, ...]` from `state`, or
        its one-token step. Returns `(o [N, T, H, V], state)`."""
        c = self.config
        q, k, v = (
            jax.nn.silu(y).astype(dtype).reshape(*y.shape[:2], c.num_heads, -1)
            for y, _ in convolved
        )
        if c.memory in L2_NORMALIZED:
            q, k = l2_normalize(q), l2_normalize(k)
        args = (q, *memory_inputs(c.memory, k, v, gate, beta, routed))
        op, op_step = MEMORY_OPS[c.memory]
        if step:
            o, state = op_step(*(a[:, 0] for a in args), state)
            return o[:, None], state
        return op(
            *args,
            initial_state=state,
            segment_ids=segments,
            impl=c.op_impl,
            chunk_size=c.chunk_size,
        )

    def init_cache(self, batch_size: int, max_length: int, dtype=jnp.float32) -> MoMCache:
        del max_length  # the state does not grow
        return init_mom_cache(batch_size, self.config, dtype)
