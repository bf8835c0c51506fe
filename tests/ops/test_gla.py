import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from contract import OpContract, OpSpec, assert_trees_close
from jax.experimental import checkify

from seqjax import checks
from seqjax.ops import chunked_linear_attention as engine
from seqjax.ops.gla import (
    LinearAttentionState,
    alibi_slopes,
    chunk_states,
    gla,
    gla_step,
    lightning_attention,
    lightning_log_decays,
    linear_attention,
    linear_attention_step,
    retention,
    retention_log_decays,
    simple_gla,
    simple_gla_step,
    states_after,
)

H, K, V = 2, 8, 5
CHUNK = 32  # four tiles of 8: the tiled per-channel form is exercised


def make_qkv(key, batch, length, dtype):
    kq, kk, kv, kg = jax.random.split(key, 4)
    q = jax.random.normal(kq, (batch, length, H, K))
    k = jax.random.normal(kk, (batch, length, H, K)) * K**-0.5
    v = jax.random.normal(kv, (batch, length, H, V))
    return {"q": q.astype(dtype), "k": k.astype(dtype), "v": v.astype(dtype)}, kg


def make_gla_inputs(key, batch, length, dtype):
    inputs, kg = make_qkv(key, batch, length, dtype)
    # Decays from nearly 1 to exp(-6) per token, as GLA's logsigmoid(.)/16 and beyond.
    gk = jax.nn.log_sigmoid(3.0 + 3.0 * jax.random.normal(kg, (batch, length, H, K)))
    return {**inputs, "gk": gk.astype(dtype)}


def make_strong_gla_inputs(key, batch, length, dtype):
    inputs, kg = make_qkv(key, batch, length, dtype)
    # Up to exp(-8) per token: a chunk's cumulative decay leaves the factored form's range,
    # and the tiled (secondary chunking) form runs.
    gk = -8.0 * jax.random.uniform(kg, (batch, length, H, K))
    return {**inputs, "gk": gk.astype(dtype)}


def make_simple_gla_inputs(key, batch, length, dtype):
    inputs, kg = make_qkv(key, batch, length, dtype)
    g = jax.nn.log_sigmoid(3.0 + 2.0 * jax.random.normal(kg, (batch, length, H)))
    return {**inputs, "g": g.astype(dtype)}


def make_linear_attention_inputs(key, batch, length, dtype):
    inputs, _ = make_qkv(key, batch, length, dtype)
    # Positive feature maps (as linear attention uses), so the normalizer stays away from 0.
    return {name: jax.nn.elu(x) + 1 if name != "v" else x for name, x in inputs.items()}


def random_state(key, batch):
    return jax.random.normal(key, (batch, H, K, V))


def random_normalized_state(key, batch):
    ks, kz = jax.random.split(key)
    return LinearAttentionState(
        jax.random.normal(ks, (batch, H, K, V)), 1.0 + jax.random.uniform(kz, (batch, H, K))
    )


QKV = frozenset({"q", "k", "v"})
GLA_SPEC = OpSpec(
    make_inputs=make_gla_inputs,
    apply=lambda i, s, ids, impl: gla(
        i["q"],
        i["k"],
        i["v"],
        i["gk"],
        initial_state=s,
        segment_ids=ids,
        impl=impl,
        chunk_size=CHUNK,
    ),
    make_state=random_state,
    step=lambda i, s: gla_step(i["q"], i["k"], i["v"], i["gk"], s),
    time_inputs=QKV | {"gk"},
    impls=("chunked", "parallel"),
    chunk_size=CHUNK,
)
STRONG_DECAY_GLA_SPEC = dataclasses.replace(
    GLA_SPEC, make_inputs=make_strong_gla_inputs, impls=("chunked",)
)
SIMPLE_GLA_SPEC = OpSpec(
    make_inputs=make_simple_gla_inputs,
    apply=lambda i, s, ids, impl: simple_gla(
        i["q"],
        i["k"],
        i["v"],
        i["g"],
        initial_state=s,
        segment_ids=ids,
        impl=impl,
        chunk_size=16,
    ),
    make_state=random_state,
    step=lambda i, s: simple_gla_step(i["q"], i["k"], i["v"], i["g"], s),
    time_inputs=QKV | {"g"},
    impls=("chunked", "parallel"),
    chunk_size=16,
)
LINEAR_ATTENTION_SPEC = OpSpec(
    make_inputs=make_linear_attention_inputs,
    apply=lambda i, s, ids, impl: linear_attention(
        i["q"], i["k"], i["v"], initial_state=s, segment_ids=ids, impl=impl, chunk_size=16
    ),
    make_state=random_state,
    step=lambda i, s: linear_attention_step(i["q"], i["k"], i["v"], s),
    time_inputs=QKV,
    impls=("chunked", "parallel"),
    chunk_size=16,
)
NORMALIZED_SPEC = OpSpec(
    make_inputs=make_linear_attention_inputs,
    apply=lambda i, s, ids, impl: linear_attention(
        i["q"],
        i["k"],
        i["v"],
        normalize=True,
        initial_state=s,
        segment_ids=ids,
        impl=impl,
        chunk_size=16,
    ),
    make_state=random_normalized_state,
    step=lambda i, s: linear_attention_step(
        i["q"],
        i["k"],
        i["v"],
        s if s is not None else LinearAttentionState(jnp.zeros((1, H, K, V)), jnp.zeros((1, H, K))),
        normalize=True,
    ),
    time_inputs=QKV,
    impls=("chunked",),
    chunk_size=16,
)


