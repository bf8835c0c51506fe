"""Softmax attention's impls beside chunked linear attention: where does the crossover fall?

    python -m benchmarks.attention                                # T = 128 .. 32K
    python -m benchmarks.attention --lengths 512,2048 --repeats 3  # quicker

For each T (B, H, K = V from the command line; causal, float32) the table gives forward and
forward+backward tokens/s and the scratch memory XLA plans for forward+backward, for every
softmax-attention impl that runs on this backend, the sliding-window form (`--window`), and
the chunked `simple_gla` and `gla` of the linear-attention family on the same q, k, v. An impl
whose forward+backward would not fit in `--memory-limit-gib` is skipped and marked so. The
last lines name the shortest T at which each linear-attention op beats the fastest softmax
impl (forward+backward), i.e. the measured crossover.
"""

from __future__ import annotations

import jax

from benchmarks.common import head_size_parser, impl_rows, markdown_table, write_results
from seqjax.ops.attention import softmax_attention
from seqjax.ops.gla import gla, simple_gla

SOFTMAX_IMPLS = ("reference", "xla", "blockwise")
LINEAR = ("simple_gla", "gla")


def make_inputs(batch: int, length: int, heads: int, dim: int) -> tuple:
    """q, k, v and GLA-style log-decays `g: [B, T, H]`, `gk: [B, T, H, K]`."""
    keys = jax.random.split(jax.random.key(length), 5)
    q, k, v = (jax.random.normal(key, (batch, length, heads, dim)) for key in keys[:3])
    g = jax.nn.log_sigmoid(4.0 + jax.random.normal(keys[3], (batch, length, heads)))
    gk = jax.nn.log_sigmoid(4.0 + jax.random.normal(keys[4], (batch, length, heads, dim))) / 16
    return q, k, v, g, gk


def candidates(window: int) -> dict:
    """name -> fn(q, k, v, g, gk) -> output."""
    fns = {
        f"softmax {impl}": lambda q, k, v, g, gk, impl=impl: softmax_attention(q, k, v, impl=impl)[
            0
        ]
        for impl in SOFTMAX_IMPLS
    }
    fns[f"softmax blockwise, window {window}"] = lambda q, k, v, g, gk: softmax_attention(
        q, k, v, window=window, impl="blockwise"
    )[0]
    fns["simple_gla chunked"] = lambda q, k, v, g, gk: simple_gla(q, k, v, g, impl="chunked")[0]
    fns["gla chunked"] = lambda q, k, v, g, gk: gla(q, k, v, gk, impl="chunked")[0]
    return fns


def crossovers(results: dict) -> list[str]:
    """For each linear op, the shortest T where its fwd+bwd beats every full softmax impl."""
    lines = []
    for op in LINEAR:
        found = None
        for length, row in sorted(results.items()):
            softmax = [row[f"softmax {impl}"]["fwdbwd_s"] for impl in SOFTMAX_IMPLS]
            best = min((s for s in softmax if s is not None), default=None)
            ours = row[f"{op} chunked"]["fwdbwd_s"]
            if ours is not None and best is not None and ours < best:
                found = (length, best / ours)
                break
        if found is None:
            lines.append(f"{op}: slower than softmax attention at every T measured")
        else:
            lines.append(
                f"{op}: first faster than the fastest softmax impl at T = {found[0]} "
                f"({found[1]:.2f}x, forward+backward)"
            )
    return lines


def main() -> None:
    parser = head_size_parser(
        __doc__.splitlines()[0],
        ops="softmax_attention",
        lengths="128,256,512,1024,2048,4096,8192,16384,32768",
        out="results/attention.json",
    )
    parser.set_defaults(dims="64", batch=1, repeats=3)
    parser.add_argument("--window", type=int, default=512)
    args = parser.parse_args()
    headers = ["impl", "fwd tok/s", "fwd+bwd tok/s", "vs reference (fwd / fwd+bwd)"]
    headers += ["fwd+bwd temp memory", "bytes/token"]
    fields = ("fwd_s", "fwdbwd_s", "temp_bytes")
    results: dict = {"device": str(jax.devices()[0])}
    limit = int(args.memory_limit_gib * 2**30)
    for dim in (int(d) for d in args.dims.split(",")):
        by_length = {}
        for length in (int(t) for t in args.lengths.split(",")):
            inputs = make_inputs(args.batch, length, args.heads, dim)
            tokens = args.batch * length
            rows, raw = impl_rows(candidates(args.window), inputs, tokens, args.repeats, limit)
            by_length[length] = {
                name: dict(zip(fields, times, strict=True)) for name, times in raw.items()
            }
            print(f"\ncausal attention  B={args.batch} T={length} H={args.heads} K=V={dim} float32")
            print(markdown_table(headers, rows), flush=True)
        results[f"K=V={dim}"] = {str(t): r for t, r in by_length.items()}
        for line in crossovers(by_length):
            print(line)
    write_results(args.out, results)


if __name__ == "__main__":
    main()
