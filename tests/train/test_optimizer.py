"""The optimizer: the learning-rate schedule, the weight-decay mask on every mixer's real
parameters, decoupled decay only where the mask says, and clipping before Adam."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from seqjax.models import MIXERS, LanguageModelConfig, build
from seqjax.train.optimizer import learning_rate_schedule, optimizer, weight_decay_mask

PEAK, FINAL_FRACTION = 1e-3, 0.1
# Named no-decay parameters of the mixers (besides norms, biases and per-layer vectors).
RECURRENCE_NAMES = {"A_log", "D", "log_dt", "log_A_real", "A_imag", "B", "P"} | {
    "Lambda_re", "Lambda_im", "log_step", "nu_log", "theta_log", "gamma_log", "a_param",
}  # fmt: skip


def schedule(decay, warmup_steps=10, total_steps=110):
    return learning_rate_schedule(
        peak=PEAK,
        warmup_steps=warmup_steps,
        total_steps=total_steps,
        decay=decay,
        final_fraction=FINAL_FRACTION,
    )


@pytest.mark.parametrize(
    ("decay", "midpoint", "end"),
    [
        ("cosine", (1 + FINAL_FRACTION) / 2 * PEAK, FINAL_FRACTION * PEAK),
        ("linear", (1 + FINAL_FRACTION) / 2 * PEAK, FINAL_FRACTION * PEAK),
        ("constant", PEAK, PEAK),
    ],
)
def test_schedule_warms_up_linearly_then_decays_to_the_final_fraction(decay, midpoint, end):
    lr = schedule(decay)
    steps = jnp.array([0, 5, 10, 60, 110, 500])
    expected = [0.0, PEAK / 2, PEAK, midpoint, end, end]
    np.testing.assert_allclose(jax.jit(lr)(steps), expected, rtol=1e-6, atol=1e-12)


def test_cosine_schedule_follows_the_half_cosine():
    lr = schedule("cosine")
    progress = 0.25  # step 10 + 25
    cosine = 0.5 * (1 + np.cos(np.pi * progress))
    expected = FINAL_FRACTION * PEAK + (1 - FINAL_FRACTION) * PEAK * cosine
    np.testing.assert_allclose(lr(35), expected, rtol=1e-6)


def test_schedule_without_warmup_starts_at_the_peak():
    np.testing.assert_allclose(schedule("cosine", warmup_steps=0)(0), PEAK, rtol=1e-6)


@pytest.mark.parametrize(
    ("changes", "argument"),
    [
        ({"decay": "exponential"}, "decay"),
        ({"warmup_steps": 200}, "warmup_steps"),
        ({"final_fraction": 1.5}, "final_fraction"),
        ({"peak": 0.0}, "peak"),
    ],
)
def test_schedule_rejects_bad_arguments_by_name(changes, argument):
    arguments = dict(peak=PEAK, warmup_steps=10, total_steps=100, decay="cosine")
    with pytest.raises(ValueError, match=f"^{argument}: expected"):
        learning_rate_schedule(**{**arguments, **changes})


@functools.cache
def boxed_shapes(mixer: str):
    """The abstract boxed parameters of a two-layer model of `mixer` (scanned when it can be)."""
    config = LanguageModelConfig(vocab_size=37, width=128, layers=(mixer, mixer))
    model = build(config)
    tokens = jnp.zeros((1, 8), jnp.int32)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), tokens))["params"]


def flat_mask(params) -> dict[str, tuple[bool, int]]:
    """`path -> (decayed, axes per layer)` of every parameter."""
    mask = weight_decay_mask(params)
    is_box = lambda x: isinstance(x, nn.Partitioned)  # noqa: E731
    leaves = jax.tree_util.tree_leaves_with_path(params, is_leaf=is_box)
    decisions = jax.tree.leaves(mask)
    flat = {}
    for (path, leaf), decided in zip(leaves, decisions, strict=True):
        rank = leaf.value.ndim - leaf.names.count("layers")
        flat["/".join(key.key for key in path)] = (decided, rank)
    return flat


@pytest.mark.parametrize("mixer", sorted(MIXERS))
def test_mask_spares_norms_biases_and_recurrence_parameters(mixer):
    flat = flat_mask(boxed_shapes(mixer))
    assert flat["backbone/embed/embedding"][0]
    kernels = [decided for path, (decided, _) in flat.items() if path.endswith("/kernel")]
    assert len(kernels) > 1 and all(kernels), "projection and convolution kernels decay"
    for path, (decided, rank) in flat.items():
        *modules, name = path.split("/")
        spared = (
            rank <= 1
            or any("norm" in module for module in modules)
            or name in ("bias", "b")
            or name.endswith("_bias")
            or name in RECURRENCE_NAMES
            or name.startswith("lower_bounds_")
        )
        assert decided == (not spared), f"{path}: decayed = {decided}, rank {rank}"


@pytest.mark.parametrize("mixer", ["mamba", "gated_delta_net", "hgrn", "s4", "s5", "lru"])
def test_mask_names_the_gates_and_eigenvalues(mixer):
    flat = flat_mask(boxed_shapes(mixer))
    spared = {path.rsplit("/", 1)[-1] for path, (decided, _) in flat.items() if not decided}
    expected = {
        "mamba": {"A_log", "dt_bias", "D"},
        "gated_delta_net": {"A_log", "dt_bias"},
        "hgrn": {"lower_bounds_hgrn"},
        "s4": {"log_dt", "log_A_real", "A_imag", "B", "P", "D"},
        "s5": {"Lambda_re", "Lambda_im", "log_step", "B", "D"},
        "lru": {"nu_log", "theta_log", "gamma_log", "B", "D"},
    }[mixer]
    assert expected <= spared


@pytest.mark.parametrize("mixer", sorted(MIXERS))
def test_mask_of_plain_arrays_equals_the_mask_of_boxed_ones(mixer):
    boxed = boxed_shapes(mixer)
    plain = jax.tree.leaves(weight_decay_mask(nn.unbox(boxed)))
    assert plain == jax.tree.leaves(weight_decay_mask(boxed))


def test_mask_keeps_the_boxes_and_their_names():
    params = {"dense": {"kernel": nn.Partitioned(jnp.zeros((3, 4, 5)), ("layers", "embed", "mlp"))}}
    mask = weight_decay_mask(params)
    assert mask["dense"]["kernel"] == nn.Partitioned(True, ("layers", "embed", "mlp"))


def test_mask_does_not_count_the_stacked_layer_axis():
    vector = {"scale_vector": nn.Partitioned(jnp.zeros((4, 8)), ("layers", "embed"))}
    assert not weight_decay_mask(vector)["scale_vector"].value
    assert weight_decay_mask({"matrix": jnp.zeros((4, 8))})["matrix"]
    assert not weight_decay_mask({"vector": jnp.zeros((8,))})["vector"]


def make_optimizer(**changes):
    arguments = dict(
        learning_rate=0.1,
        weight_decay=0.5,
        warmup_steps=0,
        total_steps=10,
        decay="constant",
    )
    return optimizer(**{**arguments, **changes})


def test_zero_gradient_step_decays_only_masked_parameters():
    params = jax.tree.map(lambda x: jnp.ones(x.shape, x.dtype), nn.unbox(boxed_shapes("mamba")))
    tx = make_optimizer()
    state = jax.jit(tx.init)(params)
    updates, _ = jax.jit(tx.update)(jax.tree.map(jnp.zeros_like, params), state, params)
    mask = weight_decay_mask(params)
    for decided, update in zip(jax.tree.leaves(mask), jax.tree.leaves(updates), strict=True):
        np.testing.assert_allclose(update, -0.1 * 0.5 if decided else 0.0, rtol=1e-6)
    assert any(jax.tree.leaves(mask)) and not all(jax.tree.leaves(mask))


def test_state_of_boxed_parameters_unboxes_to_the_state_of_plain_ones():
    boxed = boxed_shapes("gated_delta_net")
    tx = make_optimizer()
    from_boxed = jax.eval_shape(lambda: nn.unbox(tx.init(boxed)))
    from_plain = jax.eval_shape(lambda: tx.init(nn.unbox(boxed)))
    assert jax.tree.structure(from_boxed) == jax.tree.structure(from_plain)


@pytest.mark.parametrize("norm", [100.0, 0.5])
def test_gradients_reach_adam_clipped_to_the_global_norm(norm):
    params = {"a": jnp.ones((3, 4)), "b": jnp.ones((5, 2))}
    direction = {"a": jnp.full((3, 4), 1.0), "b": jnp.full((5, 2), -2.0)}
    grads = jax.tree.map(lambda g: g * norm / optax.tree.norm(direction), direction)
    tx = make_optimizer(clip_norm=1.0, b1=0.9)
    _, state = jax.jit(tx.update)(grads, tx.init(params), params)
    first_moment = optax.tree_utils.tree_get(state, "mu")
    expected = jax.tree.map(lambda g: 0.1 * g * min(1.0, 1.0 / norm), grads)
    for moment, want in zip(jax.tree.leaves(first_moment), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(moment, want, rtol=1e-5)


def test_optimizer_rejects_a_bad_clip_norm_by_name():
    with pytest.raises(ValueError, match=r"^clip_norm: expected"):
        make_optimizer(clip_norm=0.0)
