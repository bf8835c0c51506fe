"""Lowering checks without hardware: `jax.export` of a function for `tpu` and `cuda`.

Mosaic (TPU) and Triton (GPU) lowering both run on CPU; what they emit is a custom call whose
target names the kernel, so counting those targets in the exported module tells a kernel from
a fallback to the pure-JAX path.
"""

from __future__ import annotations

from collections.abc import Callable

import jax

KERNEL_TARGET = {"tpu": "tpu_custom_call", "cuda": "__gpu$xla.gpu.triton"}
BACKEND_PLATFORM = {"tpu": "tpu", "gpu": "cuda"}


def exported_text(fn: Callable, args, platform: str) -> str:
    """The StableHLO text of `jax.jit(fn)` exported for `platform` at the shapes of `args`."""
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), args)
    checks = [jax.export.DisabledSafetyCheck.custom_call(KERNEL_TARGET["cuda"])]
    exported = jax.export.export(jax.jit(fn), platforms=[platform], disabled_checks=checks)(*shapes)
    return exported.mlir_module()


def kernel_calls(fn: Callable, args, backend: str) -> int:
    """How many kernel custom calls the export of `fn` for `backend` ("tpu" / "gpu") holds."""
    platform = BACKEND_PLATFORM[backend]
    text = exported_text(fn, args, platform)
    return text.count(f"@{KERNEL_TARGET[platform]}(")
