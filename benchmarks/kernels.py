"""The Pallas kernels against the pure-JAX chunked paths, cuDNN attention and fla's Triton kernels.

    python -m benchmarks.kernels                          # on a GPU or TPU: B=8, H=16, K=V=128,
                                                          # bf16, T = 2K .. 32K
    python -m benchmarks.kernels --check                  # also compare values and gradients
    python -m benchmarks.kernels --quick                  # a tiny run that exercises the script

For each op and length, the table gives the median forward and forward+backward time of:

- `pallas`: the op with `impl="pallas"` (the kernels of `pallas_kernels`);
- `jax`: the op's pure-JAX path (`impl="chunked"`), timed interleaved with `pallas` in the same
  process, so the ratio between them (the speed-up column, jax's time over each row's) is
  meaningful on a noisy machine;
- `attention` rows, `cudnn` (GPU) / `xla`: `jax.nn.dot_product_attention`, causal, on
  `q, k, v` of the same shape: the speed a linear-time op should beat at long T;
- `fla`: flash-linear-attention's Triton kernel of the op on the same shapes (torch tensors on
  the same GPU), where `fla` (and for the selective scan `mamba_ssm`) is installed; timed with
  CUDA events right after the JAX candidates.

and the achieved TFLOP/s of each, counted with the op's FLOP model below, against the device's
dense bf16 peak (a table by device kind; unknown devices show no fraction). `--check` compares
the kernels' outputs, final states and gradients with the pure-JAX path on the benchmark
shapes (maximum relative error), which is the on-hardware correctness check of issue 10.

FLOP models (per forward; forward+backward counted as 3x, the usual matmul-bound ratio, for
every candidate alike), with chunk C = 64, for B * H heads over T tokens:

- gated linear attention: `2 T (C K + C V + 2 K V)` (intra-chunk scores and their values, the
  state read and the state update);
- delta rule: the above plus the UT transform, `2 T (C K + C V + C^2 / 3 + K V)`;
- diagonal recurrences (linear recurrence, selective scan with state N): `2 T D` and
  `6 T D N` elementwise flops, shown for completeness (these ops are bandwidth-bound; their
  GB/s is the better measure and is given in the raw JSON);
- causal attention: `2 T^2 (K + V) / 2`.

On CPU every kernel runs in Pallas's interpret mode: the script runs (use `--quick`), but its
times say nothing about the kernels.
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import compile_all, markdown_table, median_seconds, write_results
from seqjax.ops.delta_rule import delta_rule, gated_delta_rule
from seqjax.ops.gla import gla, simple_gla
from seqjax.ops.selective_scan import selective_scan
from seqjax.scan import linear_recurrence

CHUNK = 64
STATE_SIZE = 16  # Mamba's N
# Dense bf16 peak TFLOP/s by `device_kind` prefix (vendor data sheets; SXM parts for NVIDIA).
PEAK_TFLOPS = {
    "NVIDIA H200": 989.0,
    "NVIDIA H100": 989.0,
    "NVIDIA A100": 312.0,
    "NVIDIA L4": 121.0,
    "TPU v4": 275.0,
    "TPU v5 lite": 197.0,
    "TPU v5e": 197.0,
    "TPU v5p": 459.0,
    "TPU v5": 459.0,
    "TPU v6 lite": 918.0,
    "TPU v6e": 918.0,
}
MATRIX_STATE_OPS = {
    "simple_gla": simple_gla,
    "gla": gla,
    "delta_rule": delta_rule,
    "gated_delta_rule": gated_delta_rule,
}
OPS = ("simple_gla", "gla", "delta_rule", "gated_delta_rule", "linear_recurrence", "selective_scan")


def peak_tflops() -> float | None:
    kind = jax.devices()[0].device_kind
    for prefix, peak in PEAK_TFLOPS.items():
        if kind.startswith(prefix):
            return peak
    return None


def make_inputs(op: str, batch: int, length: int, heads: int, dim: int, dtype) -> tuple:
    """The op's positional inputs: `[B, T, H, K]` heads for the matrix-state ops, `[B, T, D]`
    with `D = H * K` channels for the diagonal ones; decays as the layers make them."""
    keys = jax.random.split(jax.random.key(length), 6)
    shape = (batch, length, heads, dim)

    def normal(key, shape, scale=1.0):
        return (jax.random.normal(key, shape) * scale).astype(dtype)

    if op == "linear_recurrence":
        channels = (batch, length, heads * dim)
        a = jax.nn.sigmoid(4.0 + jax.random.normal(keys[0], channels)).astype(dtype)
        return a, normal(keys[1], channels)
    if op == "selective_scan":
        channels = (batch, length, heads * dim)
        A = -jnp.exp(jax.random.normal(keys[2], (heads * dim, STATE_SIZE)) * 0.5)
        groups = (batch, length, 1, STATE_SIZE)
        return (
            normal(keys[0], channels),
            normal(keys[1], channels, 0.5),
            A,
            normal(keys[3], groups),
            normal(keys[4], groups),
        )
    q, k, v = normal(keys[0], shape), normal(keys[1], shape, dim**-0.5), normal(keys[2], shape)
    if op in ("delta_rule", "gated_delta_rule"):
        k = (k / jnp.linalg.norm(k.astype(jnp.float32), axis=-1, keepdims=True)).astype(dtype)
        beta = jax.nn.sigmoid(jax.random.normal(keys[3], shape[:3])).astype(dtype)
        if op == "delta_rule":
            return q, k, v, beta
        g = jax.nn.log_sigmoid(4.0 + jax.random.normal(keys[4], shape[:3]))
        return q, k, v, g.astype(dtype), beta
    if op == "gla":  # GLA's gate: logsigmoid(.) / 16
        return q, k, v, (jax.nn.log_sigmoid(jax.random.normal(keys[3], shape)) / 16).astype(dtype)
    return q, k, v, jax.nn.log_sigmoid(4.0 + jax.random.normal(keys[3], shape[:3])).astype(dtype)


def op_call(op: str, impl: str):
    """`(*inputs) -> (output, final state)` of the op with `impl`."""
    if op == "linear_recurrence":
        return functools.partial(linear_recurrence, impl=impl)
    if op == "selective_scan":
        return lambda x, dt, A, B, C: selective_scan(x, dt, A, B, C, impl=impl)
    return functools.partial(MATRIX_STATE_OPS[op], impl=impl)


def flops(op: str, batch: int, length: int, heads: int, dim: int) -> float:
    """Forward FLOPs of the module docstring's model."""
    tokens = batch * heads * length
    if op == "linear_recurrence":
        return 2.0 * tokens * dim
    if op == "selective_scan":
        return 6.0 * tokens * dim * STATE_SIZE
    per_token = CHUNK * dim + CHUNK * dim + 2 * dim * dim
    if op in ("delta_rule", "gated_delta_rule"):
        per_token += CHUNK**2 / 3 + dim * dim
    return 2.0 * tokens * per_token


