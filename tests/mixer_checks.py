"""The mixer contract of `seqjax/nn/mixer.py`, checked on one configured mixer instance.

`check_mixer(mixer, name)` runs all of it in four compilations (the default suite checks one
representative config per mixer and leaves variants to `slow`):

- every parameter carries logical axis names (it can be sharded by rules);
- forward and gradient (parameters and input) are finite at init, and every parameter gets a
  nonzero gradient (a parameter that never receives one is dead);
- packed segments equal separate sequences: row 0 packs the segments `CUTS`; each segment run
  alone is, for a causal mixer, the start of an unpacked row that begins where the segment
  does (rows of the same call with no segments); a mixer that is not causal everywhere
  (JRT-RNN's prefix) runs each segment as its own call instead;
- a prefill of `PREFILL` tokens (in row 0, two segments and the start of a third) and then
  decoding token by token from `init_cache` equals the parallel pass.
"""

from __future__ import annotations

import itertools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from contract import assert_trees_close

WIDTH, LENGTH, PREFILL = 32, 13, 6
CUTS = (0, 4, 5, LENGTH)
BATCH = len(CUTS) - 1  # row 0 packed; the others plain


def mixer_setup(mixer: Any, batch: int = 2, length: int = LENGTH, width: int = WIDTH):
    """`(params, x)`: parameters from `mixer.init` and inputs `x: [B, T, D]`."""
    x = jax.random.normal(jax.random.key(0), (batch, length, width))
    return mixer.init(jax.random.key(1), x), x


def check_finite(mixer: Any, params: Any, x: jax.Array, name: str) -> None:
    boxed = jax.tree_util.tree_leaves_with_path(
        params, is_leaf=lambda leaf: isinstance(leaf, nn.Partitioned)
    )
    for path, leaf in boxed:
        where = f"{name} parameter {jax.tree_util.keystr(path)}"
        assert isinstance(leaf, nn.Partitioned), f"{where} has no logical axis names"

    def loss(params, x):
        y, _ = mixer.apply(params, x)
        return jnp.sum(y.astype(jnp.float32) ** 2), y

    (_, y), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)
    assert y.shape == x.shape, f"{name}: output shape {y.shape} != {x.shape}"
    assert bool(jnp.all(jnp.isfinite(y))), f"{name}: output not finite"
    for path, leaf in jax.tree_util.tree_leaves_with_path(grads):
        where = f"{name} gradient {jax.tree_util.keystr(path)}"
        assert bool(jnp.all(jnp.isfinite(leaf))), f"{where} not finite"
    for path, leaf in jax.tree_util.tree_leaves_with_path(grads[0]):
        where = f"{name} gradient {jax.tree_util.keystr(path)}"
        assert float(jnp.abs(leaf).max()) > 0, f"{where} is zero"


def packed_ids(batch: int, length: int) -> jax.Array:
    """`[B, T]`: row 0 holds the segments `CUTS`, the other rows one segment each."""
    ids = np.zeros((batch, length), np.int32)
    ids[0] = np.repeat(np.arange(len(CUTS) - 1), np.diff(CUTS))
    return jnp.asarray(ids)


def check_packed(
    mixer: Any, params: Any, x: jax.Array, name: str, tolerance: float, causal: bool
) -> jax.Array:
    """Returns the packed pass (the parallel pass decoding must equal)."""
    batch, length = x.shape[:2]
    segmented = jax.jit(lambda p, x, s: mixer.apply(p, x, segment_ids=s)[0])
    packed = segmented(params, x, packed_ids(batch, length))
    if causal:
        starts = CUTS[:-1]
        rows = jnp.stack([jnp.roll(x[0], -start, axis=0) for start in starts])
        plain = segmented(params, rows, jnp.zeros((batch, length), jnp.int32))
        alone = [
            plain[i : i + 1, : stop - start]
            for i, (start, stop) in enumerate(itertools.pairwise(CUTS))
        ]
    else:
        alone = [
            mixer.apply(params, x[:1, start:stop])[0] for start, stop in itertools.pairwise(CUTS)
        ]
    for (start, stop), expected in zip(itertools.pairwise(CUTS), alone, strict=True):
        assert_trees_close(packed[:1, start:stop], expected, tolerance, f"{name} [{start}, {stop})")
    return packed


def check_decode(
    mixer: Any,
    params: Any,
    x: jax.Array,
    expected: jax.Array,
    name: str,
    tolerance: float,
    prefill_length: int = PREFILL,
) -> None:
    batch, length = x.shape[:2]
    prefill = jax.jit(lambda p, x, c, s: mixer.apply(p, x, cache=c, segment_ids=s))
    step = jax.jit(lambda p, x, c: mixer.apply(p, x, cache=c))
    cache = mixer.init_cache(batch, length, x.dtype)
    ids = packed_ids(batch, length)[:, :prefill_length]
    y, cache = prefill(params, x[:, :prefill_length], cache, ids)
    outputs = [y]
    for t in range(prefill_length, length):
        y, cache = step(params, x[:, t : t + 1], cache)
        outputs.append(y)
    assert_trees_close(jnp.concatenate(outputs, axis=1), expected, tolerance, f"{name} decode")


def check_mixer(
    mixer: Any,
    name: str,
    tolerance: float = 1e-4,
    width: int = WIDTH,
    causal: bool = True,
    prefill_length: int = PREFILL,
) -> None:
    """The whole contract for `mixer` (whose config has `width`) on `[BATCH, LENGTH, width]`;
    a non-causal mixer sets `causal=False` (and JRT-RNN a prefill covering its prefixes)."""
    params, x = mixer_setup(mixer, batch=BATCH, width=width)
    check_finite(mixer, params, x, name)
    packed = check_packed(mixer, params, x, name, tolerance, causal)
    check_decode(mixer, params, x, packed, name, tolerance, prefill_length)