class TestGLA(OpContract):
    spec = GLA_SPEC


class TestGLAWithStrongDecays(OpContract):
    spec = STRONG_DECAY_GLA_SPEC


class TestSimpleGLA(OpContract):
    spec = SIMPLE_GLA_SPEC


class TestLinearAttention(OpContract):
    spec = LINEAR_ATTENTION_SPEC


class TestNormalizedLinearAttention(OpContract):
    spec = NORMALIZED_SPEC


@pytest.mark.parametrize("op", [gla, simple_gla])
def test_extreme_decays_give_finite_values_and_gradients(op):
    # Log-decays down to -20 per token: cumulative decays inside a 64-token chunk reach
    # exp(-1280), far below float32's range.
    batch, length = 1, 4096
    inputs, kg = make_qkv(jax.random.key(3), batch, length, jnp.float32)
    gate_shape = inputs["q"].shape if op is gla else inputs["q"].shape[:3]
    g = -20.0 * jax.random.uniform(kg, gate_shape)

    def loss(impl):
        def f(q, k, v, g):
            o, final = op(q, k, v, g, impl=impl)
            return jnp.sum(o * jnp.cos(o)) + jnp.sum(final)

        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3)))

    args = (inputs["q"], inputs["k"], inputs["v"], g)
    expected = loss("reference")(*args)
    actual = loss("chunked")(*args)
    for leaf in jax.tree.leaves(actual):
        assert np.all(np.isfinite(np.asarray(leaf)))
    assert_trees_close(actual, expected, 1e-4, "chunked (loss, grads) with decays to exp(-20)")


@pytest.mark.parametrize("op", [gla, simple_gla])
def test_chunked_memory_is_linear_in_length_and_holds_no_per_token_states(op):
    def bytes_per_token(length, value_dim, key_dim=32):
        def loss(q, k, v, g):
            o, final = op(q, k, v, g, impl="chunked", chunk_size=64)
            return jnp.sum(o) + jnp.sum(final)

        qk = jax.ShapeDtypeStruct((1, length, 1, key_dim), jnp.float32)
        v = jax.ShapeDtypeStruct((1, length, 1, value_dim), jnp.float32)
        g = qk if op is gla else jax.ShapeDtypeStruct((1, length, 1), jnp.float32)
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).lower(qk, qk, v, g).compile()
        return compiled.memory_analysis().temp_size_in_bytes / length

    assert bytes_per_token(4096, 32) <= 1.1 * bytes_per_token(1024, 32)
    # Per-token [K, V] states would add K * 4 bytes per token for every value channel.
    growth = bytes_per_token(1024, 256) - bytes_per_token(1024, 32)
    assert growth < 32 * (256 - 32) * 4 / 4


def test_chunk_states_are_the_states_after_every_chunk_boundary():
    inputs = make_gla_inputs(jax.random.key(4), 2, 50, jnp.float32)
    h0 = random_state(jax.random.key(5), 2)
    states = chunk_states(inputs["k"], inputs["v"], inputs["gk"], initial_state=h0, chunk_size=16)
    assert states.shape == (2, 4, H, K, V)
    expected = [h0]
    for end in (16, 32, 48):
        _, state = gla(*(inputs[n][:, :end] for n in ("q", "k", "v", "gk")), initial_state=h0)
        expected.append(state)
    assert_trees_close(states, jnp.stack(expected, axis=1), 1e-5, "chunk states")


