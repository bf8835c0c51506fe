"""Timing, memory and table helpers shared by the benchmark scripts.

Timings are medians of interleaved repeats: every candidate runs once per round, so a noisy
neighbour slows all of them alike and the ratios between them stay meaningful.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np


def compile_all(fns: dict[str, Callable[..., Any]], *args: Any) -> dict[str, Any]:
    """`jax.jit`-compiles every function for `args`; returns the compiled executables."""
    return {name: jax.jit(fn).lower(*args).compile() for name, fn in fns.items()}


def temp_bytes(compiled: Any) -> int:
    """Peak scratch memory XLA planned for one call (arguments and outputs excluded)."""
    return int(compiled.memory_analysis().temp_size_in_bytes)


def median_seconds(
    compiled: dict[str, Any], *args: Any, repeats: int = 5, warmup: int = 1
) -> dict[str, float]:
    """Median wall time of each executable, measured round-robin."""
    for fn in compiled.values():
        for _ in range(warmup):
            jax.block_until_ready(fn(*args))
    times: dict[str, list[float]] = {name: [] for name in compiled}
    for _ in range(repeats):
        for name, fn in compiled.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(values)) for name, values in times.items()}


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt_rate(tokens: int, seconds: float) -> str:
    """Tokens per second in thousands: whole thousands from 100k, else three digits."""
    rate = tokens / seconds / 1e3
    return f"{rate:.0f}k" if rate >= 100 else f"{rate:.3g}k"


def fmt_bytes(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"
