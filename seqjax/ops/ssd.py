"""Mamba-2's SSD (state-space duality), Dao & Gu, "Transformers are SSMs: Generalized Models and
Efficient Algorithms Through Structured State Space Duality" (2024), as `mamba_ssm` computes it.

Per head `h` of `H`, with head dimension `P`, state size `N`, and the heads split into `G`
equal, contiguous groups that share `B_t` and `C_t` (head `h` reads group `h // (H / G)`):

    dt_t = softplus(dt_t + dt_bias_h)                                  (dt_softplus=True)
    a_t  = exp(dt_t A_h)                                               A_h <= 0: a scalar decay
    H_t  = a_t H_{t-1} + B_t (dt_t x_t)^T                              H_t: [N, P]
    y_t  = H_t^T C_t + D_h x_t

This is `simple_gla` (`seqjax.ops.gla`) with `q = C`, `k = B`, `v = dt x`, log-decay
`g = dt A` and `scale = 1`: every impl here is the matching impl of `simple_gla`, and the
state is its `[B, H, K, V] = [B, H, N, P]` matrix (`mamba_ssm` stores the transpose,
`[B, H, P, N]`). `"chunked"` supports reverse-mode differentiation only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from seqjax import checks
from seqjax.ops import gla
from seqjax.scan.linear_recurrence import accumulation_dtype

SSDImpl = gla.GLAImpl
SSD_IMPLS: tuple[str, ...] = gla.GLA_IMPLS
DEFAULT_CHUNK_SIZE = gla.DEFAULT_CHUNK_SIZE


def ssd(
    x: jax.Array,
    dt: jax.Array,
    A: jax.Array,
    B: jax.Array,
    C: jax.Array,
    D: jax.Array | None = None,
    dt_bias: jax.Array | None = None,
    initial_state: jax.Array | None = None,
    *,
    dt_softplus: bool = True,
    segment_ids: jax.Array | None = None,
    impl: SSDImpl = "auto",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[jax.Array, jax.Array]:
    """Mamba-2's SSD over `x: [B, T, H, P]`; returns `(y [B, T, H, P], final_state [B, H, N, P])`.

    Args:
      x: inputs `[B, T, H, P]`.
      dt: step sizes before bias and `softplus`, `[B, T, H]`.
      A: per-head decay rates `[H]`, `A <= 0` (Mamba-2's `A = -exp(A_log)`; checked when
        concrete).
      B: input projections `[B, T, G, N]`, `G` dividing `H`.
      C: output projections `[B, T, G, N]`.
      D: skip connection `[H]`; None means none.
      dt_bias: `[H]`, added to `dt` before `softplus`; None means zero.
      initial_state: `[B, H, N, P]`; None means zeros.
      dt_softplus: apply `softplus` to `dt + dt_bias`; without it, `dt + dt_bias` must be
        `>= 0` (checked when concrete).
      segment_ids: `[B, T]` ints; the state restarts from zero at every new segment.
      impl: `"reference"`, `"chunked"`, `"parallel"`, `"pallas"` or `"auto"`, as in
        `simple_gla`.
      chunk_size: tokens per chunk of `"chunked"`.

    Returns:
      `y` in the dtype of `x`, and the state after each row's last token in float32 (float64
      for float64 inputs).
    """
    _validate(dict(x=x, dt=dt, A=A, B=B, C=C, D=D, dt_bias=dt_bias, initial_state=initial_state))
    q, k, v, g, acc = as_simple_gla(x, dt, A, B, C, dt_bias, dt_softplus)
    y, final = gla.simple_gla(
        q,
        k,
        v,
        g,
        scale=1.0,
        initial_state=initial_state,
        segment_ids=segment_ids,
        impl=impl,
        chunk_size=chunk_size,
    )
    return add_skip(y, x, D, acc).astype(x.dtype), final


def ssd_step(
    x_t: jax.Array,
    dt_t: jax.Array,
    A: jax.Array,
    B_t: jax.Array,
    C_t: jax.Array,
    D: jax.Array | None = None,
    dt_bias: jax.Array | None = None,
    state: jax.Array | None = None,
    *,
    dt_softplus: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """One token of `ssd`, arguments in its order: `x_t: [B, H, P]`, `dt_t: [B, H]`,
    `B_t, C_t: [B, G, N]`, `state: [B, H, N, P]` or None (zeros)
    -> `(y_t [B, H, P], new_state [B, H, N, P])`."""
    _validate(dict(x_t=x_t, dt_t=dt_t, A=A, B_t=B_t, C_t=C_t, D=D, dt_bias=dt_bias, state=state))
    q_t, k_t, v_t, g_t, acc = as_simple_gla(x_t, dt_t, A, B_t, C_t, dt_bias, dt_softplus)
    if state is None:
        state = jnp.zeros((*k_t.shape, x_t.shape[-1]), acc)
    y_t, state = gla.simple_gla_step(q_t, k_t, v_t, g_t, state, scale=1.0)
    return add_skip(y_t, x_t, D, acc).astype(x_t.dtype), state


def ssd_chunk_states(
    x: jax.Array,
    dt: jax.Array,
    A: jax.Array,
    B: jax.Array,
    *,
    dt_bias: jax.Array | None = None,
    dt_softplus: bool = True,
    initial_state: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> jax.Array:
    """The states entering every chunk of `ssd`, `[B, num_chunks, H, N, P]`.

    State `n` is the state after token `n * chunk_size - 1` (state 0 is `initial_state`);
    `C` and `D` do not enter the state, so they are not arguments.
    """
    _validate(dict(x=x, dt=dt, A=A, B=B, dt_bias=dt_bias, initial_state=initial_state))
    _, k, v, g, _ = as_simple_gla(x, dt, A, B, None, dt_bias, dt_softplus)
    return gla.chunk_states(
        k, v, g, initial_state=initial_state, segment_ids=segment_ids, chunk_size=chunk_size
    )


# ----------------------------------------------------------------------------- the mapping


def as_simple_gla(
    x: jax.Array,
    dt: jax.Array,
    A: jax.Array,
    B: jax.Array,
    C: jax.Array | None,
    dt_bias: jax.Array | None,
    dt_softplus: bool,
) -> tuple[jax.Array | None, jax.Array, jax.Array, jax.Array, jnp.dtype]:
    """`(q, k, v, g, acc)` of the equivalent `simple_gla`: `q = C` and `k = B` repeated to the
    heads of their groups, `v = dt x`, `g = dt A`; step sizes, decays and `v` in `acc`, the
    accumulation dtype. Works with and without the time axis (`[B, (T,) H, ...]`)."""
    dtypes = [a.dtype for a in (x, dt, A, dt_bias) if a is not None]
    acc = accumulation_dtype(*dtypes)
    dt = dt.astype(acc)
    if dt_bias is not None:
        dt = dt + dt_bias.astype(acc)
    if dt_softplus:
        dt = jax.nn.softplus(dt)
    else:
        checks.check_values("dt", dt >= 0, "step sizes dt + dt_bias >= 0 when dt_softplus=False")
    heads_per_group = x.shape[-2] // B.shape[-2]
    q = None if C is None else jnp.repeat(C, heads_per_group, axis=-2)
    k = jnp.repeat(B, heads_per_group, axis=-2)
    return q, k, x.astype(acc) * dt[..., None], dt * A.astype(acc), acc


def add_skip(y: jax.Array, x: jax.Array, D: jax.Array | None, acc: jnp.dtype) -> jax.Array:
    """`y + D_h x` in `acc` (just `y` when `D` is None)."""
    y = y.astype(acc)
    return y if D is None else y + D.astype(acc)[:, None] * x.astype(acc)


_LAYOUTS = {
    "x": "B T H P",
    "x_t": "B H P",
    "dt": "B T H",
    "dt_t": "B H",
    "A": "H",
    "B": "B T G N",
    "B_t": "B G N",
    "C": "B T G N",
    "C_t": "B G N",
    "D": "H",
    "dt_bias": "H",
    "initial_state": "B H N P",
    "state": "B H N P",
}


def _validate(arrays: dict[str, jax.Array | None]) -> None:
    """Checks the shapes, dtypes and `A <= 0` of the arguments of `ssd` or `ssd_step`, given
    by name (`x` or `x_t`, ...); None means an omitted optional argument."""
    dims = checks.Dims()
    for name, array in arrays.items():
        if array is not None:
            dims.check(name, array, _LAYOUTS[name])
            checks.check_floating(name, array)
    heads, groups = dims.sizes["H"], dims.sizes["G"]
    if heads % groups:
        projection = "B_t" if "B_t" in arrays else "B"
        raise ValueError(
            f"{projection}: the H = {heads} heads do not split into G = {groups} equal groups "
            "(H % G must be 0)"
        )
    checks.check_values("A", arrays["A"] <= 0, "A <= 0 (Mamba-2's A = -exp(A_log))")
