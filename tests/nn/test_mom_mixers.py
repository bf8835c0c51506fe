"""The MoM (Mixture-of-Memories) mixer: the mixer contract (`mixer_checks`), the routed form
equal to the masked reference, convolutions over each memory's routed tokens, the router and
its load-balancing loss, and bad configs name their field."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from contract import assert_trees_close
from mixer_checks import WIDTH, check_mixer, mixer_setup

from seqjax.nn.mom import MoM, MoMConfig, masked_conv, route, routed_order

SMALL = MoMConfig(WIDTH, num_heads=2, head_dim=8, chunk_size=8)

# One representative config per mixer runs by default; the variants are `slow`.
MIXERS = {"mom": MoM(SMALL)}
VARIANTS = {
    "mom_reference": MoM(dataclasses.replace(SMALL, impl="reference")),
    "mom_delta_no_gate": MoM(
        dataclasses.replace(SMALL, memory="delta", use_output_gate=False, expand_v=2.0)
    ),
    "mom_linear_no_shared": MoM(
        dataclasses.replace(SMALL, memory="linear", shared_memory=False, conv_size=2)
    ),
    "mom_gla_all_memories": MoM(
        dataclasses.replace(
            SMALL, memory="gla", num_memories=3, topk=3, gate_low_rank=4, gate_logit_normalizer=8.0
        )
    ),
    "mom_pointwise_conv": MoM(dataclasses.replace(SMALL, conv_size=1, op_impl="reference")),
}
LENGTH = 11  # odd, and not a multiple of the chunk size
SEGMENTS = (0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2)


@pytest.mark.parametrize("name", list(MIXERS))
def test_mixer_contract(name):
    check_mixer(MIXERS[name], name)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(VARIANTS))
def test_mixer_variant_contract(name):
    check_mixer(VARIANTS[name], name)


def _routed_and_reference(config: MoMConfig):
    return (
        MoM(dataclasses.replace(config, impl="routed")),
        MoM(dataclasses.replace(config, impl="reference")),
    )


def _packed_inputs(length: int = LENGTH):
    segment_ids = jnp.asarray([SEGMENTS[:length], [0] * length], jnp.int32)
    return segment_ids


def _check_routed_equals_reference(config: MoMConfig) -> None:
    routed, reference = _routed_and_reference(config)
    params, x = mixer_setup(routed, length=LENGTH)
    segment_ids = _packed_inputs()
    weights = jax.random.normal(jax.random.key(2), x.shape)

    def loss(mixer):
        def value(params, x):
            y, cache = mixer.apply(params, x, segment_ids=segment_ids)
            return jnp.sum(y * weights) + sum(jnp.sum(jnp.sin(c)) for c in cache), (y, cache)

        return jax.jit(jax.value_and_grad(value, argnums=(0, 1), has_aux=True))(params, x)

    (_, fast), fast_grads = loss(routed)
    (_, slow), slow_grads = loss(reference)
    assert_trees_close(fast, slow, 1e-5, "routed vs reference: outputs and caches")
    assert_trees_close(fast_grads, slow_grads, 1e-4, "routed vs reference: gradients")


def test_routed_equals_reference_in_values_and_gradients():
    _check_routed_equals_reference(SMALL)


@pytest.mark.slow
@pytest.mark.parametrize("memory", ["delta", "linear", "gla"])
def test_routed_equals_reference_for_every_memory(memory):
    _check_routed_equals_reference(dataclasses.replace(SMALL, memory=memory, shared_memory=False))


@pytest.mark.slow
def test_routed_prefill_continues_a_cache_as_the_reference_does():
    """A packed call that continues a cache: the first segment continues the cache's state and
    convolution tails, the later ones start afresh."""
    routed, reference = _routed_and_reference(SMALL)
    params, x = mixer_setup(routed, length=2 * LENGTH)
    first, second = x[:, :LENGTH], x[:, LENGTH:]
    segment_ids = _packed_inputs()
    apply = jax.jit(
        lambda mixer, x, cache, s: mixer.apply(params, x, cache=cache, segment_ids=s),
        static_argnums=0,
    )
    _, cache = apply(routed, first, routed.init_cache(2, 2 * LENGTH), None)
    fast = apply(routed, second, cache, segment_ids)
    slow = apply(reference, second, cache, segment_ids)
    assert_trees_close(fast, slow, 1e-5, "routed vs reference from a cache")


def _routed_conv_by_loop(x, kernel, cache, routed, segments):
    """Each memory row's routed tokens as their own sequence, convolved one token at a time."""
    y = np.zeros(x.shape)
    tails = np.zeros(cache.shape)
    for n in range(x.shape[0]):
        window = [(0, c) for c in cache[n]]  # the last W - 1 routed (segment, input), oldest first
        for t in range(x.shape[1]):
            current = [*window, (segments[n, t], x[n, t])]
            taps = zip(kernel, current, strict=True)
            y[n, t] = sum(w * v for w, (s, v) in taps if s == segments[n, t])
            if routed[n, t]:
                window = current[1:]
        last = segments[n, -1]
        for i, (s, v) in enumerate(window):
            tails[n, i] = v if s == last else 0.0
    return y, tails


