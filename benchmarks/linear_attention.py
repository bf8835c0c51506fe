"""Throughput, memory and matmul efficiency of the gated linear-attention family.

    python -m benchmarks.linear_attention                                 # T = 512 .. 32K
    python -m benchmarks.linear_attention --lengths 4096 --dims 64        # quicker

For each op (`gla`, `simple_gla`, `linear_attention`), head size (K = V) and T, the table gives
forward and forward+backward tokens/s (B * T / median seconds) of every impl, the scratch
memory XLA plans for forward+backward (total and per token), and two reference rates measured
in the same run:

- the achieved FLOP/s of the chunked forward, counting `2 B H T (C K + C V + 2 K V)` flops
  (C = 64), as a fraction of what XLA reaches on the chunked form's batched `C x K x C` score
  matmuls alone, and of a large square matmul;
- flash-linear-attention's pure-PyTorch naive forms on the same inputs (`benchmarks/fla_peer.py`
  says which form and how to install it), where installed.

Impls whose forward+backward would not fit in `--memory-limit-gib` are skipped and marked so;
the token-loop peers are skipped beyond `--peer-max-length`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import (
    compile_all,
    fmt_bytes,
    fmt_rate,
    head_size_parser,
    markdown_table,
    median_seconds,
    temp_bytes,
    write_results,
)
from benchmarks.fla_peer import fla_peers
from seqjax.ops.gla import gla, linear_attention, simple_gla

CHUNK = 64
OPS = {"gla": gla, "simple_gla": simple_gla, "linear_attention": linear_attention}
IMPLS = ("chunked", "parallel", "reference")


def make_inputs(op: str, batch: int, length: int, heads: int, dim: int):
    keys = jax.random.split(jax.random.key(length + dim), 4)
    q = jax.random.normal(keys[0], (batch, length, heads, dim))
    k = jax.random.normal(keys[1], (batch, length, heads, dim)) * dim**-0.5
    v = jax.random.normal(keys[2], (batch, length, heads, dim))
    if op == "gla":  # GLA's gate: logsigmoid(.) / 16
        return q, k, v, jax.nn.log_sigmoid(jax.random.normal(keys[3], q.shape)) / 16
    if op == "simple_gla":
        return q, k, v, jax.nn.log_sigmoid(4.0 + jax.random.normal(keys[3], q.shape[:3]))
    return q, k, v


def op_functions(op: str) -> tuple[dict, dict]:
    fn = OPS[op]
    forward, backward = {}, {}
    for impl in IMPLS:

        def run(*args, impl=impl):
            return fn(*args, impl=impl, chunk_size=CHUNK)[0]

        def loss(*args, run=run):
            return jnp.sum(run(*args) ** 2)

        forward[impl] = run
        backward[impl] = jax.grad(loss, argnums=tuple(range(4 if op != "linear_attention" else 3)))
    return forward, backward


def matmul_rates(batch: int, length: int, heads: int, dim: int, repeats: int) -> dict:
    """FLOP/s of the chunked form's batched C x K x C score matmuls, and of a square matmul."""
    chunks = -(-length // CHUNK)
    keys = jax.random.split(jax.random.key(0), 3)
    # The engine's layout, heads before chunks: XLA's fastest for these batched matmuls.
    q = jax.random.normal(keys[0], (batch, heads, chunks, CHUNK, dim))
    k = jax.random.normal(keys[1], (batch, heads, chunks, CHUNK, dim))
    square = jax.random.normal(keys[2], (2048, 2048))
    scores = compile_all({"scores": lambda q, k: jnp.einsum("bhnck,bhnsk->bhncs", q, k)}, q, k)
    big = compile_all({"square": lambda a: a @ a}, square)
    scores_s = median_seconds(scores, q, k, repeats=repeats)["scores"]
    square_s = median_seconds(big, square, repeats=repeats)["square"]
    return {
        "batched": 2 * batch * chunks * heads * CHUNK * CHUNK * dim / scores_s,
        "square": 2 * 2048**3 / square_s,
    }


def bench(op, batch, length, heads, dim, repeats, limit, peers, peer_max_length):
    args = make_inputs(op, batch, length, heads, dim)
    tokens = batch * length
    forward, backward = op_functions(op)
    compiled_bwd = compile_all(backward, *args)
    memory = {impl: temp_bytes(c) for impl, c in compiled_bwd.items()}
    runnable = [impl for impl in IMPLS if memory[impl] <= limit]
    if length > 8192:  # the token loop and the T x T form take minutes there
        runnable = [impl for impl in runnable if impl == "chunked"]
    fwd_s = median_seconds(
        compile_all({i: forward[i] for i in runnable}, *args), *args, repeats=repeats
    )
    bwd_s = median_seconds({i: compiled_bwd[i] for i in runnable}, *args, repeats=repeats)
    rows, raw = [], {}
    for impl in IMPLS:
        if impl not in runnable:
            why = "over memory limit" if memory[impl] > limit else "skipped at this T"
            rows.append([impl, why, "", fmt_bytes(memory[impl]), f"{memory[impl] / tokens:.0f}"])
            continue
        rows.append(
            [
                impl,
                fmt_rate(tokens, fwd_s[impl]),
                fmt_rate(tokens, bwd_s[impl]),
                fmt_bytes(memory[impl]),
                f"{memory[impl] / tokens:.0f}",
            ]
        )
        raw[impl] = {"fwd_s": fwd_s[impl], "fwdbwd_s": bwd_s[impl], "temp_bytes": memory[impl]}
    if op in peers and length <= peer_max_length:
        peer_fwd, peer_bwd = peers[op]([np.asarray(x) for x in args], repeats)
        rows.append(
            [
                "fla naive (PyTorch)",
                fmt_rate(tokens, peer_fwd),
                fmt_rate(tokens, peer_bwd),
                "not measured",
                "",
            ]
        )
        raw["fla"] = {"fwd_s": peer_fwd, "fwdbwd_s": peer_bwd}
    return rows, raw


def main() -> None:
    parser = head_size_parser(
        __doc__.splitlines()[0],
        ops="gla,simple_gla,linear_attention",
        lengths="512,4096,32768",
        out="results/linear_attention.json",
    )
    parser.add_argument("--peer-max-length", type=int, default=8192)
    args = parser.parse_args()
    limit = int(args.memory_limit_gib * 2**30)
    ops = args.ops.split(",")
    peers = fla_peers(ops)
    headers = ["impl", "fwd tok/s", "fwd+bwd tok/s", "fwd+bwd temp memory", "bytes/token"]
    results: dict = {"device": str(jax.devices()[0])}
    for dim in (int(d) for d in args.dims.split(",")):
        for length in (int(t) for t in args.lengths.split(",")):
            rates = matmul_rates(args.batch, length, args.heads, dim, args.repeats)
            for op in ops:
                rows, raw = bench(
                    op,
                    args.batch,
                    length,
                    args.heads,
                    dim,
                    args.repeats,
                    limit,
                    peers,
                    args.peer_max_length,
                )
                flops = 2 * args.batch * args.heads * length * (2 * CHUNK * dim + 2 * dim * dim)
                note = ""
                if "chunked" in raw:
                    achieved = flops / raw["chunked"]["fwd_s"]
                    note = (
                        f"chunked fwd {achieved / 1e9:.1f} GFLOP/s = "
                        f"{achieved / rates['batched']:.0%} of batched CxKxC matmuls "
                        f"({rates['batched'] / 1e9:.1f} GFLOP/s), "
                        f"{achieved / rates['square']:.0%} of a 2048^2 matmul "
                        f"({rates['square'] / 1e9:.1f} GFLOP/s)"
                    )
                    if "fla" in raw:
                        note += (
                            f"; fwd+bwd {raw['fla']['fwdbwd_s'] / raw['chunked']['fwdbwd_s']:.1f}x"
                            " the fla peer"
                        )
                raw["rates"] = rates
                results[f"{op} K=V={dim} T={length}"] = raw
                print(f"\n{op}  B={args.batch} T={length} H={args.heads} K=V={dim} float32")
                print(markdown_table(headers, rows))
                print(note, flush=True)
    write_results(args.out, results)


if __name__ == "__main__":
    main()