def attention_flops(batch: int, length: int, heads: int, dim: int) -> float:
    return 2.0 * batch * heads * length**2 * dim  # causal: half of 2 T^2 (K + V)


def loss_of(fn):
    """Sum of squares of the output plus the final state's: every input gets a gradient."""

    def loss(*args):
        out, final = fn(*args)
        return jnp.sum(out.astype(jnp.float32) ** 2) + jnp.sum(final.astype(jnp.float32) ** 2)

    return loss


def attention_call():
    implementation = "cudnn" if jax.default_backend() == "gpu" else None

    def attend(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=implementation)

    return attend


def max_relative_error(x, y) -> float:
    x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
    return float(np.max(np.abs(x - y)) / max(np.max(np.abs(y)), 1e-30))


def check(op: str, args) -> dict[str, float]:
    """Kernel vs pure-JAX path: max relative error of output, final state and each gradient."""
    kernel, reference = op_call(op, "pallas"), op_call(op, "chunked")
    errors = {}
    for name, index in (("output", 0), ("final_state", 1)):
        errors[name] = max_relative_error(
            jax.jit(kernel)(*args)[index], jax.jit(reference)(*args)[index]
        )
    floating = tuple(i for i, x in enumerate(args) if jnp.issubdtype(x.dtype, jnp.floating))
    grads = [jax.jit(jax.grad(loss_of(f), argnums=floating))(*args) for f in (kernel, reference)]
    for i, g_kernel, g_reference in zip(floating, *grads, strict=True):
        errors[f"grad_{i}"] = max_relative_error(g_kernel, g_reference)
    return errors


