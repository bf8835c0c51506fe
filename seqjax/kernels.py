"""How the ops reach the Pallas kernels of the top-level `pallas_kernels` package.

`impl="pallas"` asks for a family's kernel; `impl="auto"` takes it on TPU, and on GPU for the
families whose Triton kernels beat the pure-JAX path there (`SLOWER_ON_GPU`). The kernels
are imported on first use, so importing seqjax never traces or loads Pallas. On TPU the TPU
(Mosaic) kernels run, on GPU the Triton ones; on CPU, `impl="pallas"` runs the GPU kernels in
Pallas's interpret mode (slow: for tests). A call the kernels do not cover (a shape, a dtype,
packed segments) runs the op's pure-JAX chunked path instead, with a warning naming the reason
when the kernel was asked for explicitly.
"""

from __future__ import annotations

import importlib
import warnings
from types import ModuleType

import jax

# Families whose Triton kernels ran slower on an H100 than the ops' pure-JAX chunked path
# (simple GLA at B = 8, T = 2K, H = 16, K = V = 128, bfloat16: 2.25 vs 1.70 ms forward, 13.3
# vs 4.1 ms forward+backward) and whose backward kernels took 20 to over 50 s to compile:
# `impl="auto"` takes the chunked path for them on GPU; `impl="pallas"` still runs them. The
# diagonal-recurrence and selective-scan kernels ran 4-17x faster than their chunked paths.
SLOWER_ON_GPU = frozenset({"gla", "delta_rule"})


def on_accelerator() -> bool:
    return jax.default_backend() in ("tpu", "gpu")


def backend() -> str:
    """The kernels' backend: `"tpu"` on TPU, else `"gpu"` (interpreted off a GPU)."""
    return "tpu" if jax.default_backend() == "tpu" else "gpu"


def family(name: str) -> ModuleType:
    """`pallas_kernels.<name>`, imported now."""
    return importlib.import_module(f"pallas_kernels.{name}")


def choose(name: str, impl: str, args: tuple, segment_ids=None) -> ModuleType | None:
    """The kernel family to run an op with, or None for the op's pure-JAX path.

    Args:
      name: the family under `pallas_kernels`.
      impl: the impl asked for; only `"pallas"`, and `"auto"` on an accelerator (on GPU, for a
        family not in `SLOWER_ON_GPU`), take a kernel.
      args: the family's `unsupported(*args, backend)` arguments.
      segment_ids: packed segments that the kernel would have to take (the chunked kernels do
        not); None when there are none or the op folds them into the kernel's inputs.
    """
    if impl != "pallas" and not (impl == "auto" and on_accelerator()):
        return None
    if impl == "auto" and jax.default_backend() == "gpu" and name in SLOWER_ON_GPU:
        return None
    kernels = family(name)
    if segment_ids is not None:
        reason = "packed segments (segment_ids) are not supported by the kernel"
    else:
        reason = kernels.unsupported(*args, backend())
    if reason is None:
        return kernels
    if impl == "pallas":
        message = f"impl='pallas': pallas_kernels.{name} does not cover this call ({reason}); "
        warnings.warn(message + "running the pure-JAX chunked path", stacklevel=3)
    return None


def options() -> dict:
    """The `backend` and `interpret` keywords every kernel entry point takes."""
    return dict(backend=backend(), interpret=not on_accelerator())