def test_masked_conv_sees_only_the_memorys_routed_tokens():
    rng = np.random.default_rng(0)
    length, channels, width = 12, 3, 4
    x = rng.normal(size=(3, length, channels))
    kernel = rng.normal(size=(width, channels))
    cache = rng.normal(size=(3, width - 1, channels))
    routed = rng.random((3, length)) < 0.5
    routed[2] = False  # a memory that receives no token
    segments = np.asarray([[0] * 5 + [1] * 4 + [2] * 3, [0] * length, [0] * 6 + [1] * 6])
    y, tail = masked_conv(*map(jnp.asarray, (x, kernel, cache, routed, segments)))
    expected_y, expected_tail = _routed_conv_by_loop(x, kernel, cache, routed, segments)
    np.testing.assert_allclose(y, expected_y, atol=1e-5)
    np.testing.assert_allclose(tail, expected_tail, atol=1e-6)


def test_routed_order_puts_routed_tokens_first_in_time_order():
    routed = jnp.asarray([[False, True, False, True, True], [False] * 5])
    order, place, count = routed_order(routed)
    np.testing.assert_array_equal(order, [[1, 3, 4, 0, 2], [0, 1, 2, 3, 4]])
    np.testing.assert_array_equal(count, [3, 0])
    np.testing.assert_array_equal(jnp.take_along_axis(order, place, axis=1), [list(range(5))] * 2)


def test_router_renormalizes_over_the_top_k():
    logits = jax.random.normal(jax.random.key(0), (2, 5, 4))
    weights, routed, scores = route(logits, 2)
    np.testing.assert_allclose(jnp.sum(weights, axis=-1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(jnp.sum(routed, axis=-1), 2)
    top = jnp.sort(scores, axis=-1)[..., -2:]
    np.testing.assert_array_equal(routed, scores >= top[..., :1])
    np.testing.assert_allclose(
        weights, jnp.where(routed, scores, 0) / jnp.sum(top, axis=-1)[..., None]
    )


@pytest.mark.slow
def test_load_balancing_loss_is_sown():
    mixer = MoM(SMALL)
    params, x = mixer_setup(mixer)
    _, state = mixer.apply(params, x, mutable=["intermediates"])
    (aux,) = state["intermediates"]["aux_loss"]
    logits = x @ params["params"]["router"]["kernel"].value
    scores = jax.nn.softmax(logits, axis=-1)
    chosen = scores >= jnp.sort(scores, axis=-1)[..., -2:-1]
    fraction, probability = jnp.mean(chosen, axis=(0, 1)), jnp.mean(scores, axis=(0, 1))
    expected = SMALL.aux_loss_scale * SMALL.num_memories * jnp.sum(fraction * probability)
    np.testing.assert_allclose(aux, expected, rtol=1e-5)


def test_a_token_leaves_the_memories_it_is_not_routed_to_untouched():
    mixer = MoM(SMALL)
    params, x = mixer_setup(mixer, length=1)
    cache = jax.tree.map(
        lambda a: jax.random.normal(jax.random.key(3), a.shape, a.dtype), mixer.init_cache(2, 1)
    )
    _, new = mixer.apply(params, x, cache=cache)
    _, routed, _ = route(x @ params["params"]["router"]["kernel"].value, SMALL.topk)
    routed = jnp.pad(routed[:, 0], ((0, 0), (0, 1)), constant_values=True)  # [B, M + shared]
    for old, updated in zip(cache, new, strict=True):
        changed = jnp.any(old != updated, axis=tuple(range(2, old.ndim)))
        np.testing.assert_array_equal(changed, routed)


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: MoMConfig(WIDTH, topk=5), "topk"),
        (lambda: MoMConfig(WIDTH, num_memories=0), "num_memories"),
        (lambda: MoMConfig(WIDTH, memory="rwkv"), "memory"),
        (lambda: MoMConfig(WIDTH, impl="sorted"), "impl"),
        (lambda: MoMConfig(WIDTH, op_impl="triton"), "op_impl"),
        (lambda: MoMConfig(WIDTH, head_dim=8, expand_v=0.3), "expand_v"),
        (lambda: MoMConfig(WIDTH, conv_size=0), "conv_size"),
        (lambda: MoMConfig(WIDTH, aux_loss_scale=-1.0), "aux_loss_scale"),
    ],
)
def test_bad_config_names_the_field(make, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        make()
