"""Mamba's selective scan (S6), Gu & Dao (2023), as the CUDA scan of `mamba_ssm` computes it.

Per channel `d` of `D` and state entry `n` of `N`, with the channels split into `G` equal,
contiguous groups that share `B_t` and `C_t` (`G = 1`: `B, C: [B, T, N]`):

    delta_t = softplus(dt_t + dt_bias)                                  (dt_softplus=True)
    h_t[d, n] = exp(delta_t[d] A[d, n]) h_{t-1}[d, n] + delta_t[d] B_t[g(d), n] x_t[d]
    y_t[d] = sum_n C_t[g(d), n] h_t[d, n] + D[d] x_t[d]
    y_t = y_t * silu(z_t)                                               (when z is given)

`A <= 0` is Mamba's `A = -exp(A_log)`, so `exp(delta A)` lies in (0, 1]. With
`allow_neg_eigval=True` the decay is Grazzi et al.'s `2 exp(delta A) - 1`, in (-1, 1], which
lets a diagonal recurrence track state (parity). A complex `A` (S4D-Lin style, `Re(A) <= 0`)
gives a complex state and `y_t = Re(sum_n C_t[n] h_t[n]) + D x_t`; real `A` is the main case.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax

from seqjax import checks, kernels
from seqjax.ops.common import reset, scan_tokens, scan_tokens_chunked
from seqjax.scan.linear_recurrence import accumulation_dtype

SelectiveScanImpl = Literal["auto", "reference", "chunked", "pallas"]
SELECTIVE_SCAN_IMPLS: tuple[str, ...] = ("auto", "reference", "chunked", "pallas")

# The chunked form is the token loop, rematerialized chunk by chunk. Timed on CPU (B=2, D=256,
# N=16, T=4096, float32, jax 0.10.2, 2 cores; median of 5, forward / forward+backward): the
# reference 68 / 1036 ms with 474 MiB of scratch memory; fused token loop in chunks of 32:
# 74 / 892 ms, 45 MiB; of 64: 74 / 838 ms, 43 MiB. Building each chunk's [B, C, D, N] decays
# and inputs and running the scan layer over them (sequential, associative or chunked) was
# slower at every chunk size (forward 125-620 ms, forward+backward 911-3400 ms).
DEFAULT_CHUNK_SIZE = 64


def selective_scan(
    x: jax.Array,
    dt: jax.Array,
    A: jax.Array,
    B: jax.Array,
    C: jax.Array,
    D: jax.Array | None = None,
    z: jax.Array | None = None,
    dt_bias: jax.Array | None = None,
    initial_state: jax.Array | None = None,
    *,
    dt_softplus: bool = True,
    allow_neg_eigval: bool = False,
    segment_ids: jax.Array | None = None,
    impl: SelectiveScanImpl = "auto",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[jax.Array, jax.Array]:
    """Mamba's selective scan over `x: [B, T, D]`; returns `(y [B, T, D], final_state [B, D, N])`.

    Args:
      x: inputs `[B, T, D]`.
      dt: step sizes before `softplus` and bias, `[B, T, D]`.
      A: state matrix diagonal `[D, N]`, `Re(A) <= 0` (checked when concrete); real or complex.
      B: input projections `[B, T, N]`, or `[B, T, G, N]` for `G` groups of `D / G` channels.
      C: output projections, the layout of `B`.
      D: skip connection `[D]`; None means none.
      z: gate `[B, T, D]`; the output is multiplied by `silu(z)`. None means no gate.
      dt_bias: `[D]`, added to `dt` before `softplus`; None means zero.
      initial_state: `[B, D, N]`; None means zeros.
      dt_softplus: apply `softplus` to `dt + dt_bias` (Mamba's `delta_softplus`).
      allow_neg_eigval: use the decay `2 exp(delta A) - 1` in (-1, 1] (Grazzi et al.).
      segment_ids: `[B, T]` ints; the state restarts from zero at every new segment.
      impl: `"reference"` (a token loop), `"chunked"` (a scan over chunks of `chunk_size`
        tokens that recomputes each chunk in the backward pass, so neither pass holds the
        `[B, T, D, N]` states), `"pallas"` (the kernels of `pallas_kernels.selective_scan`
        with the state on chip, see `seqjax.kernels`; complex `A` and packed segments fall
        back to `"chunked"`), `"auto"` (`"pallas"` on TPU and GPU, else `"chunked"`).
      chunk_size: chunk length of `"chunked"`.

    Returns:
      `y` in the dtype of `x`, and the state after each row's last token in the accumulation
      dtype: float32 (complex64 for complex `A`), float64 for float64 inputs.
    """
    grouped = _validate(
        dict(x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias, initial_state=initial_state),
        time_axis=True,
    )
    checks.check_segment_ids(segment_ids, *x.shape[:2])
    checks.check_choice("impl", impl, SELECTIVE_SCAN_IMPLS)
    checks.check_positive("chunk_size", chunk_size)
    checks.check_values("A", jnp.real(A) <= 0, "Re(A) <= 0 (Mamba's A = -exp(A_log))")
    B, C = _grouped(B, grouped), _grouped(C, grouped)
    state_shape = (x.shape[0], x.shape[2], A.shape[1])
    h0 = initial_state
    if h0 is None:
        # Only its shape and dtype are checked; the zeros are made if a kernel runs.
        h0 = jax.ShapeDtypeStruct(state_shape, jnp.float32)
    # `dt` stands in for the step `delta` (same shape) in the kernels' check of the call.
    args = (x, dt, A, B, C, h0)
    kernel = kernels.choose("selective_scan", impl, args, segment_ids)
    if kernel is not None:
        if initial_state is None:
            h0 = jnp.zeros(state_shape, jnp.float32)
        delta = discretized_step(dt, dt_bias, dt_softplus)
        y, final = kernel.selective_scan(
            x, delta, A, B, C, h0, allow_neg_eigval=allow_neg_eigval, **kernels.options()
        )
        return _skip_and_gate(y.astype(jnp.float32), x, D, z).astype(x.dtype), final
    arrays = _to_accumulation_dtype(
        dict(x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias, h0=initial_state)
    )
    if arrays["h0"] is None:
        arrays["h0"] = jnp.zeros(state_shape, arrays["A"].dtype)
    options = dict(dt_softplus=dt_softplus, allow_neg_eigval=allow_neg_eigval)
    if impl == "reference":
        y, final = _selective_scan_reference(**arrays, segment_ids=segment_ids, **options)
    else:
        y, final = _selective_scan_chunked(
            **arrays,
            segment_ids=segment_ids,
            chunk_size=chunk_size,
            **options,
        )
    return y.astype(x.dtype), final


def selective_scan_step(
    x_t: jax.Array,
    dt_t: jax.Array,
    A: jax.Array,
    B_t: jax.Array,
    C_t: jax.Array,
    D: jax.Array | None = None,
    z_t: jax.Array | None = None,
    dt_bias: jax.Array | None = None,
    state: jax.Array | None = None,
    *,
    dt_softplus: bool = True,
    allow_neg_eigval: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """One token of `selective_scan`: `x_t, dt_t, z_t: [B, D]`, `B_t, C_t: [B, N]` or
    `[B, G, N]`, `state: [B, D, N]` or None (zeros) -> `(y_t [B, D], new_state [B, D, N])`."""
    grouped = _validate(
        dict(x_t=x_t, dt_t=dt_t, A=A, B_t=B_t, C_t=C_t, D=D, z_t=z_t, dt_bias=dt_bias, state=state),
        time_axis=False,
    )
    arrays = _to_accumulation_dtype(
        dict(
            x=x_t,
            dt=dt_t,
            A=A,
            B=_grouped(B_t, grouped),
            C=_grouped(C_t, grouped),
            D=D,
            z=z_t,
            dt_bias=dt_bias,
            h0=state,
        )
    )
    h = arrays.pop("h0")
    if h is None:
        h = jnp.zeros((*x_t.shape, A.shape[1]), arrays["A"].dtype)
    y_t, h = _advance(h, **arrays, dt_softplus=dt_softplus, allow_neg_eigval=allow_neg_eigval)
    return y_t.astype(x_t.dtype), h


# ----------------------------------------------------------------------------- the equations


def discretized_step(dt: jax.Array, dt_bias: jax.Array | None, dt_softplus: bool) -> jax.Array:
    """`delta = softplus(dt + dt_bias)`, `[..., D]`."""
    if dt_bias is not None:
        dt = dt + dt_bias
    return jax.nn.softplus(dt) if dt_softplus else dt


def discretized_decay(delta: jax.Array, A: jax.Array, allow_neg_eigval: bool) -> jax.Array:
    """`exp(delta A)`, or `2 exp(delta A) - 1`: `[..., D]`, `[D, N]` -> `[..., D, N]`."""
    decay = jnp.exp(delta[..., None] * A)
    return 2 * decay - 1 if allow_neg_eigval else decay


def _state_input(delta, x, B):
    """`delta_t[d] B_t[g(d), n] x_t[d]`: `[..., D]`, `[..., G, N]` -> `[..., D, N]`."""
    groups, state_size = B.shape[-2:]
    dx = (delta * x).reshape(*x.shape[:-1], groups, -1)
    return (dx[..., None] * B[..., None, :]).reshape(*x.shape, state_size)


def _readout(h, C):
    """`sum_n C_t[g(d), n] h_t[d, n]` (real part): `[..., D, N]`, `[..., G, N]` -> `[..., D]`."""
    groups, state_size = C.shape[-2:]
    per_group = h.reshape(*h.shape[:-2], groups, -1, state_size)
    y = jnp.einsum("...gdn,...gn->...gd", per_group, C, precision=lax.Precision.HIGHEST)
    return jnp.real(y).reshape(h.shape[:-1])


def _skip_and_gate(y, x, D, z):
    """`(y + D x) * silu(z)`, each term only when given."""
    if D is not None:
        y = y + D * x
    if z is not None:
        y = y * jax.nn.silu(z)
    return y


def _advance(h, x, dt, A, B, C, D, z, dt_bias, *, dt_softplus, allow_neg_eigval):
    """One token: `(y_t, h_t)` from `h_{t-1}: [B, D, N]` and the token's inputs."""
    delta = discretized_step(dt, dt_bias, dt_softplus)
    h = discretized_decay(delta, A, allow_neg_eigval) * h + _state_input(delta, x, B)
    return _skip_and_gate(_readout(h, C), x, D, z), h


# ----------------------------------------------------------------------------- impls


def _selective_scan_reference(
    x, dt, A, B, C, D, z, dt_bias, h0, *, segment_ids, dt_softplus, allow_neg_eigval
):
    """The recurrence of the module docstring, one token per `lax.scan` step."""

    def step(h, inputs):
        start, (x_t, dt_t, B_t, C_t, z_t) = inputs
        h = reset(start, h)
        y_t, h = _advance(
            h,
            x_t,
            dt_t,
            A,
            B_t,
            C_t,
            D,
            z_t,
            dt_bias,
            dt_softplus=dt_softplus,
            allow_neg_eigval=allow_neg_eigval,
        )
        return h, y_t

    return scan_tokens(step, h0, (x, dt, B, C, z), segment_ids)


def _selective_scan_chunked(
    x,
    dt,
    A,
    B,
    C,
    D,
    z,
    dt_bias,
    h0,
    *,
    segment_ids,
    dt_softplus,
    allow_neg_eigval,
    chunk_size,
):
    """The token loop of the reference, rematerialized by chunks (`scan_tokens_chunked`).

    Each step advances the state and contracts it with `C_t` at once, so no `[B, T, D, N]`
    array exists; the backward pass keeps only the states entering the chunks.
    """
    delta = discretized_step(dt, dt_bias, dt_softplus)

    def step(h, inputs):
        start, (x_t, delta_t, B_t, C_t) = inputs
        h = reset(start, h)
        y_t, h = _advance(
            h,
            x_t,
            delta_t,
            A,
            B_t,
            C_t,
            None,
            None,
            None,
            dt_softplus=False,
            allow_neg_eigval=allow_neg_eigval,
        )
        return h, y_t

    y, final = scan_tokens_chunked(step, h0, (x, delta, B, C), segment_ids, chunk_size)
    return _skip_and_gate(y, x, D, z), final


# ----------------------------------------------------------------------------- checks


def _validate(arrays: dict[str, jax.Array | None], *, time_axis: bool) -> bool:
    """Checks the shapes and dtypes of `selective_scan`'s (or its step's) arguments.

    `arrays` maps the argument names to the arrays, in the order of the signature
    `(x, dt, A, B, C, D, z, dt_bias, state)`. Returns whether `B` and `C` are grouped.
    """
    t = "T " if time_axis else ""
    names = list(arrays)
    grouped = arrays[names[3]].ndim == (4 if time_axis else 3)
    projection = f"B {t}G N" if grouped else f"B {t}N"
    layouts = (f"B {t}D", f"B {t}D", "D N", projection, projection, "D", f"B {t}D", "D", "B D N")
    complex_a = jnp.iscomplexobj(arrays["A"])
    dims = checks.Dims()
    for (name, array), layout in zip(arrays.items(), layouts, strict=True):
        if array is None:
            continue
        dims.check(name, array, layout)
        checks.check_floating(name, array, allow_complex=complex_a and layout.endswith("D N"))
    width, groups = dims.sizes["D"], dims.sizes.get("G", 1)
    if width % groups:
        raise ValueError(
            f"{names[3]}, {names[4]}: the D = {width} channels of {names[0]} do not split into "
            f"G = {groups} equal groups (D % G must be 0)"
        )
    return grouped


def _grouped(array: jax.Array, grouped: bool) -> jax.Array:
    """`B` or `C` in the grouped layout `[..., G, N]` (`G = 1` for `[..., N]`)."""
    return array if grouped else array[..., None, :]


def _to_accumulation_dtype(arrays: dict[str, jax.Array | None]) -> dict[str, jax.Array | None]:
    """`A` and the state in the accumulation dtype (complex for complex `A`), the rest in its
    real counterpart: float32 for bfloat16 and float32 inputs, float64 for float64 ones."""
    acc = accumulation_dtype(*(a.dtype for a in arrays.values() if a is not None))
    real_acc = jnp.finfo(acc).dtype
    return {
        name: None if a is None else a.astype(acc if name in ("A", "h0") else real_acc)
        for name, a in arrays.items()
    }
