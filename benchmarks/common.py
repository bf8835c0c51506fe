"""Timing, memory and table helpers shared by the benchmark scripts.

Timings are medians of interleaved repeats: every candidate runs once per round, so a noisy
neighbour slows all of them alike and the ratios between them stay meaningful. Each timed
call directly follows an untimed call of the same executable: the first call after another
executable ran is slow on this machine (simple GLA's forward at T = 4K took 124 ms right after
its token loop's forward+backward, which plans 1.2 GiB, and 31 ms on the next call; the
memory the other program freed is paged in again), and what a training loop sees is the
repeated call.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def compile_all(fns: dict[str, Callable[..., Any]], *args: Any) -> dict[str, Any]:
    """`jax.jit`-compiles every function for `args`; returns the compiled executables."""
    return {name: jax.jit(fn).lower(*args).compile() for name, fn in fns.items()}


def temp_bytes(compiled: Any) -> int:
    """Peak scratch memory XLA planned for one call (arguments and outputs excluded)."""
    return int(compiled.memory_analysis().temp_size_in_bytes)


def median_seconds(compiled: dict[str, Any], *args: Any, repeats: int = 5) -> dict[str, float]:
    """Median wall time of each executable, measured round-robin, every timed call right
    after an untimed one of the same executable (module docstring)."""
    times: dict[str, list[float]] = {name: [] for name in compiled}
    for _ in range(repeats):
        for name, fn in compiled.items():
            jax.block_until_ready(fn(*args))
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


def forward_and_backward(fn, num_args):
    """fn(*args) -> h; returns the forward and a forward+backward w.r.t. every argument."""

    def loss(*args):
        return jnp.sum(fn(*args).astype(jnp.float32) ** 2)

    return fn, jax.grad(loss, argnums=tuple(range(num_args)))


def impl_rows(
    name_to_fn: dict[str, Callable[..., Any]],
    args: Sequence[Any],
    tokens: int,
    repeats: int,
    limit_bytes: int,
) -> tuple[list[list[str]], dict[str, tuple[float | None, float | None, int]]]:
    """Times the forward and forward+backward (of `sum(out ** 2)` w.r.t. every argument) of
    each `fn(*args) -> out`, interleaved; an impl whose fwd+bwd scratch memory exceeds
    `limit_bytes` is skipped. Rows: name, fwd tok/s, fwd+bwd tok/s, speed-up over the first
    function, memory, bytes/token. Raw: name -> (fwd_s, fwdbwd_s, temp_bytes).
    """
    rows = []
    forward = {}
    backward = {}
    for name, fn in name_to_fn.items():
        forward[name], backward[name] = forward_and_backward(fn, len(args))
    compiled_bwd = compile_all(backward, *args)
    memory = {name: temp_bytes(c) for name, c in compiled_bwd.items()}
    runnable = [name for name in name_to_fn if memory[name] <= limit_bytes]
    compiled_fwd = compile_all({n: forward[n] for n in runnable}, *args)
    fwd_s = median_seconds(compiled_fwd, *args, repeats=repeats)
    bwd_s = median_seconds({n: compiled_bwd[n] for n in runnable}, *args, repeats=repeats)
    baseline = next(iter(name_to_fn))
    for name in name_to_fn:
        if name not in runnable:
            over = fmt_bytes(memory[name]) + " (over limit)"
            rows.append([name, "skipped", "skipped", "", over, ""])
            continue
        speedup = ""
        if baseline in runnable:
            speedup = f"{fwd_s[baseline] / fwd_s[name]:.2f}x / {bwd_s[baseline] / bwd_s[name]:.2f}x"
        rows.append(
            [
                name,
                fmt_rate(tokens, fwd_s[name]),
                fmt_rate(tokens, bwd_s[name]),
                speedup,
                fmt_bytes(memory[name]),
                f"{memory[name] / tokens:.0f}",
            ]
        )
    return rows, {n: (fwd_s.get(n), bwd_s.get(n), memory[n]) for n in name_to_fn}


def head_size_parser(description: str, ops: str, lengths: str, out: str) -> argparse.ArgumentParser:
    """The command line of the matrix-state benchmarks (ops x head sizes x lengths, B, H)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--ops", default=ops)
    parser.add_argument("--lengths", default=lengths)
    parser.add_argument("--dims", default="64,128", help="head sizes K = V")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--memory-limit-gib", type=float, default=8.0)
    parser.add_argument("--out", default=out)
    return parser


def write_results(path: str, results: dict) -> None:
    """Writes a benchmark's raw results as JSON (creating the folder) and says where."""
    out = pathlib.Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"\nwrote {out}")
