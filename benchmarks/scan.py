"""Throughput and memory of the scan layer and the selective scan, impl against impl.

    python -m benchmarks.scan                       # T = 1K .. 64K
    python -m benchmarks.scan --lengths 1024,4096   # quicker

Peer: recurrentgemma's own JAX `linear_scan`, called as its RG-LRU layer calls it
(`unroll=128`) and with its default `unroll=1`. Its wheel pins old numpy and absl, so install
it without dependencies: `pip install -e '.[bench]' && pip install --no-deps recurrentgemma`.

For each T the table gives forward and forward+backward tokens/s (B * T / median seconds), the
speed relative to the table's first row, and the scratch memory XLA plans for forward+backward
(`memory_analysis().temp_size_in_bytes`), also per token. Impls whose forward+backward would
not fit in `--memory-limit-gib` are skipped there, and the table says so.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from benchmarks.common import impl_rows, markdown_table, write_results
from seqjax.ops.selective_scan import selective_scan
from seqjax.scan import linear_recurrence


def recurrentgemma_scans() -> dict:
    try:
        from recurrentgemma.jax import scan as rg_scan
    except ImportError:
        print("recurrentgemma is not installed: its row is left out (see the docstring).")
        return {}
    return {
        "recurrentgemma (unroll=128)": lambda a, b: rg_scan.linear_scan(b, a, unroll=128)[0],
        "recurrentgemma (unroll=1)": lambda a, b: rg_scan.linear_scan(b, a)[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="1024,4096,16384,65536")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--width", type=int, default=512, help="D of linear_recurrence")
    parser.add_argument("--ssm-width", type=int, default=256, help="D of selective_scan")
    parser.add_argument("--ssm-state", type=int, default=16, help="N of selective_scan")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--memory-limit-gib", type=float, default=8.0)
    parser.add_argument(
        "--ops", default="linear_recurrence,selective_scan", help="which tables to measure"
    )
    parser.add_argument("--out", default="results/scan.json")
    args = parser.parse_args()
    limit = int(args.memory_limit_gib * 2**30)
    lengths = [int(t) for t in args.lengths.split(",")]
    headers = [
        "impl",
        "fwd tok/s",
        "fwd+bwd tok/s",
        "speed vs row 1 (fwd / fwd+bwd)",
        "fwd+bwd temp memory",
        "bytes/token",
    ]
    results = {"device": str(jax.devices()[0]), "linear_recurrence": {}, "selective_scan": {}}

    ops = args.ops.split(",")
    for length in lengths if "linear_recurrence" in ops else ():
        key_a, key_b = jax.random.split(jax.random.key(length))
        shape = (args.batch, length, args.width)
        a = jax.random.uniform(key_a, shape, minval=0.5, maxval=1.0)
        b = jax.random.normal(key_b, shape)
        fns = {
            impl: lambda a, b, impl=impl: linear_recurrence(a, b, impl=impl)[0]
            for impl in ("sequential", "associative", "chunked")
        }
        fns.update(recurrentgemma_scans())
        rows, raw = impl_rows(fns, (a, b), args.batch * length, args.repeats, limit)
        results["linear_recurrence"][length] = raw
        print(f"\nlinear_recurrence  B={args.batch} T={length} D={args.width} float32")
        print(markdown_table(headers, rows), flush=True)

    for length in lengths if "selective_scan" in ops else ():
        keys = jax.random.split(jax.random.key(length), 5)
        batch, width, state = args.batch, args.ssm_width, args.ssm_state
        x = jax.random.normal(keys[0], (batch, length, width))
        dt = jax.random.normal(keys[1], (batch, length, width)) - 2.0
        A = -jnp.tile(jnp.arange(1.0, state + 1.0), (width, 1))
        B = jax.random.normal(keys[2], (batch, length, state))
        C = jax.random.normal(keys[3], (batch, length, state))
        fns = {
            impl: lambda *inputs, impl=impl: selective_scan(*inputs, impl=impl)[0]
            for impl in ("reference", "chunked")
        }
        rows, raw = impl_rows(fns, (x, dt, A, B, C), batch * length, args.repeats, limit)
        results["selective_scan"][length] = raw
        print(f"\nselective_scan  B={batch} T={length} D={width} N={state} float32")
        print(markdown_table(headers, rows), flush=True)

    write_results(args.out, results)


if __name__ == "__main__":
    main()
