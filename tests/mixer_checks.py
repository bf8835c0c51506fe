"""The mixer contract of `seqjax/nn/mixer.py`, checked on one configured mixer instance.

`check_mixer(mixer)` runs all of it; each part compiles the mixer a few times, so the default
suite checks one representative config per mixer and leaves variants to `slow`:

- forward and gradient (parameters and input) are finite at init, and every parameter gets a
  nonzero gradient (a parameter that never receives one is dead);
- a prefill of `PREFILL` tokens and then decoding token by token from `init_cache` equals the
  parallel pass, in a row whose prefill packs two segments (decoding continues the second) and
  in a plain row;
- a row of packed segments equals the segments run separately.
"""

from __future__ import annotations

import itertools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from contract import assert_trees_close

WIDTH, LENGTH, PREFILL = 32, 13, 6
CUTS = (0, 4, 5, LENGTH)


def mixer_setup(mixer: Any, batch: int = 2, length: int = LENGTH, width: int = WIDTH):
    """`(params, x)`: parameters from `mixer.init` and inputs `x: [B, T, D]`."""
    x = jax.random.normal(jax.random.key(0), (batch, length, width))
    return mixer.init(jax.random.key(1), x), x


def check_finite(mixer: Any, params: Any, x: jax.Array, name: str) -> None:
    def loss(params, x):
        y, _ = mixer.apply(params, x)
        return jnp.sum(y.astype(jnp.float32) ** 2)

    y, _ = jax.jit(mixer.apply)(params, x)
    assert y.shape == x.shape, f"{name}: output shape {y.shape} != {x.shape}"
    assert bool(jnp.all(jnp.isfinite(y))), f"{name}: output not finite"
    grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)
    for path, leaf in jax.tree_util.tree_leaves_with_path(grads):
        where = f"{name} gradient {jax.tree_util.keystr(path)}"
        assert bool(jnp.all(jnp.isfinite(leaf))), f"{where} not finite"
    for path, leaf in jax.tree_util.tree_leaves_with_path(grads[0]):
        where = f"{name} gradient {jax.tree_util.keystr(path)}"
        assert float(jnp.abs(leaf).max()) > 0, f"{where} is zero"


def check_decode(mixer: Any, params: Any, x: jax.Array, name: str, tolerance: float = 1e-4) -> None:
    batch, length = x.shape[:2]
    segment_ids = jnp.zeros((batch, length), jnp.int32).at[0, 2:].set(1)
    expected, _ = jax.jit(lambda p, x, s: mixer.apply(p, x, segment_ids=s))(params, x, segment_ids)
    prefill = jax.jit(lambda p, x, c, s: mixer.apply(p, x, cache=c, segment_ids=s))
    apply = jax.jit(lambda p, x, c: mixer.apply(p, x, cache=c))
    cache = mixer.init_cache(batch, length, x.dtype)
    y, cache = prefill(params, x[:, :PREFILL], cache, segment_ids[:, :PREFILL])
    outputs = [y]
    for t in range(PREFILL, length):
        y, cache = apply(params, x[:, t : t + 1], cache)
        outputs.append(y)
    assert_trees_close(jnp.concatenate(outputs, axis=1), expected, tolerance, f"{name} decode")


def check_packed(mixer: Any, params: Any, x: jax.Array, name: str, tolerance: float = 1e-4) -> None:
    x = x[:1]
    segment_ids = jnp.asarray(np.repeat(np.arange(len(CUTS) - 1), np.diff(CUTS))[None])
    packed, _ = jax.jit(lambda p, x, s: mixer.apply(p, x, segment_ids=s))(params, x, segment_ids)
    apply = jax.jit(mixer.apply)
    for start, stop in itertools.pairwise(CUTS):
        alone, _ = apply(params, x[:, start:stop])
        assert_trees_close(packed[:, start:stop], alone, tolerance, f"{name} [{start}, {stop})")


def check_mixer(mixer: Any, name: str, tolerance: float = 1e-4, width: int = WIDTH) -> None:
    """The whole contract for `mixer` (whose config has `width`) on `[2, LENGTH, width]`."""
    params, x = mixer_setup(mixer, width=width)
    check_finite(mixer, params, x, name)
    check_decode(mixer, params, x, name, tolerance)
    check_packed(mixer, params, x, name, tolerance)
