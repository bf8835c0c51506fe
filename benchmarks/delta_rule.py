"""Throughput and memory of the delta-rule family, next to flash-linear-attention's PyTorch forms.

    python -m benchmarks.delta_rule                                  # T = 512 .. 16K
    python -m benchmarks.delta_rule --lengths 4096 --dims 64         # quicker

For each op (`delta_rule`, `gated_delta_rule`), head size (K = V) and T, the table gives
forward and forward+backward tokens/s (B * T / median seconds) of every impl, its speed-up
over the token loop (`impl="reference"`), and the scratch memory XLA plans for
forward+backward. Inputs are a DeltaNet layer's: L2-normalized keys, `beta = 2 sigmoid(.)`
(negative eigenvalues), Gated DeltaNet's `g = logsigmoid(.)`-range decays.

The peer row is flash-linear-attention's pure-PyTorch chunked form on the same inputs
(`benchmarks/fla_peer.py` says which function and how to install it), where installed.
Impls whose forward+backward would not fit in `--memory-limit-gib` are skipped and marked so;
`"parallel"` (one T x T chunk) runs only up to `--parallel-max-length`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import fmt_rate, head_size_parser, impl_rows, markdown_table, write_results
from benchmarks.fla_peer import fla_peers
from seqjax.ops.delta_rule import delta_rule, gated_delta_rule

CHUNK = 64
OPS = {"delta_rule": delta_rule, "gated_delta_rule": gated_delta_rule}


def make_inputs(op: str, batch: int, length: int, heads: int, dim: int) -> tuple:
    """The op's positional inputs: `(q, k, v, beta)` or `(q, k, v, g, beta)`."""
    keys = jax.random.split(jax.random.key(length + dim), 5)
    q = jax.random.normal(keys[0], (batch, length, heads, dim))
    k = jax.random.normal(keys[1], (batch, length, heads, dim))
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    v = jax.random.normal(keys[2], (batch, length, heads, dim))
    beta = 2.0 * jax.nn.sigmoid(jax.random.normal(keys[3], (batch, length, heads)))
    if op == "delta_rule":
        return q, k, v, beta
    g = jax.nn.log_sigmoid(4.0 + jax.random.normal(keys[4], (batch, length, heads)))
    return q, k, v, g, beta


def bench(op: str, length: int, dim: int, args, peers: dict) -> tuple[list, dict, str]:
    """Rows of one table, its raw times, and the note comparing chunked with the peer."""
    inputs = make_inputs(op, args.batch, length, args.heads, dim)
    impls = ["reference", "chunked"]
    if length <= args.parallel_max_length:
        impls.append("parallel")
    fn = OPS[op]
    fns = {impl: lambda *xs, impl=impl: fn(*xs, impl=impl, chunk_size=CHUNK)[0] for impl in impls}
    tokens = args.batch * length
    limit = int(args.memory_limit_gib * 2**30)
    rows, raw = impl_rows(fns, inputs, tokens, args.repeats, limit)
    fields = ("fwd_s", "fwdbwd_s", "temp_bytes")
    result = {name: dict(zip(fields, times, strict=True)) for name, times in raw.items()}
    if op not in peers:
        return rows, result, ""
    peer_fwd, peer_bwd = peers[op]([np.asarray(x) for x in inputs], args.repeats)
    rows.append(["fla naive chunked (PyTorch)", fmt_rate(tokens, peer_fwd)])
    rows[-1] += [fmt_rate(tokens, peer_bwd), "", "not measured", ""]
    result["fla"] = {"fwd_s": peer_fwd, "fwdbwd_s": peer_bwd}
    chunked_bwd = raw["chunked"][1]
    note = "" if chunked_bwd is None else f"chunked fwd+bwd {peer_bwd / chunked_bwd:.1f}x the peer"
    return rows, result, note


def main() -> None:
    parser = head_size_parser(
        __doc__.splitlines()[0],
        ops="delta_rule,gated_delta_rule",
        lengths="512,4096,16384",
        out="results/delta_rule.json",
    )
    parser.add_argument("--parallel-max-length", type=int, default=2048)
    args = parser.parse_args()
    ops = args.ops.split(",")
    peers = fla_peers(ops)
    headers = ["impl", "fwd tok/s", "fwd+bwd tok/s", "vs token loop (fwd / fwd+bwd)"]
    headers += ["fwd+bwd temp memory", "bytes/token"]
    results: dict = {"device": str(jax.devices()[0])}
    for dim in (int(d) for d in args.dims.split(",")):
        for length in (int(t) for t in args.lengths.split(",")):
            for op in ops:
                rows, results[f"{op} K=V={dim} T={length}"], note = bench(
                    op, length, dim, args, peers
                )
                print(f"\n{op}  B={args.batch} T={length} H={args.heads} K=V={dim} float32")
                print(markdown_table(headers, rows))
                print(note, flush=True)
    write_results(args.out, results)


if __name__ == "__main__":
    main()
