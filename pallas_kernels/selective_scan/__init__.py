"""Mamba-1's selective scan (S6) as Pallas kernels: a forward and a backward kernel per backend.

Notation: `B T D N G C` are batch, time, channels, state size, groups and chunk length; `g(d)`
is the group of channel `d` (the `D` channels split into `G` contiguous groups of `D / G` that
share `B_t` and `C_t`).

Forward. With `delta: [B, T, D]` already discretized (softplus and bias applied by the op),
`A: [D, N]` real and `<= 0`, and `e_t = exp(delta_t A)`:

    a_t[d, n] = e_t[d, n]               (or 2 e_t[d, n] - 1 with allow_neg_eigval)
    h_t[d, n] = a_t[d, n] h_{t-1}[d, n] + delta_t[d] x_t[d] B_t[g(d), n]
    y_t[d]    = sum_n C_t[g(d), n] h_t[d, n]

The kernels keep the state `h [D_tile, N]` on chip, walk the tokens of a `[B, D_tile]` program
in order, and write `y` and, for the backward pass, the state entering every chunk of `C`
tokens (`[B, T / C, D, N]` float32). No `[B, T, D, N]` array is ever written.

Backward. Let `dy_t` and `dh_T` be the cotangents of `y_t` and of the final state, and let
`g_t = dL/dh_t` be the adjoint state (everything `h_t` influences: `y_t` directly, later
tokens through `h_{t+1} = a_{t+1} h_t + ...`). It obeys the reverse recurrence

    g_t[d, n] = C_t[g(d), n] dy_t[d] + a_{t+1}[d, n] g_{t+1}[d, n],   a_{T+1} g_{T+1} := dh_T

and every input gradient is a local product of `g_t` with forward quantities:

    dC_t[g, n]  = sum_{d in g} dy_t[d] h_t[d, n]
    dB_t[g, n]  = sum_{d in g} g_t[d, n] delta_t[d] x_t[d]
    dx_t[d]     = delta_t[d] sum_n g_t[d, n] B_t[g(d), n]
    ddelta_t[d] = x_t[d] sum_n g_t[d, n] B_t[g(d), n]
                  + sum_n g_t[d, n] h_{t-1}[d, n] (da_t/ddelta)[d, n]
    dA[d, n]    = sum_{b, t} g_t[d, n] h_{t-1}[d, n] (da_t/dA)[d, n]
    dh_0        = a_1 g_1

with `da_t/ddelta = A e_t` and `da_t/dA = delta_t e_t` (both doubled with allow_neg_eigval).
The backward kernel walks the chunks from last to first carrying `g`; for each chunk it first
recomputes the states `h_{t-1}` of the chunk's tokens from the saved entering state (held on
chip: VMEM scratch on TPU, registers on GPU), then walks the chunk's tokens backwards.
`dB`, `dC` (sums over a group's channels) come out per `D` tile, and `dA` (a sum over batch
and time) per program; the wrapper adds the partial sums up.

Padding (done here, in plain JAX, so autodiff slices the gradients back): the time axis to
whole chunks with `x = delta = 0` (then `a = 1` and the input is 0: the state passes through
unchanged, so the final state and all gradients are those of the real tokens), the channels
of every group to whole `D` tiles and, on GPU, the state size to a power of 2, with zeros
(a zero channel or state entry stays zero and gets no gradient that is kept).

`jax.custom_vjp`: no forward-mode autodiff (`jvp`, `jacfwd`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from pallas_kernels import blocks, common
from pallas_kernels.selective_scan import gpu, tpu

KERNEL = "selective_scan"
SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


@dataclasses.dataclass(frozen=True)
class ScanConfig:
    """The static parameters of one padded kernel call (hashable: a `nondiff_argnum`)."""

    backend: str
    groups: int
    chunk: int
    feature: int
    allow_neg_eigval: bool
    interpret: bool
    num_warps: int | None = None
    num_stages: int | None = None


def unsupported(x, delta, A, B, C, h0, backend) -> str | None:
    """A one-line reason why the kernels do not cover these inputs, or None when they do."""
    if reason := common.unknown_backend(backend):
        return reason
    arrays = dict(x=x, delta=delta, A=A, B=B, C=C, h0=h0)
    for name, array in arrays.items():
        dtype = jnp.dtype(array.dtype)
        if jnp.issubdtype(dtype, jnp.complexfloating):
            return f"{name}: complex dtype {dtype} (the kernels keep a real state)"
        if dtype not in SUPPORTED_DTYPES:
            return f"{name}: dtype {dtype} (the kernels take float32 or bfloat16)"
    if x.ndim != 3 or delta.shape != x.shape:
        return f"x, delta: expected equal shapes [B, T, D], got {x.shape} and {delta.shape}"
    batch, length, width = x.shape
    if A.ndim != 2 or A.shape[0] != width:
        return f"A: expected [D, N] with D = {width}, got {A.shape}"
    state_size = A.shape[1]
    if B.ndim != 4 or B.shape[:2] != (batch, length) or B.shape[3] != state_size:
        return f"B: expected [B, T, G, N] = [{batch}, {length}, G, {state_size}], got {B.shape}"
    if C.shape != B.shape:
        return f"C: expected the shape of B, {B.shape}, got {C.shape}"
    if width % B.shape[2]:
        return f"B, C: the D = {width} channels do not split into G = {B.shape[2]} groups"
    if h0.shape != (batch, width, state_size):
        return f"h0: expected [B, D, N] = {(batch, width, state_size)}, got {h0.shape}"
    if length == 0:
        return "x: T = 0 tokens"
    if blocks.block_sizes(backend, KERNEL, state_size, x.dtype) is None:
        return f"A: state size N = {state_size} is above every row of the {backend} block table"
    return None


def selective_scan(
    x: jax.Array,
    delta: jax.Array,
    A: jax.Array,
    B: jax.Array,
    C: jax.Array,
    h0: jax.Array,
    *,
    allow_neg_eigval: bool = False,
    backend: str,
    interpret: bool = False,
    chunk_size: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """The selective scan of the module docstring; returns `(y [B, T, D], final [B, D, N])`.

    Args:
      x, delta: `[B, T, D]`, float32 or bfloat16; `delta` is the discretized step.
      A: `[D, N]`, real, `<= 0`.
      B, C: `[B, T, G, N]`, `G` dividing `D`.
      h0: initial state `[B, D, N]` (float32).
      allow_neg_eigval: decay `2 exp(delta A) - 1` instead of `exp(delta A)`.
      backend: "tpu" or "gpu": which kernels (`tpu.py`, Mosaic; `gpu.py`, Triton).
      interpret: run the kernels in the Pallas interpreter (works on CPU).
      chunk_size: tokens per chunk (the spacing of the saved states); None takes the block
        table's. On TPU a multiple of 16.

    Returns:
      `y` in the dtype of `x` and the final state in float32.
    """
    reason = unsupported(x, delta, A, B, C, h0, backend)
    if reason is not None:
        raise ValueError(reason)
    _, length, width = x.shape
    groups, state_size = B.shape[2:]
    sizes = blocks.block_sizes(backend, KERNEL, state_size, x.dtype)
    chunk = sizes.chunk if chunk_size is None else chunk_size
    if chunk <= 0 or (backend == "tpu" and chunk % tpu.ROWS):
        multiple = f" multiple of {tpu.ROWS}" if backend == "tpu" else ""
        raise ValueError(f"chunk_size: expected a positive{multiple} integer, got {chunk}")
    group_width = width // groups
    if backend == "tpu":
        feature, padded_state = sizes.feature, state_size
    else:
        # A group narrower than the table's tile gets a tile of its own (rounded to a power of
        # 2) rather than mostly padding; the state size is padded to a power of 2 (Triton).
        feature = min(sizes.feature, common.next_power_of_2(group_width))
        padded_state = common.next_power_of_2(state_size)
    config = ScanConfig(
        backend=backend,
        groups=groups,
        chunk=chunk,
        feature=feature,
        allow_neg_eigval=allow_neg_eigval,
        interpret=interpret,
        num_warps=sizes.num_warps,
        num_stages=sizes.num_stages,
    )
    padded_group = common.round_up(group_width, feature)
    pad_channels = functools.partial(_pad_channels, groups=groups, padded_group=padded_group)
    pad_state = functools.partial(common.pad_axis, axis=-1, multiple=padded_state)
    y, final = _scan(
        config,
        pad_channels(common.pad_axis(x, 1, chunk), axis=2),
        pad_channels(common.pad_axis(delta, 1, chunk), axis=2),
        pad_state(pad_channels(A.astype(jnp.float32), axis=0)),
        pad_state(common.pad_axis(B, 1, chunk)),
        pad_state(common.pad_axis(C, 1, chunk)),
        pad_state(pad_channels(h0.astype(jnp.float32), axis=1)),
    )
    y = _unpad_channels(y[:, :length], axis=2, groups=groups, group_width=group_width)
    final = _unpad_channels(final, axis=1, groups=groups, group_width=group_width)
    return y, final[..., :state_size]


def _pad_channels(array: jax.Array, axis: int, groups: int, padded_group: int) -> jax.Array:
    """The `D` axis split into `G` groups, each zero-padded to `padded_group` channels."""
    shape = array.shape
    split = array.reshape(*shape[:axis], groups, shape[axis] // groups, *shape[axis + 1 :])
    split = common.pad_axis(split, axis + 1, padded_group)
    return split.reshape(*shape[:axis], groups * padded_group, *shape[axis + 1 :])


def _unpad_channels(array: jax.Array, axis: int, groups: int, group_width: int) -> jax.Array:
    """The inverse of `_pad_channels`: the first `group_width` channels of every group."""
    shape = array.shape
    split = array.reshape(*shape[:axis], groups, shape[axis] // groups, *shape[axis + 1 :])
    split = jax.lax.slice_in_dim(split, 0, group_width, axis=axis + 1)
    return split.reshape(*shape[:axis], groups * group_width, *shape[axis + 1 :])


def _backend_module(config: ScanConfig):
    return tpu if config.backend == "tpu" else gpu


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _scan(config: ScanConfig, x, delta, A, B, C, h0):
    """The padded scan: `T` a multiple of the chunk, every group a multiple of the D tile."""
    y, _, final = _backend_module(config).forward(config, x, delta, A, B, C, h0)
    return y, final


def _scan_forward(config: ScanConfig, x, delta, A, B, C, h0):
    y, chunk_states, final = _backend_module(config).forward(config, x, delta, A, B, C, h0)
    return (y, final), (x, delta, A, B, C, chunk_states)


def _scan_backward(config: ScanConfig, residuals, cotangents):
    x, delta, A, B, C, chunk_states = residuals
    dy, dfinal = cotangents
    dx, ddelta, dA_per_batch, dB_per_tile, dC_per_tile, dh0 = _backend_module(config).backward(
        config, x, delta, A, B, C, chunk_states, dy, dfinal
    )
    return (
        dx.astype(x.dtype),
        ddelta.astype(delta.dtype),
        dA_per_batch.sum(axis=0).astype(A.dtype),
        _sum_tiles_per_group(dB_per_tile, config.groups).astype(B.dtype),
        _sum_tiles_per_group(dC_per_tile, config.groups).astype(C.dtype),
        dh0,
    )


def _sum_tiles_per_group(per_tile: jax.Array, groups: int) -> jax.Array:
    """`[B, D / D_tile, T, N]` partial sums of the D tiles -> `[B, T, G, N]` sums per group."""
    batch, tiles, length, state_size = per_tile.shape
    per_group = per_tile.reshape(batch, groups, tiles // groups, length, state_size).sum(axis=2)
    return per_group.transpose(0, 2, 1, 3)


_scan.defvjp(_scan_forward, _scan_backward)
