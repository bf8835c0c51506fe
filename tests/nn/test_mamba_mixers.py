"""The Mamba and Mamba-2 mixers: the mixer contract (`mixer_checks`), the block equations
against a token loop written from the parameters, mamba_ssm's inits and parameter count, bad
configs, and Mamba-2's Stuffed Mamba mitigations."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from contract import assert_trees_close
from mixer_checks import WIDTH, check_mixer, mixer_setup

from seqjax.nn.mamba import Mamba, MambaConfig
from seqjax.nn.mamba2 import Mamba2, Mamba2Config

# One representative config per mixer runs by default; the variants are `slow`.
MIXERS = {
    "mamba": Mamba(MambaConfig(WIDTH, state_size=4, chunk_size=8)),
    "mamba2": Mamba2(Mamba2Config(WIDTH, state_size=8, head_dim=16, chunk_size=8)),
}
MITIGATED = dict(max_decay=0.5, max_state_norm=0.3)
VARIANTS = {
    "mamba_neg_eigval": Mamba(
        MambaConfig(
            WIDTH,
            state_size=4,
            dt_rank=3,
            dt_scale=0.5,
            allow_neg_eigval=True,
            conv_bias=False,
            use_bias=True,
            conv_size=3,
            expand=1,
            impl="reference",
        )
    ),
    "mamba2_groups": Mamba2(
        Mamba2Config(
            WIDTH,
            state_size=8,
            head_dim=8,
            num_groups=2,
            conv_bias=False,
            use_bias=True,
            a_init_range=(1.0, 4.0),
            impl="parallel",
        )
    ),
    "mamba2_decay_clamp": Mamba2(
        Mamba2Config(WIDTH, state_size=8, head_dim=16, max_decay=0.5, mitigate_without_cache=True)
    ),
    "mamba2_mitigated": Mamba2(
        Mamba2Config(WIDTH, state_size=8, head_dim=16, mitigate_without_cache=True, **MITIGATED)
    ),
}


@pytest.mark.parametrize("name", list(MIXERS))
def test_mixer_contract(name):
    check_mixer(MIXERS[name], name)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(VARIANTS))
def test_mixer_variant_contract(name):
    check_mixer(VARIANTS[name], name)


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: MambaConfig(WIDTH, state_size=0), "state_size"),
        (lambda: MambaConfig(WIDTH, dt_rank=0), "dt_rank"),
        (lambda: MambaConfig(WIDTH, dt_min=0.2), "dt_max"),
        (lambda: MambaConfig(WIDTH, impl="cuda"), "impl"),
        (lambda: Mamba2Config(WIDTH, head_dim=48), "head_dim"),
        (lambda: Mamba2Config(WIDTH, head_dim=16, num_groups=3), "num_groups"),
        (lambda: Mamba2Config(WIDTH, a_init_range=(0.0, 16.0)), "a_init_range"),
        (lambda: Mamba2Config(WIDTH, max_decay=1.0), "max_decay"),
        (lambda: Mamba2Config(WIDTH, max_state_norm=0.0), "max_state_norm"),
    ],
)
def test_bad_config_names_the_field(make, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        make()


# ----------------------------------------------------------------------------- the equations


def causal_conv_silu(h, kernel, bias):
    """`silu(sum_j kernel[j] h_{t - (W - 1 - j)} + bias)` with zeros before the start."""
    width, length = kernel.shape[0], h.shape[1]
    padded = jnp.pad(h, ((0, 0), (width - 1, 0), (0, 0)))
    y = sum(padded[:, j : j + length] * kernel[j] for j in range(width))
    return jax.nn.silu(y if bias is None else y + bias)


def mamba_block(p, x, config):
    """Mamba's block as mamba_ssm's `step` computes it, one token at a time."""
    inner, rank, size = config.inner_width, config.rank, config.state_size
    xz = x @ p["in_proj"]["kernel"].reshape(x.shape[-1], 2 * inner)
    u = causal_conv_silu(xz[..., :inner], p["conv"]["kernel"], p["conv"].get("bias"))
    z = xz[..., inner:]
    dt, B, C = jnp.split(u @ p["x_proj"]["kernel"], [rank, rank + size], axis=-1)
    delta = jax.nn.softplus(dt @ p["dt_proj"]["kernel"] + p["dt_bias"])
    A = -jnp.exp(p["A_log"])
    h = jnp.zeros((x.shape[0], inner, size))
    ys = []
    for t in range(x.shape[1]):
        decay = jnp.exp(delta[:, t, :, None] * A)
        decay = 2 * decay - 1 if config.allow_neg_eigval else decay
        h = decay * h + (delta[:, t] * u[:, t])[..., None] * B[:, t, None, :]
        y = jnp.sum(h * C[:, t, None, :], axis=-1) + p["D"] * u[:, t]
        ys.append(y * jax.nn.silu(z[:, t]))
    return jnp.stack(ys, axis=1) @ p["out_proj"]["kernel"]


def mamba2_block(p, x, config):
    """Mamba-2's block as mamba_ssm's `step` computes it, one token at a time."""
    batch, length = x.shape[:2]
    heads, groups, size, head_dim = (
        config.num_heads,
        config.num_groups,
        config.state_size,
        config.head_dim,
    )
    streams = {
        name: causal_conv_silu(
            x @ p[f"{name}_proj"]["kernel"], p[f"{name}_conv"]["kernel"], p[f"{name}_conv"]["bias"]
        )
        for name in "xBC"
    }
    u = streams["x"].reshape(batch, length, heads, head_dim)
    group = np.arange(heads) // (heads // groups)  # the group of each head
    B = streams["B"].reshape(batch, length, groups, size)[:, :, group]
    C = streams["C"].reshape(batch, length, groups, size)[:, :, group]
    delta = jax.nn.softplus(x @ p["dt_proj"]["kernel"] + p["dt_bias"])
    decay = jnp.exp(delta * -jnp.exp(p["A_log"]))
    state = jnp.zeros((batch, heads, size, head_dim))
    ys = []
    for t in range(length):
        write = B[:, t, :, :, None] * (delta[:, t, :, None] * u[:, t])[:, :, None, :]
        state = decay[:, t, :, None, None] * state + write
        ys.append(jnp.einsum("bhnp,bhn->bhp", state, C[:, t]) + p["D"][:, None] * u[:, t])
    y = jnp.stack(ys, axis=1).reshape(batch, length, -1)
    gated = (y * jax.nn.silu(x @ p["z_proj"]["kernel"])).reshape(batch, length, groups, -1)
    normed = gated / jnp.sqrt(jnp.mean(gated**2, axis=-1, keepdims=True) + config.norm_eps)
    normed = normed.reshape(batch, length, -1) * p["norm"]["norm"]["weight"]
    return normed @ p["out_proj"]["kernel"]


@pytest.mark.parametrize(
    "mixer, block",
    [
        (Mamba(MambaConfig(WIDTH, state_size=4, allow_neg_eigval=True)), mamba_block),
        (Mamba2(Mamba2Config(WIDTH, state_size=8, head_dim=8, num_groups=2)), mamba2_block),
    ],
    ids=["mamba", "mamba2"],
)
def test_mixer_computes_its_block_equations(mixer, block):
    params, x = mixer_setup(mixer, length=7)
    y, _ = jax.jit(mixer.apply)(params, x)
    with jax.default_matmul_precision("highest"):
        expected = block(nn.meta.unbox(params)["params"], x, mixer.config)
    assert_trees_close(y, expected, 1e-4, type(mixer).__name__)


# ----------------------------------------------------------------------------- inits, sizes


def test_mamba_init_follows_mamba_ssm():
    config = MambaConfig(WIDTH, state_size=4, dt_scale=2.0)
    params, _ = mixer_setup(Mamba(config))
    p = nn.meta.unbox(params)["params"]
    a_log = np.broadcast_to(np.log(np.arange(1, 5)), (config.inner_width, 4))
    np.testing.assert_allclose(p["A_log"], a_log, rtol=1e-6)
    np.testing.assert_array_equal(p["D"], 1.0)
    dt = jax.nn.softplus(p["dt_bias"])
    assert bool(jnp.all((dt >= config.dt_min * 0.999) & (dt <= config.dt_max * 1.001)))
    bound = config.rank**-0.5 * config.dt_scale
    assert float(jnp.abs(p["dt_proj"]["kernel"]).max()) <= bound
    assert float(jnp.abs(p["dt_proj"]["kernel"]).max()) > 0.5 * bound


def test_mamba2_init_follows_mamba_ssm():
    config = Mamba2Config(WIDTH, state_size=8, head_dim=4)
    params, _ = mixer_setup(Mamba2(config))
    p = nn.meta.unbox(params)["params"]
    A = jnp.exp(p["A_log"])
    assert p["A_log"].shape == (config.num_heads,)
    assert bool(jnp.all((A >= 1.0) & (A <= 16.0)))
    np.testing.assert_array_equal(p["D"], 1.0)
    dt = jax.nn.softplus(p["dt_bias"])
    assert bool(jnp.all((dt >= config.dt_min * 0.999) & (dt <= config.dt_max * 1.001)))


def test_mamba2_parameter_count_matches_mamba_ssm():
    """One mamba2-130m layer (d_model 768, N 128, P 64, one group): in_proj [768, 3352], conv
    over 1792 channels with bias, dt_bias, A_log and D per head, norm [1536], out_proj."""
    mixer = Mamba2(Mamba2Config(768))
    shapes = jax.eval_shape(lambda: mixer.init(jax.random.key(0), jnp.zeros((1, 1, 768))))
    count = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(shapes))
    assert count == 768 * 3352 + 1792 * 5 + 3 * 24 + 1536 + 1536 * 768


# ----------------------------------------------------------------------------- mitigations


def mamba2(**options):
    return Mamba2(Mamba2Config(WIDTH, state_size=8, head_dim=16, chunk_size=8, **options))


def prefill(mixer, params, x):
    """A cached call from the empty cache: the inference path."""
    cache = mixer.init_cache(x.shape[0], x.shape[1], x.dtype)
    return jax.jit(lambda p, x, c: mixer.apply(p, x, cache=c))(params, x, cache)


def test_mitigations_apply_with_a_cache_and_without_one_only_when_asked():
    plain, mitigated = mamba2(), mamba2(**MITIGATED)
    always = mamba2(mitigate_without_cache=True, **MITIGATED)
    params, x = mixer_setup(plain)
    without_cache, _ = jax.jit(mitigated.apply)(params, x)
    assert_trees_close(without_cache, jax.jit(plain.apply)(params, x)[0], 1e-5, "training")
    with_cache, _ = prefill(mitigated, params, x)
    assert_trees_close(with_cache, jax.jit(always.apply)(params, x)[0], 1e-5, "inference")
    assert float(jnp.abs(with_cache - without_cache).max()) > 1e-3


def test_state_normalization_bounds_every_head_state():
    params, x = mixer_setup(mamba2())
    x = 10 * x
    _, cache = prefill(mamba2(), params, x)
    norms = jnp.sqrt(jnp.sum(cache.state**2, axis=(-2, -1)))
    assert float(norms.min()) > 1.0  # the bound below bites
    _, cache = prefill(mamba2(max_state_norm=1.0), params, x)
    norms = jnp.sqrt(jnp.sum(cache.state**2, axis=(-2, -1)))
    assert float(norms.max()) <= 1.0 + 1e-5


def test_small_max_decay_forgets_tokens_beyond_the_convolution():
    """With `a_t <= 1e-6` the state after the last token holds only that token's write, which
    reads the last `conv_size` inputs: earlier inputs no longer matter."""
    params, x = mixer_setup(mamba2())
    reach = mamba2().config.conv_size
    changed = x.at[:, :-reach].add(jax.random.normal(jax.random.key(5), x[:, :-reach].shape))
    for options, forgets in (({}, False), ({"max_decay": 1e-6}, True)):
        mixer = mamba2(**options)
        state = prefill(mixer, params, x)[1].state
        other = prefill(mixer, params, changed)[1].state
        difference = float(jnp.abs(state - other).max() / jnp.abs(state).max())
        assert (difference < 1e-4) == forgets, (options, difference)