def fla_seconds(op: str, args, repeats: int) -> tuple[float, float] | None:
    """Median forward and forward+backward seconds of fla's Triton kernel (mamba_ssm's CUDA
    scan for the selective scan), or None where torch with CUDA or the package is missing."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    try:
        fn = _fla_function(op)
    except ImportError:
        return None
    tensors = [torch.from_dlpack(x).clone().requires_grad_() for x in args]

    def timed(run) -> float:
        times = []
        for i in range(repeats + 1):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            torch.cuda.synchronize()
            if i:  # the first call compiles
                times.append(start.elapsed_time(end) / 1e3)
        return float(np.median(times))

    def backward():
        out, final = fn(*tensors)
        (out.float().square().sum() + final.float().square().sum()).backward()

    return timed(lambda: fn(*tensors)), timed(backward)


def _fla_function(op: str):
    """fla's kernel for `op` with our argument order, returning `(output, final state)`."""
    if op == "selective_scan":
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

        def scan(x, dt, A, B, C):  # mamba_ssm's layout: [B, D, T] and [B, G, N, T]
            y, last = selective_scan_fn(
                x.transpose(1, 2),
                dt.transpose(1, 2),
                A.float(),
                B.permute(0, 2, 3, 1),
                C.permute(0, 2, 3, 1),
                delta_softplus=True,
                return_last_state=True,
            )
            return y, last

        return scan
    if op == "linear_recurrence":
        from fla.ops.hgrn import chunk_hgrn

        return lambda a, b: chunk_hgrn(b, a.float().log(), output_final_state=True)
    from fla.ops.delta_rule import chunk_delta_rule
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    from fla.ops.gla import chunk_gla
    from fla.ops.simple_gla import chunk_simple_gla

    fn = {
        "simple_gla": chunk_simple_gla,
        "gla": chunk_gla,
        "delta_rule": chunk_delta_rule,
        "gated_delta_rule": chunk_gated_delta_rule,
    }[op]
    return lambda *args: fn(*args, output_final_state=True)


def timed(forward: dict, args, repeats: int) -> tuple[dict, dict]:
    """Median forward and forward+backward seconds of each `(*args) -> (output, state)`,
    interleaved; gradients w.r.t. every floating argument."""
    floating = tuple(i for i, x in enumerate(args) if jnp.issubdtype(x.dtype, jnp.floating))
    backward = {name: jax.grad(loss_of(fn), argnums=floating) for name, fn in forward.items()}
    fwd_s = median_seconds(compile_all(forward, *args), *args, repeats=repeats)
    bwd_s = median_seconds(compile_all(backward, *args), *args, repeats=repeats)
    return fwd_s, bwd_s


def table_rows(op, length, work, fwd_s, bwd_s, baseline, peak):
    rows, raw = [], {}
    for name in fwd_s:
        tflops = (work / fwd_s[name] / 1e12, 3 * work / bwd_s[name] / 1e12)
        of_peak = "" if peak is None else f"{tflops[0] / peak:.1%} / {tflops[1] / peak:.1%}"
        ratio = f"{fwd_s[baseline] / fwd_s[name]:.2f}x / {bwd_s[baseline] / bwd_s[name]:.2f}x"
        rows.append(
            [
                op,
                length,
                name,
                f"{fwd_s[name] * 1e3:.2f} / {bwd_s[name] * 1e3:.2f}",
                ratio,
                f"{tflops[0]:.1f} / {tflops[1]:.1f}",
                of_peak,
            ]
        )
        raw[name] = dict(fwd_s=fwd_s[name], fwdbwd_s=bwd_s[name], tflops=tflops)
    return rows, raw


