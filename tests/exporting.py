"""Lowering checks without hardware: `jax.export` of a function for `tpu` and `cuda`; and
whether the tests run a backend's kernels compiled or interpreted.

Mosaic (TPU) and Triton (GPU) lowering both run on CPU; what they emit is a custom call whose
target names the kernel, so counting those targets in the exported module tells a kernel from
a fallback to the pure-JAX path.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import jax

KERNEL_TARGET = {"tpu": "tpu_custom_call", "cuda": "__gpu$xla.gpu.triton"}
BACKEND_PLATFORM = {"tpu": "tpu", "gpu": "cuda"}


def interpret_mode(backend: str) -> bool:
    """Whether the tests run `backend`'s kernels in interpret mode: on the hardware they are
    written for ("gpu" kernels on a GPU, "tpu" kernels on a TPU) they compile, elsewhere they
    are interpreted."""
    return jax.default_backend() != backend


def target(platform: str):
    """A context naming the GPU that Triton lowering targets off a GPU: from JAX 0.11 the
    lowering reads the target's compute capability from the device (or an abstract device)
    and fails on a CPU-only machine; earlier versions assumed an H100's (9.0)."""
    if platform != "cuda" or jax.default_backend() == "gpu":
        return contextlib.nullcontext()
    device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100", num_cores=None, platform="gpu")
    return jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), (), abstract_device=device))


def exported_text(fn: Callable, args, platform: str) -> str:
    """The StableHLO text of `jax.jit(fn)` exported for `platform` at the shapes of `args`."""
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), args)
    checks = [jax.export.DisabledSafetyCheck.custom_call(KERNEL_TARGET["cuda"])]
    with target(platform):
        exported = jax.export.export(jax.jit(fn), platforms=[platform], disabled_checks=checks)
        return exported(*shapes).mlir_module()


def kernel_calls(fn: Callable, args, backend: str) -> int:
    """How many kernel custom calls the export of `fn` for `backend` ("tpu" / "gpu") holds."""
    platform = BACKEND_PLATFORM[backend]
    text = exported_text(fn, args, platform)
    return text.count(f"@{KERNEL_TARGET[platform]}(")