def test_chunk_states_of_the_three_gate_shapes_agree_when_the_gates_agree():
    inputs = make_simple_gla_inputs(jax.random.key(6), 1, 40, jnp.float32)
    k, v, g = inputs["k"], inputs["v"], inputs["g"]
    per_head = chunk_states(k, v, g, chunk_size=16)
    per_channel = chunk_states(k, v, jnp.broadcast_to(g[..., None], k.shape), chunk_size=16)
    assert_trees_close(per_channel, per_head, 1e-5, "per-channel vs per-head")
    no_decay = chunk_states(k, v, chunk_size=16)
    assert_trees_close(no_decay, chunk_states(k, v, 0.0 * g, chunk_size=16), 1e-6, "no decay")


@pytest.mark.parametrize("tile", [8, 16])
@pytest.mark.parametrize("strength", [0.05, 8.0])
def test_the_three_intra_chunk_forms_agree(tile, strength):
    inputs = make_gla_inputs(jax.random.key(7), 2, 64, jnp.float32)
    q, k = (engine.to_chunks(inputs[n], 64) for n in ("q", "k"))
    log_decay = -strength * jax.random.uniform(jax.random.key(8), inputs["q"].shape)
    pot = engine.decay_potentials(log_decay, 64)
    ids = jnp.asarray(np.repeat([[0, 1, 2, 3]], 16, axis=1).repeat(2, axis=0))
    counts = engine.segment_counts(ids, 64, 64)
    mask = engine.pair_mask(counts, 64)
    log_space = engine.intra_scores(q, k, pot, counts, tile=None)
    tiled = engine._tiled_intra_scores(q, k, pot, mask, tile)
    assert_trees_close(tiled, log_space, 1e-5, "tiled vs log-space scores")
    reference = engine.mid_chunk_potential(pot)
    # A cumulative decay of at most 0.05 * 64 across a chunk factors; one of up to 8 * 64 not.
    assert bool(engine.factorable(pot)) == (strength < 1)
    if strength < 1:
        factored = engine._factored_intra_scores(q, k, pot, mask, reference)
        assert_trees_close(factored, log_space, 1e-5, "factored vs log-space scores")


def test_scalar_pair_weights_factored_and_per_pair_agree(monkeypatch):
    # Per-head potentials with an input-gate-like offset on the keys (mLSTM's potentials are
    # not monotone), a cumulative decay of up to exp(-19) across a chunk, packed segments.
    kg, ki = jax.random.split(jax.random.key(9))
    pot = engine.decay_potentials(-0.3 * jax.random.uniform(kg, (2, 64, H, 1)), 64)
    pot = pot._replace(key=pot.key - jax.random.uniform(ki, pot.key.shape))
    ids = jnp.asarray(np.repeat([[0, 1, 2, 3]], 16, axis=1).repeat(2, axis=0))
    mask = engine.pair_mask(engine.segment_counts(ids, 64, 64), 64)

    def weights_and_gradients(limit):
        monkeypatch.setattr(engine, "FACTORED_EXPONENT_LIMIT", limit)

        def f(query, key):
            out = engine.pair_weights(pot._replace(query=query, key=key), mask)
            return jnp.sum(out * jnp.cos(out))

        return jax.value_and_grad(f, argnums=(0, 1))(pot.query, pot.key)

    # A limit above every spread forces the outer product; a negative one the per-pair exps.
    factored, per_pair = weights_and_gradients(1e3), weights_and_gradients(-1.0)
    assert_trees_close(factored, per_pair, 1e-5, "factored vs per-pair weights and gradients")


def test_retention_and_lightning_build_the_papers_decays():
    np.testing.assert_allclose(
        np.exp(retention_log_decays(4)), [1 - 2**-5, 1 - 2**-6, 1 - 2**-7, 1 - 2**-8], rtol=1e-6
    )
    np.testing.assert_allclose(alibi_slopes(4), [2**-2, 2**-4, 2**-6, 2**-8], rtol=1e-6)
    # 6 heads: the slopes of 4 heads, then slopes 1 and 3 of 8 heads (ALiBi's interleaving).
    np.testing.assert_allclose(
        alibi_slopes(6), [2**-2, 2**-4, 2**-6, 2**-8, 2**-1, 2**-3], rtol=1e-6
    )
    np.testing.assert_allclose(
        lightning_log_decays(4, layer_idx=0, num_layers=3), -(1 + 1e-5) * alibi_slopes(4)
    )
    np.testing.assert_allclose(lightning_log_decays(4, 2, 3), -1e-5 * alibi_slopes(4), atol=1e-9)
    inputs = make_qkv(jax.random.key(8), 1, 20, jnp.float32)[0]
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    g = jnp.broadcast_to(retention_log_decays(H), (1, 20, H))
    assert_trees_close(retention(q, k, v), simple_gla(q, k, v, g), 1e-6, "retention")
    g = jnp.broadcast_to(lightning_log_decays(H, 1, 4), (1, 20, H))
    assert_trees_close(
        lightning_attention(q, k, v, layer_idx=1, num_layers=4, scale=1.0),
        simple_gla(q, k, v, g, scale=1.0),
        1e-6,
        "lightning attention",
    )


