"""Bytes moved by the collectives of each sequence-parallel op, read from the compiled HLO.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m benchmarks.communication

For T from 4K to 64K over P = 8 devices of the `sequence` axis, each op's forward and
forward+backward are compiled and every collective in the optimized HLO is counted with the
bytes one device receives:

    all-gather          result * (P - 1) / P      (all but its own part of the gathered array)
    all-to-all          result * (P - 1) / P
    collective-permute  result                    (one neighbour's block)
    reduce-scatter      result * (P - 1)          (the other devices' parts of its block)
    all-reduce          result * 2 (P - 1) / P    (a ring's reduce-scatter plus all-gather)

What the recipes predict: LASP-2 (the linear-attention and delta-rule families, the diagonal
scans) moves a constant amount, independent of T (P state summaries); Ulysses moves O(T / P)
per device (four all-to-alls of a shard's q, k, v, o); ring attention runs P - 1 rounds of
`collective-permute` of a K/V block, O(T / P) each. Each cell also gives the compiled
program's temporary memory per device: ring attention's custom backward keeps O(T / P).
"""

from __future__ import annotations

import argparse
import math
import re
from collections import defaultdict
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from benchmarks.common import markdown_table
from seqjax.parallel.attention import sequence_parallel_attention
from seqjax.parallel.linear_attention import (
    sequence_parallel_delta_rule,
    sequence_parallel_gla,
    sequence_parallel_simple_gla,
)
from seqjax.parallel.mesh import SEQUENCE
from seqjax.parallel.scans import sequence_parallel_linear_recurrence

DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1, "f64": 8, "c64": 8}
COLLECTIVES = ("all-gather", "all-to-all", "collective-permute", "reduce-scatter", "all-reduce")
# `%all_gather.3 = f32[8,2,64]{2,1,0} all-gather(%operand), ...`; an all-to-all's result is a
# tuple of its P pieces (whose text holds `/*index=5*/` comments). Accelerators split a
# collective into `<op>-start` and `<op>-done`; the start's result is a tuple that also holds
# the operand, the done's is the collective's own result, so the done is the one counted.
INSTRUCTION = re.compile(
    r"^\s*(?:ROOT )?%\S+ = (?P<result>.*?) (?P<op>" + "|".join(COLLECTIVES) + r")(?:-done)?\("
)
COMPUTATION = re.compile(r"^(?:ENTRY )?%(?P<name>\S+) .*\{$")
WHILE_LOOP = re.compile(
    r" while\(.*body=%(?P<body>[^,\s]+).*\"known_trip_count\":\{\"n\":\"(?P<n>\d+)\""
)
SHAPE = re.compile(r"([a-z0-9]+)\[([0-9,]*)\]")


def shape_bytes(text: str) -> int:
    """Bytes of the arrays in an HLO type (all elements of a tuple)."""
    return sum(
        DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
        for dtype, dims in SHAPE.findall(text)
    )


def received_bytes(hlo: str, devices: int) -> dict[str, tuple[int, float]]:
    """Per collective kind: `(times executed, bytes one device receives)` over the HLO
    module; a collective in a while loop's body counts once per iteration (the loop's known
    trip count)."""
    trips = {m["body"]: int(m["n"]) for m in map(WHILE_LOOP.search, hlo.splitlines()) if m}
    share = (devices - 1) / devices
    totals: dict[str, list] = defaultdict(lambda: [0, 0.0])
    computation = None
    for line in hlo.splitlines():
        if header := COMPUTATION.match(line):
            computation = header["name"]
        if not (match := INSTRUCTION.match(line)):
            continue
        op, result = match["op"], shape_bytes(match["result"])
        moved = {
            "all-gather": result * share,
            "all-to-all": result * share,
            "collective-permute": result,
            "reduce-scatter": result * (devices - 1),
            "all-reduce": 2 * result * share,
        }[op]
        times = trips.get(computation, 1)
        totals[op][0] += times
        totals[op][1] += times * moved
    return {op: (count, moved) for op, (count, moved) in totals.items()}


def inputs(length: int, heads: int, dim: int) -> dict[str, jax.Array]:
    keys = jax.random.split(jax.random.key(0), 6)
    shape = (1, length, heads, dim)
    return {
        "q": jax.random.normal(keys[0], shape),
        "k": jax.random.normal(keys[1], shape) / np.sqrt(dim),
        "v": jax.random.normal(keys[2], shape),
        "g": -jax.nn.softplus(jax.random.normal(keys[3], shape[:3])),
        "gk": -jax.nn.softplus(jax.random.normal(keys[4], shape)),
        "beta": jax.nn.sigmoid(jax.random.normal(keys[5], shape[:3])),
    }


def ops(mesh: Mesh) -> dict[str, Callable[[dict], jax.Array]]:
    """Each op as `inputs -> output`, sequence-parallel over `mesh`."""
    return {
        "simple_gla (LASP-2)": lambda x: sequence_parallel_simple_gla(
            x["q"], x["k"], x["v"], x["g"], mesh=mesh
        )[0],
        "gla (LASP-2)": lambda x: sequence_parallel_gla(x["q"], x["k"], x["v"], x["gk"], mesh=mesh)[
            0
        ],
        "delta_rule (LASP-2, K x K)": lambda x: sequence_parallel_delta_rule(
            x["q"], x["k"], x["v"], x["beta"], mesh=mesh
        )[0],
        "linear_recurrence": lambda x: sequence_parallel_linear_recurrence(
            jnp.exp(x["gk"]), x["v"], mesh=mesh
        )[0],
        "attention (Ulysses)": lambda x: sequence_parallel_attention(
            x["q"], x["k"], x["v"], mesh=mesh, method="ulysses"
        )[0],
        "attention (ring)": lambda x: sequence_parallel_attention(
            x["q"], x["k"], x["v"], mesh=mesh, method="ring"
        )[0],
    }


def compiled(forward: Callable, x: dict, backward: bool) -> tuple[str, int]:
    """The optimized HLO of `forward` (or of its gradient with respect to every input) and its
    temporary memory per device (XLA's buffer assignment: activations kept for the backward
    pass, score blocks, collective buffers)."""
    fn = jax.grad(lambda x: jnp.sum(forward(x))) if backward else forward
    executable = jax.jit(fn).lower(x).compile()
    return executable.as_text(), executable.memory_analysis().temp_size_in_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default="4096,16384,65536")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=64)
    args = parser.parse_args()
    devices = jax.device_count()
    if devices < 2:
        raise SystemExit("run with XLA_FLAGS=--xla_force_host_platform_device_count=8")
    mesh = Mesh(np.asarray(jax.devices()), (SEQUENCE,))
    lengths = [int(t) for t in args.lengths.split(",")]
    rows = []
    for name, fn in ops(mesh).items():
        for backward in (False, True):
            cells = []
            for length in lengths:
                hlo, temp = compiled(fn, inputs(length, args.heads, args.dim), backward)
                moved = received_bytes(hlo, devices)
                traffic = ", ".join(
                    f"{op} x{count}: {b / 1024:,.1f} KiB" for op, (count, b) in moved.items()
                )
                cells.append(f"{traffic or 'none'}; temp {temp / 2**20:,.1f} MiB")
            rows.append([name, "fwd+bwd" if backward else "fwd", *cells])
    headers = ["op", "pass", *(f"T = {t}" for t in lengths)]
    print(
        f"bytes received and temporary memory per device, P = {devices}, H = {args.heads}, "
        f"K = V = {args.dim}"
    )
    print(markdown_table(headers, rows))


if __name__ == "__main__":
    main()
