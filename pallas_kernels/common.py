"""What every kernel family shares: backends, compiler parameters, interpret mode, padding."""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

Backend = Literal["tpu", "gpu"]
BACKENDS: tuple[str, ...] = ("tpu", "gpu")


def unknown_backend(backend: str) -> str | None:
    """The reason every family's `unsupported` gives for a backend with no kernels, or None."""
    if backend not in BACKENDS:
        return f"backend: expected one of {BACKENDS}, got {backend!r}"
    return None


def interpret_params(backend: Backend, interpret: bool) -> bool | pltpu.InterpretParams:
    """What `pallas_call(interpret=...)` takes: False to compile; when interpreting, the TPU
    interpreter (which models TPU semantics: sequential grid, scratch persisting across grid
    steps) for TPU kernels and the generic interpreter for GPU kernels."""
    if not interpret:
        return False
    return pltpu.InterpretParams() if backend == "tpu" else True


def tpu_params(*semantics: str, vmem_limit_bytes: int | None = None) -> pltpu.CompilerParams:
    """Mosaic parameters: one of "parallel" / "arbitrary" per grid axis. The sequence axis is
    last and the only "arbitrary" one, so a state carried in scratch sees the chunks in
    order."""
    return pltpu.CompilerParams(dimension_semantics=semantics, vmem_limit_bytes=vmem_limit_bytes)


def gpu_params(num_warps: int, num_stages: int) -> pltriton.CompilerParams:
    """Triton parameters; passing them selects the Triton lowering (a plain `pallas_call`
    would lower through Mosaic GPU on current JAX)."""
    return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


_DOT_PRECISION = contextvars.ContextVar("dot_precision", default=lax.Precision.HIGHEST)


def dot_precision():
    """The precision of the float32 dots of the kernel being traced: `HIGHEST` (IEEE float32)
    unless `gpu_kernel` set another."""
    return _DOT_PRECISION.get()


def gpu_kernel(kernel: Callable, interpret: bool) -> Callable:
    """`kernel`, whose dots (`dot_precision()`) run as three TF32 tensor-core products (3xTF32,
    float32-level accuracy) when compiled for a GPU. Triton lowers IEEE float32 dots to
    unrolled scalar FMAs, without tensor cores: on an H100 (B=8, T=2K, H=16, K=V=128, bf16)
    simple GLA's forward kernel took 15 s to compile and 56 ms to run that way, 4 s and
    2.3 ms with 3xTF32; the delta rule's forward went from 110 ms to 34 ms. Interpreted, the
    dots stay `HIGHEST` (XLA:CPU has no 3xTF32 algorithm)."""
    precision = lax.Precision.HIGHEST if interpret else lax.DotAlgorithmPreset.TF32_TF32_F32_X3

    def traced(*refs):
        token = _DOT_PRECISION.set(precision)
        try:
            return kernel(*refs)
        finally:
            _DOT_PRECISION.reset(token)

    return traced


def pad_axis(x: jax.Array, axis: int, multiple: int, value: float = 0.0) -> jax.Array:
    """`x` padded at the end of `axis` to a multiple of `multiple`."""
    excess = -x.shape[axis] % multiple
    if excess == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, excess)
    return jnp.pad(x, widths, constant_values=value)


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def next_power_of_2(n: int) -> int:
    """Triton's block shapes are powers of 2: the smallest one >= n."""
    return 1 << max(n - 1, 0).bit_length()
