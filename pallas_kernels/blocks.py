"""Block sizes: one table per backend, looked up by kernel, head (or feature) size and dtype.

A row applies to head sizes up to its `max_dim`; the first row that fits wins. Sizes are
chosen to keep each kernel's working set inside on-chip memory: TPU VMEM (16 MiB scoped by
default on v5e / v6e, 32 MiB on v4 / v5p; 128 lanes by 8 (float32) or 16 (bfloat16)
sublanes per tile) and GPU shared memory (227 KiB per block on H100, 99 KiB on consumer
parts; Triton blocks are powers of 2, dots at least 16 on each side). Why each family's sizes
are what they are is in its `tpu.py` / `gpu.py`.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes of one kernel call; a field a kernel does not use is None.

    Attributes:
      chunk: tokens per chunk (chunked kernels) or per time block (scans).
      feature: channels per block of a diagonal scan (`D` tile).
      value: value columns per block (`V` tile) of a matrix-state kernel.
      num_warps, num_stages: Triton launch parameters (GPU only).
    """

    chunk: int | None = None
    feature: int | None = None
    value: int | None = None
    num_warps: int | None = None
    num_stages: int | None = None


# (kernel, max_dim, dtype name or "*", sizes)
TPU: tuple[tuple[str, int, str, BlockSizes], ...] = (
    ("linear_recurrence", 1 << 30, "*", BlockSizes(chunk=256, feature=512)),
    ("gla", 128, "*", BlockSizes(chunk=128, value=128)),
    ("gla", 256, "*", BlockSizes(chunk=64, value=128)),
    ("delta_rule", 128, "*", BlockSizes(chunk=64, value=128)),
    ("delta_rule", 256, "*", BlockSizes(chunk=64, value=128)),
    ("selective_scan", 16, "*", BlockSizes(chunk=128, feature=128)),
    ("selective_scan", 256, "*", BlockSizes(chunk=32, feature=128)),
)

GPU: tuple[tuple[str, int, str, BlockSizes], ...] = (
    (
        "linear_recurrence",
        1 << 30,
        "*",
        BlockSizes(chunk=16, feature=128, num_warps=4, num_stages=1),
    ),
    ("gla", 128, "*", BlockSizes(chunk=64, value=64, num_warps=4, num_stages=2)),
    ("gla", 256, "*", BlockSizes(chunk=32, value=32, num_warps=4, num_stages=2)),
    ("delta_rule", 64, "*", BlockSizes(chunk=32, value=64, num_warps=4, num_stages=2)),
    ("delta_rule", 128, "*", BlockSizes(chunk=32, value=32, num_warps=4, num_stages=2)),
    ("delta_rule", 256, "*", BlockSizes(chunk=16, value=32, num_warps=8, num_stages=1)),
    ("selective_scan", 16, "*", BlockSizes(chunk=16, feature=32, num_warps=4, num_stages=1)),
    ("selective_scan", 256, "*", BlockSizes(chunk=8, feature=4, num_warps=4, num_stages=1)),
)

TABLES = {"tpu": TPU, "gpu": GPU}


def block_sizes(backend: str, kernel: str, dim: int, dtype) -> BlockSizes | None:
    """The sizes for `kernel` on `backend` at head (feature) size `dim`; None when no row
    covers it (the kernel then reports the shape unsupported)."""
    name = jnp.dtype(dtype).name
    for row_kernel, max_dim, row_dtype, sizes in TABLES[backend]:
        if row_kernel == kernel and dim <= max_dim and row_dtype in ("*", name):
            return sizes
    return None
