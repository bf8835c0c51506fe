"""Softmax attention: every impl against the materialized reference, the KV cache, decoding."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from contract import OpContract, OpSpec, assert_trees_close, ring_view

from seqjax.ops.attention import (
    KVCache,
    init_kv_cache,
    softmax_attention,
    softmax_attention_step,
)

HEADS, KV_HEADS, KEY_DIM, VALUE_DIM = 4, 2, 8, 6
BLOCK = 16  # blockwise block size: the harness's lengths straddle one and two blocks
WINDOW = 7


def make_inputs(key, batch, length, dtype, kv_heads=KV_HEADS):
    kq, kk, kv = jax.random.split(key, 3)
    return {
        "q": jax.random.normal(kq, (batch, length, HEADS, KEY_DIM)).astype(dtype),
        "k": jax.random.normal(kk, (batch, length, kv_heads, KEY_DIM)).astype(dtype),
        "v": jax.random.normal(kv, (batch, length, kv_heads, VALUE_DIM)).astype(dtype),
    }


def filled_cache(key, batch, capacity, lengths) -> KVCache:
    """A cache after `lengths[b]` random tokens: slot c holds the newest position = c mod C."""
    length = jnp.asarray(lengths[:batch], jnp.int32)
    slots = jnp.arange(capacity)
    positions = (length[:, None] - 1) - jnp.mod(length[:, None] - 1 - slots, capacity)
    positions = jnp.where(positions >= 0, positions, -1).astype(jnp.int32)
    kk, kv = jax.random.split(key)
    filled = (positions >= 0)[..., None, None]
    k = jax.random.normal(kk, (batch, capacity, KV_HEADS, KEY_DIM)) * filled
    v = jax.random.normal(kv, (batch, capacity, KV_HEADS, VALUE_DIM)) * filled
    return KVCache(k, v, positions, length)


def cache_view(cache: KVCache) -> list:
    return ring_view((cache.k, cache.v), cache.positions, cache.length)


def attention_spec(causal, window, capacity, lengths, step_capacity):
    def make_state(key, batch):
        return None if capacity is None else filled_cache(key, batch, capacity, lengths)

    def apply(inputs, state, segment_ids, impl):
        return softmax_attention(
            inputs["q"],
            inputs["k"],
            inputs["v"],
            causal=causal,
            window=window,
            segment_ids=segment_ids,
            initial_state=state,
            impl=impl,
            block_size=BLOCK,
        )

    def step(inputs, state):
        if state is None:
            batch = inputs["q"].shape[0]
            state = init_kv_cache(batch, step_capacity, KV_HEADS, KEY_DIM, VALUE_DIM)
        return softmax_attention_step(inputs["q"], inputs["k"], inputs["v"], state, window=window)

    return OpSpec(
        make_inputs=make_inputs,
        apply=apply,
        make_state=make_state,
        step=step if causal else None,
        time_inputs=frozenset({"q", "k", "v"}),
        impls=("xla", "blockwise"),
        chunk_size=BLOCK,
        state_view=cache_view,
    )


class TestCausalAttention(OpContract):
    """Grouped-query causal attention continuing a cache with room (prefill after a prompt)."""

    spec = attention_spec(True, None, 320, (5, 0, 3), step_capacity=16)


class TestSlidingWindowAttention(OpContract):
    """Window 7 with a ring-buffer cache that has wrapped around (row 0) and not (row 1)."""

    spec = attention_spec(True, WINDOW, WINDOW, (10, 4, 3), step_capacity=WINDOW)


class TestBidirectionalAttention(OpContract):
    spec = attention_spec(False, None, None, (), step_capacity=0)


@pytest.mark.parametrize("impl", ["xla", pytest.param("blockwise", marks=pytest.mark.slow)])
@pytest.mark.parametrize("window", [1, 40])
def test_windows_of_one_and_longer_than_the_sequence(impl, window):
    inputs = make_inputs(jax.random.key(0), 2, 23, jnp.float32)
    args = (inputs["q"], inputs["k"], inputs["v"])

    def run(q, k, v, impl):
        return softmax_attention(q, k, v, window=window, impl=impl, block_size=8)[0]

    expected = run(*args, "reference")
    assert_trees_close(run(*args, impl), expected, 2e-5, f"{impl} window {window}")
    if window == 1:  # each token sees only itself: o_t = v_t of its key head
        own = jnp.repeat(inputs["v"], HEADS // KV_HEADS, axis=2)
        assert_trees_close(expected, own, 1e-6, "window 1 is the identity on v")

    def loss(impl):
        return jax.grad(lambda *a: jnp.sum(jnp.sin(run(*a, impl))), argnums=(0, 1, 2))(*args)

    assert_trees_close(loss(impl), loss("reference"), 5e-5, f"{impl} gradients, window {window}")


@pytest.mark.parametrize("impl", ["xla", "blockwise"])
def test_bias_with_broadcast_axes_and_a_cache(impl):
    """A `[B, 1, 1, S]` key bias (padding-style) and a `[1, H, T, S]` bias, over cache + new keys;
    gradients include the bias's."""
    length, capacity = 21, 12
    inputs = make_inputs(jax.random.key(3), 2, length, jnp.float32)
    cache = filled_cache(jax.random.key(4), 2, capacity, (7, 2))
    keys = capacity + length
    key_bias = jax.random.normal(jax.random.key(5), (2, 1, 1, keys))
    head_bias = jax.random.normal(jax.random.key(6), (1, HEADS, length, keys))

    def loss(q, k, v, cache_k, key_bias, head_bias, impl):
        out, final = softmax_attention(
            q,
            k,
            v,
            bias=key_bias + head_bias,
            initial_state=cache._replace(k=cache_k),
            impl=impl,
            block_size=8,
        )
        return jnp.sum(jnp.sin(out)) + jnp.sum(jnp.cos(final.k))

    args = (inputs["q"], inputs["k"], inputs["v"], cache.k, key_bias, head_bias)
    grad = jax.jit(jax.grad(loss, argnums=range(6)), static_argnums=6)
    assert_trees_close(
        jax.jit(loss, static_argnums=6)(*args, impl),
        jax.jit(loss, static_argnums=6)(*args, "reference"),
        2e-5,
        "loss",
    )
    assert_trees_close(grad(*args, impl), grad(*args, "reference"), 5e-5, f"{impl} gradients")


