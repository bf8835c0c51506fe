"""Every op of seqjax on a real-size input: forward and forward+backward throughput.

    python -m benchmarks.ops            # a few minutes on 2 CPU cores
    python -m benchmarks.ops --quick    # tiny sizes, a smoke test

Each op runs at the sizes of a ~1B-parameter layer of its paper, shrunk in T and B to fit a
CPU, with the impl `"auto"` picks; the reference (a token loop) is timed beside it where it
fits. Prints a table of tokens/s.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from benchmarks.common import compile_all, fmt_rate, markdown_table, median_seconds
from seqjax.ops.aaren import aaren
from seqjax.ops.attention import softmax_attention
from seqjax.ops.delta_rule import delta_rule, gated_delta_rule
from seqjax.ops.gla import gla, linear_attention, simple_gla
from seqjax.ops.hgrn import hgrn
from seqjax.ops.hybrid_attention import sliding_window_hybrid_attention
from seqjax.ops.lru import lru
from seqjax.ops.mlstm import mlstm
from seqjax.ops.prefix_linear_attention import prefix_linear_attention
from seqjax.ops.rg_lru import rg_lru
from seqjax.ops.s4 import nplr, s4d, s5
from seqjax.ops.selective_scan import selective_scan
from seqjax.ops.ssd import ssd
from seqjax.scan import linear_recurrence


def normal(key, *shape):
    return jax.random.normal(key, shape)


def complex_normal(key, *shape):
    kr, ki = jax.random.split(key)
    return (normal(kr, *shape) + 1j * normal(ki, *shape)) / jnp.sqrt(2.0)


def matrix_state_cases(batch: int, length: int, width: int, key: jax.Array) -> dict:
    """The linear-attention family and attention at heads of 64 channels (width / 64 heads,
    K = V = 64)."""
    heads, dim = max(width // 64, 1), min(width, 64)
    k = jax.random.split(key, 8)
    q, kk, v = (normal(k[i], batch, length, heads, dim) * dim**-0.25 for i in range(3))
    per_head = normal(k[3], batch, length, heads)
    positive = jax.nn.elu(q) + 1, jax.nn.elu(kk) + 1
    unit_keys = kk / jnp.linalg.norm(kk, axis=-1, keepdims=True)
    groups, state = 1, 64
    return {
        "linear_attention": (
            lambda q, k, v, impl: linear_attention(q, k, v, impl=impl),
            (q, kk, v),
        ),
        "simple_gla": (
            lambda q, k, v, g, impl: simple_gla(q, k, v, g, impl=impl),
            (q, kk, v, jax.nn.log_sigmoid(4.0 + per_head)),
        ),
        "gla": (
            lambda q, k, v, g, impl: gla(q, k, v, g, impl=impl),
            (q, kk, v, jax.nn.log_sigmoid(normal(k[4], batch, length, heads, dim)) / 16),
        ),
        "delta_rule": (
            lambda q, k, v, beta, impl: delta_rule(q, k, v, beta, impl=impl),
            (q, unit_keys, v, 2.0 * jax.nn.sigmoid(per_head)),
        ),
        "gated_delta_rule": (
            lambda q, k, v, g, beta, impl: gated_delta_rule(q, k, v, g, beta, impl=impl),
            (q, unit_keys, v, jax.nn.log_sigmoid(4.0 + per_head), jax.nn.sigmoid(per_head)),
        ),
        "ssd": (
            lambda x, dt, A, B, C, impl: ssd(x, dt, A, B, C, impl=impl),
            (
                v,
                per_head - 2.0,
                -jnp.linspace(1.0, 16.0, heads),
                normal(k[5], batch, length, groups, state),
                normal(k[6], batch, length, groups, state),
            ),
        ),
        "mlstm": (
            lambda q, k, v, i, f, impl: mlstm(q, k, v, i, f, impl=impl),
            (q, kk, v, per_head, 3.0 + normal(k[7], batch, length, heads)),
        ),
        "softmax_attention": (
            lambda q, k, v, impl: softmax_attention(q, k, v, impl=impl),
            (q, kk, v),
        ),
        "softmax_attention, window 512": (
            lambda q, k, v, impl: softmax_attention(q, k, v, window=512, impl=impl),
            (q, kk, v),
        ),
        "aaren": (
            lambda q, k, v, impl: aaren(q, k, v, impl=impl),
            (q[:, 0], kk, v),
        ),
        "sliding_window_hybrid_attention (64)": (
            lambda q, k, v, pq, pk, impl: sliding_window_hybrid_attention(
                q, k, v, pq, pk, 64, 0.1, impl=impl
            ),
            (q, kk, v, *positive),
        ),
        "prefix_linear_attention": (
            lambda q, k, v, ke, ve, impl: prefix_linear_attention(
                q, k, v, ke, ve, length // 4, impl=impl
            ),
            (*positive, v, positive[1][:, ::-1], v[:, ::-1]),
        ),
    }


def cases(batch: int, length: int, width: int, key: jax.Array) -> dict:
    """name -> (fn(*args, impl) -> (out, state), args): inputs shaped like a real layer's."""
    k = jax.random.split(key, 8)
    state = 16
    decay = jax.random.uniform(k[0], (batch, length, width), minval=0.9, maxval=1.0)
    x = normal(k[1], batch, length, width)
    legs = nplr("legs", 2 * state)
    lam = jnp.tile(jnp.asarray(legs.Lambda, jnp.complex64), (width, 1))
    lru_radius = jax.random.uniform(k[2], (4 * state,), minval=0.9, maxval=0.999)
    return {
        "linear_recurrence": (
            # The scan layer's token loop is its "sequential" impl.
            lambda a, b, impl: linear_recurrence(
                a, b, impl="sequential" if impl == "reference" else impl
            ),
            (decay, x),
        ),
        "hgrn": (
            lambda x, g, impl: hgrn(x, g, impl=impl),
            (x, jnp.log(decay)),
        ),
        "rg_lru": (
            lambda x, gx, ga, p, impl: rg_lru(x, gx, ga, p, impl=impl),
            (
                x,
                normal(k[3], batch, length, width),
                normal(k[4], batch, length, width),
                jnp.full((width,), -4.0),
            ),
        ),
        "lru": (
            lambda x, nu, th, B, C, D, impl: lru(x, nu, th, B, C, D, impl=impl),
            (
                x,
                jnp.log(-jnp.log(lru_radius)),
                jnp.log(jnp.linspace(0.01, 3.0, 4 * state)),
                complex_normal(k[5], 4 * state, width),
                complex_normal(k[6], width, 4 * state),
                jnp.ones((width,)),
            ),
        ),
        "selective_scan": (
            lambda x, dt, A, B, C, impl: selective_scan(x, dt, A, B, C, impl=impl),
            (
                x,
                normal(k[3], batch, length, width) - 2.0,
                -jnp.tile(jnp.arange(1.0, state + 1.0), (width, 1)),
                normal(k[4], batch, length, state),
                normal(k[5], batch, length, state),
            ),
        ),
        "s4d (fft view)": (
            lambda u, L, B, C, dt, impl: s4d(u, L, B, C, dt, impl=impl),
            (
                x,
                lam,
                jnp.ones_like(lam),
                complex_normal(k[6], width, state),
                jnp.full((width,), 0.01),
            ),
        ),
        "s5": (
            lambda u, L, B, C, dt, impl: s5(u, L, B, C, dt, impl=impl),
            (
                x,
                lam[0],
                complex_normal(k[5], state, width),
                complex_normal(k[6], width, state),
                jnp.full((state,), 0.01),
            ),
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
    args = parser.parse_args()
    if args.quick:
        args.batch, args.length, args.width, args.repeats = 1, 256, 32, 1
    tokens = args.batch * args.length
    print(f"device: {jax.devices()[0]}, B={args.batch} T={args.length} D={args.width} float32")
    rows = []
    key = jax.random.key(0)
    every_case = {
        **cases(args.batch, args.length, args.width, key),
        **matrix_state_cases(args.batch, args.length, args.width, key),
    }
    for name, (fn, inputs) in every_case.items():
        impls = ("auto", "reference")

        def loss(*inputs, fn=fn, impl="auto"):
            out, state = fn(*inputs, impl)
            state_norm = sum(jnp.sum(jnp.abs(leaf) ** 2) for leaf in jax.tree.leaves(state))
            return jnp.sum(out.astype(jnp.float32) ** 2) + state_norm

        every_input = tuple(range(len(inputs)))
        forward = {impl: lambda *xs, fn=fn, impl=impl: fn(*xs, impl) for impl in impls}
        backward = {
            impl: jax.grad(
                lambda *xs, fn=fn, impl=impl: loss(*xs, fn=fn, impl=impl), argnums=every_input
            )
            for impl in impls
        }
        fwd = median_seconds(compile_all(forward, *inputs), *inputs, repeats=args.repeats)
        bwd = median_seconds(compile_all(backward, *inputs), *inputs, repeats=args.repeats)
        rows.append(
            [
                name,
                fmt_rate(tokens, fwd["auto"]),
                fmt_rate(tokens, bwd["auto"]),
                fmt_rate(tokens, fwd["reference"]),
                fmt_rate(tokens, bwd["reference"]),
                f"{fwd['reference'] / fwd['auto']:.1f}x",
            ]
        )
        print(f"  {name}: done", flush=True)
    headers = [
        "op",
        "auto fwd tok/s",
        "auto fwd+bwd tok/s",
        "reference fwd tok/s",
        "reference fwd+bwd tok/s",
        "fwd speed-up",
    ]
    print(markdown_table(headers, rows))


if __name__ == "__main__":
    main()