def test_rejects_mismatched_head_counts():
    q = jnp.zeros((1, 4, 2, 8))
    with pytest.raises(ValueError, match=r"k: expected shape \[B, T, H, K\] = \[1, 4, 2, 8\]"):
        gla(q, jnp.zeros((1, 4, 3, 8)), jnp.zeros((1, 4, 2, 5)), jnp.zeros((1, 4, 2, 8)))


def test_rejects_wrong_rank_of_gate():
    q = jnp.zeros((1, 4, 2, 8))
    with pytest.raises(ValueError, match=r"g: expected shape \[B, T, H\] = \[1, 4, 2\]"):
        simple_gla(q, q, q, jnp.zeros((1, 4, 2, 8)))


def test_rejects_float_segment_ids():
    q = jnp.zeros((1, 4, 2, 8))
    with pytest.raises(TypeError, match="segment_ids: expected an integer array"):
        linear_attention(q, q, q, segment_ids=jnp.zeros((1, 4)))


def test_rejects_a_plain_state_when_normalizing():
    q = jnp.zeros((1, 4, 2, 8))
    with pytest.raises(TypeError, match="initial_state: expected a LinearAttentionState"):
        linear_attention(q, q, q, normalize=True, initial_state=jnp.zeros((1, 2, 8, 8)))


def test_rejects_positive_log_decay_when_concrete_and_under_opt_in_checkify():
    q = jnp.zeros((1, 4, 2, 8))
    with pytest.raises(ValueError, match="gk: expected log-decays gk <= 0"):
        gla(q, q, q, jnp.ones((1, 4, 2, 8)))
    with checks.checkify_values():
        error, _ = checkify.checkify(jax.jit(lambda g: simple_gla(q, q, q, g)[0]))(
            jnp.ones((1, 4, 2))
        )
    with pytest.raises(checkify.JaxRuntimeError, match="g: expected log-decays g <= 0"):
        error.throw()


@pytest.mark.parametrize("gate", ["gk", "g", None])
def test_states_after_any_position_equal_the_final_states_of_prefixes(gate):
    inputs = (make_gla_inputs if gate == "gk" else make_simple_gla_inputs)(
        jax.random.key(9), 2, 45, jnp.float32
    )
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    log_decay = None if gate is None else inputs[gate]
    ids = jnp.asarray(np.array([[0] * 10 + [1] * 20 + [2] * 15, [0] * 45]))
    h0 = random_state(jax.random.key(10), 2)
    positions = jnp.array([[0, 9, 10, 29, 31, 44], [0, 15, 16, 17, 40, 44]])
    after = states_after(
        k, v, log_decay, positions, initial_state=h0, segment_ids=ids, chunk_size=16
    )
    assert after.shape == (2, 6, H, K, V)
    decay = jnp.zeros(q.shape[:3]) if log_decay is None else log_decay
    op = gla if gate == "gk" else simple_gla
    for b in range(2):
        for p, t in enumerate(np.asarray(positions[b])):
            _, expected = op(
                q[b : b + 1, : t + 1],
                k[b : b + 1, : t + 1],
                v[b : b + 1, : t + 1],
                decay[b : b + 1, : t + 1],
                initial_state=h0[b : b + 1],
                segment_ids=ids[b : b + 1, : t + 1],
                impl="reference",
            )
            assert_trees_close(after[b, p], expected[0], 1e-5, f"state after token {t}, row {b}")


def test_states_after_rejects_out_of_range_positions():
    inputs = make_simple_gla_inputs(jax.random.key(11), 1, 8, jnp.float32)
    with pytest.raises(ValueError, match="positions: expected 0 <= positions < T = 8"):
        states_after(inputs["k"], inputs["v"], inputs["g"], jnp.array([[8]]))