@pytest.mark.parametrize("impl", ["xla", "blockwise"])
def test_large_bfloat16_bias_and_a_query_that_sees_no_key(impl):
    """The bias is added in float32 (a bfloat16 bias of 300 + 0.5 s would lose its fractions)
    and a query whose every key is masked by -inf outputs zeros, as in the reference."""
    inputs = make_inputs(jax.random.key(9), 1, 6, jnp.bfloat16)
    bias = 300.0 + 0.5 * jnp.arange(6.0)[None, None, None]
    bias = jnp.broadcast_to(bias, (1, HEADS, 6, 6)).at[:, :, 2].set(-jnp.inf)
    args = (inputs["q"], inputs["k"], inputs["v"])
    expected, _ = softmax_attention(*args, bias=bias, impl="reference")
    out, _ = softmax_attention(*args, bias=bias, impl=impl, block_size=4)
    assert_trees_close(out, expected, 2e-2, impl)
    assert not bool(jnp.any(out[:, 2]))


@pytest.mark.parametrize("impl", ["xla", "blockwise"])
def test_cross_attention_with_more_keys_than_queries(impl):
    inputs = make_inputs(jax.random.key(7), 2, 11, jnp.float32)
    memory = make_inputs(jax.random.key(8), 2, 29, jnp.float32)
    expected, cache = softmax_attention(
        inputs["q"], memory["k"], memory["v"], causal=False, impl="reference"
    )
    out, _ = softmax_attention(
        inputs["q"], memory["k"], memory["v"], causal=False, impl=impl, block_size=8
    )
    assert_trees_close(out, expected, 2e-5, impl)
    assert cache.k.shape[1] == 29


def test_prefill_then_decode_equals_the_parallel_form():
    """Prefill 20 tokens into a ring buffer of the window's size, decode 12 more: equal to one
    parallel call over all 32; the decode state never grows beyond `window` slots."""
    inputs = make_inputs(jax.random.key(9), 2, 32, jnp.float32)
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    expected, _ = softmax_attention(q, k, v, window=5, impl="reference")
    prefill, cache = softmax_attention(q[:, :20], k[:, :20], v[:, :20], window=5)
    assert cache.k.shape[1] == 5
    step = jax.jit(functools.partial(softmax_attention_step, window=5))
    outputs = [prefill]
    for t in range(20, 32):
        o, cache = step(q[:, t], k[:, t], v[:, t], cache)
        outputs.append(o[:, None])
    assert cache.k.shape[1] == 5 and int(cache.length[0]) == 32
    assert_trees_close(jnp.concatenate(outputs, axis=1), expected, 1e-5, "decoded outputs")