def bench(op: str, length: int, arguments: argparse.Namespace, peak: float | None):
    """Rows of `op` at length T: pallas, jax (the chunked path, the ratios' baseline), fla."""
    shape = (arguments.batch, length, arguments.heads, arguments.dim)
    args = make_inputs(op, *shape, jnp.dtype(arguments.dtype))
    forward = {"pallas": op_call(op, "pallas"), "jax": op_call(op, "chunked")}
    fwd_s, bwd_s = timed(forward, args, arguments.repeats)
    peer = fla_seconds(op, args, arguments.repeats)
    if peer is not None:
        fwd_s["fla"], bwd_s["fla"] = peer
    rows, raw = table_rows(op, length, flops(op, *shape), fwd_s, bwd_s, "jax", peak)
    if arguments.check:
        raw["check"] = check(op, args)
        print(f"{op} T={length}: max relative errors {raw['check']}")
    return rows, raw


def bench_attention(length: int, arguments: argparse.Namespace, peak: float | None):
    """Causal softmax attention (cuDNN on GPU) on q, k, v of the benchmark's shape."""
    shape = (arguments.batch, length, arguments.heads, arguments.dim)
    args = make_inputs("simple_gla", *shape, jnp.dtype(arguments.dtype))[:3]
    attend = attention_call()
    name = "cudnn" if jax.default_backend() == "gpu" else "xla"
    fwd_s, bwd_s = timed({name: lambda *a: (attend(*a), jnp.zeros(()))}, args, arguments.repeats)
    work = attention_flops(*shape)
    return table_rows("attention", length, work, fwd_s, bwd_s, name, peak)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ops", default=",".join(OPS))
    parser.add_argument("--lengths", default="2048,4096,8192,16384,32768")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--dim", type=int, default=128, help="head size K = V")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--quick", action="store_true", help="B=1, H=2, K=V=32, T=128")
    parser.add_argument("--out", default="benchmarks/results/kernels.json")
    arguments = parser.parse_args()
    if arguments.quick:
        arguments.batch, arguments.heads, arguments.dim, arguments.lengths = 1, 2, 32, "128"
        arguments.repeats = 2
    device = jax.devices()[0]
    peak = peak_tflops()
    print(f"device: {device.device_kind} ({jax.default_backend()}), peak {peak} TFLOP/s bf16")
    if jax.default_backend() == "cpu":
        print("no accelerator: the kernels run in interpret mode; their times mean nothing")
    headers = ["op", "T", "impl", "fwd / fwd+bwd ms", "speed-up", "TFLOP/s", "of peak"]
    rows, results = [], {"device": device.device_kind, "args": vars(arguments), "runs": {}}
    for length in map(int, arguments.lengths.split(",")):
        for op in arguments.ops.split(","):
            try:
                op_rows, raw = bench(op, length, arguments, peak)
            except Exception as error:  # one op's failure (compilation, memory) ends no others
                message = f"{type(error).__name__}: {error}"
                print(f"{op} T={length}: FAILED {message[:4000]}", flush=True)
                op_rows, raw = [[op, length, "pallas", "failed", "", "", ""]], {"error": message}
            rows += op_rows
            results["runs"][f"{op}/{length}"] = raw
        op_rows, results["runs"][f"attention/{length}"] = bench_attention(length, arguments, peak)
        rows += op_rows
    print(markdown_table(headers, rows))
    write_results(arguments.out, results)


if __name__ == "__main__":
    main()