def test_packed_prefill_cache_holds_only_the_last_segment():
    inputs = make_inputs(jax.random.key(10), 1, 12, jnp.float32)
    segment_ids = jnp.asarray([[0] * 5 + [1] * 7])
    _, cache = softmax_attention(
        inputs["q"], inputs["k"], inputs["v"], segment_ids=segment_ids, impl="reference"
    )
    np.testing.assert_array_equal(cache.positions[0], [-1] * 5 + list(range(5, 12)))
    assert float(jnp.abs(cache.k[0, :5]).max()) == 0.0


def test_a_cache_keeps_its_tokens_unless_a_new_segment_starts():
    """With an initial cache, a row whose new tokens continue its segment keeps the cache's
    tokens; a row where a new segment starts drops them."""
    inputs = make_inputs(jax.random.key(11), 2, 4, jnp.float32)
    cache = filled_cache(jax.random.key(12), 2, 16, (3, 3))
    segment_ids = jnp.asarray([[0, 0, 1, 1], [0, 0, 0, 0]])
    _, final = softmax_attention(
        inputs["q"], inputs["k"], inputs["v"], segment_ids=segment_ids, initial_state=cache
    )
    np.testing.assert_array_equal(final.positions[0, :7], [-1] * 5 + [5, 6])
    np.testing.assert_array_equal(final.positions[1, :7], list(range(7)))
    assert_trees_close(final.k[1, :3], cache.k[1, :3], 1e-7, "kept cache keys")


def test_blockwise_memory_is_linear_in_length():
    """Forward+backward scratch memory grows like T (the padded inputs, the output and the
    query gradient), not like one `T x T` score matrix (compiled, not run: the benchmark
    runs it at T = 32K)."""

    def planned(length):
        shape = jax.ShapeDtypeStruct((1, length, 4, 64), jnp.float32)

        def loss(q, k, v):
            return jnp.sum(softmax_attention(q, k, v, impl="blockwise")[0])

        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(shape, shape, shape).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    short, long = planned(8192), planned(32768)
    assert long < 4.4 * short, f"8K: {short / 2**20:.0f} MiB, 32K: {long / 2**20:.0f} MiB"
    assert long < 4 * 32768 * 32768 * 4 / 100


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(window=0), "window"),
        (dict(window=3, causal=False), "window"),
        (dict(k=jnp.zeros((2, 9, 3, KEY_DIM)), v=jnp.zeros((2, 9, 3, VALUE_DIM))), "k, v"),
        (dict(q=jnp.zeros((2, 9, HEADS))), "q"),
        (dict(v=jnp.zeros((2, 9, KV_HEADS, VALUE_DIM), jnp.int32)), "v"),
        (dict(segment_ids=jnp.zeros((2, 9), jnp.float32)), "segment_ids"),
        (dict(bias=jnp.zeros((2, HEADS, 9))), "bias"),
        (dict(bias=jnp.zeros((2, 3, 9, 9))), "bias"),
        (dict(impl="flash"), "impl"),
        (dict(initial_state=init_kv_cache(2, 4, KV_HEADS, KEY_DIM, VALUE_DIM)), "initial_state"),
        (
            dict(window=5, initial_state=init_kv_cache(2, 4, KV_HEADS, KEY_DIM, VALUE_DIM)),
            "initial_state",
        ),
    ],
)
def test_bad_input_is_rejected_naming_the_argument(change, match):
    args = {**make_inputs(jax.random.key(0), 2, 9, jnp.float32), **change}
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    with pytest.raises((ValueError, TypeError), match=match):
        softmax_attention(q, k, v, **args)


def test_decoding_past_the_capacity_is_rejected():
    cache = init_kv_cache(1, 2, KV_HEADS, KEY_DIM, VALUE_DIM)
    x = make_inputs(jax.random.key(0), 1, 1, jnp.float32)
    q, k, v = x["q"][:, 0], x["k"][:, 0], x["v"][:, 0]
    for _ in range(2):
        _, cache = softmax_attention_step(q, k, v, cache)
    with pytest.raises(ValueError, match=r"cache\.length"):
        softmax_attention_step(q, k, v, cache)
