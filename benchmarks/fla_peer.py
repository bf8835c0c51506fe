"""A PyTorch CPU peer for the recurrent-op benchmarks: flash-linear-attention's naive ops.

flash-linear-attention (PyPI `fla-core`, module `fla`) ships pure-PyTorch reference forms
of its ops next to its Triton kernels, in `fla/ops/<op>/naive.py`. This module times those
on the CPU, on our inputs, as an outside reference point. Install the peer with

    pip install torch --index-url https://download.pytorch.org/whl/cpu
    pip install fla-core --no-deps
    pip install einops        # the naive modules' one import besides torch

`import fla.ops` needs `triton` (the package `__init__`s import the Triton kernels), which
a CPU machine does not need: the naive modules import only torch and einops, so they are
loaded here straight from their files (`importlib.util.spec_from_file_location`), and no
package `__init__` of fla runs.

The fla function behind each op. Each peer takes our op's positional inputs in our layout
(`[B, T, H, K]`, gates `[B, T, H]` or `[B, T, H, K]`) and returns `[B, T, H, V]`; the scale is
`K ** -0.5` throughout:

- `"gla"`: `naive_recurrent_gla(q, k, v, gk)`, a token loop (fla has no chunked naive GLA).
- `"simple_gla"`: `naive_chunk_simple_gla(q, k, v, g, scale=...)`, chunked, 64-token chunks
  (the tail padded).
- `"linear_attention"`: `naive_chunk_linear_attn(q, k, v, scale=...)`, chunked, 64-token
  chunks, unnormalized (fla's `normalize=False` default). It requires `T % 64 == 0`, so
  the inputs are zero-padded at the end of T and the output cut back (causal: the padding
  changes no earlier output).
- `"delta_rule"`: `delta_rule_chunkwise(q, k, v, beta)`, chunked with its default 32-token
  chunks, in the `[B, H, T, K]` layout it takes; T is zero-padded to a multiple of 32 (a
  token with `k = 0`, `beta = 0` leaves the state alone).
- `"gated_delta_rule"`: `naive_chunk_gated_delta_rule(q, k, v, g, beta, scale=...)`,
  chunked, 64-token chunks (the tail padded).

Peak memory is not measured: torch has no CPU counterpart of `torch.cuda.max_memory_allocated`,
and `torch.profiler`'s `profile_memory` gives per-op allocation totals, not a peak.
"""

from __future__ import annotations

import importlib.util
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

# Our op name -> (fla subpackage under fla/ops, naive function).
NAIVE_FORMS = {
    "gla": ("gla", "naive_recurrent_gla"),
    "simple_gla": ("simple_gla", "naive_chunk_simple_gla"),
    "linear_attention": ("linear_attn", "naive_chunk_linear_attn"),
    "delta_rule": ("delta_rule", "delta_rule_chunkwise"),
    "gated_delta_rule": ("gated_delta_rule", "naive_chunk_gated_delta_rule"),
}
LINEAR_ATTN_CHUNK = 64  # naive_chunk_linear_attn's fixed chunk size
DELTA_RULE_CHUNK = 32  # delta_rule_chunkwise's default chunk size, which T must divide

# (our op's positional inputs as float32 numpy arrays, repeats) -> (fwd_s, fwdbwd_s).
PeerFn = Callable[[Sequence[np.ndarray], int], tuple[float, float]]


def load_naive(subpackage: str) -> Any:
    """fla/ops/<subpackage>/naive.py as a module, without running fla's package __init__s."""
    spec = importlib.util.find_spec("fla")  # finds the top package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("fla-core is not installed")
    root = Path(next(iter(spec.submodule_search_locations)))
    path = root / "ops" / subpackage / "naive.py"
    if not path.is_file():
        raise ImportError(f"fla-core has no {path}")
    file_spec = importlib.util.spec_from_file_location(f"_fla_naive_{subpackage}", path)
    module = importlib.util.module_from_spec(file_spec)
    file_spec.loader.exec_module(module)
    return module


def _pad_time(x: Any, multiple: int, time_axis: int = 1) -> Any:
    """Zero-pads the time axis of a torch tensor to a multiple of `multiple`."""
    import torch

    pad = -x.shape[time_axis] % multiple
    if not pad:
        return x
    widths = [0, 0] * (x.ndim - 1 - time_axis) + [0, pad]
    return torch.nn.functional.pad(x, widths)


def _forward(op: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """Our op's positional inputs -> o, torch tensors in and out, our layout."""
    if op == "gla":
        return lambda q, k, v, gk: fn(q, k, v, gk)[0]
    if op == "simple_gla":
        return lambda q, k, v, g: fn(q, k, v, g, scale=q.shape[-1] ** -0.5)[0]
    if op == "gated_delta_rule":
        return lambda q, k, v, g, beta: fn(q, k, v, g, beta, scale=q.shape[-1] ** -0.5)[0]
    if op == "linear_attention":

        def linear_attention(q, k, v):
            padded = (_pad_time(x, LINEAR_ATTN_CHUNK) for x in (q, k, v))
            return fn(*padded, scale=q.shape[-1] ** -0.5)[:, : q.shape[1]]

        return linear_attention

    def delta_rule(q, k, v, beta):
        # [B, T, H, ...] -> [B, H, T, ...], T padded; the result back to [B, T, H, V].
        heads_first = (_pad_time(x.transpose(1, 2), DELTA_RULE_CHUNK, 2) for x in (q, k, v))
        beta = _pad_time(beta.transpose(1, 2), DELTA_RULE_CHUNK, 2)
        o, _ = fn(*heads_first, beta, chunk_size=DELTA_RULE_CHUNK)
        return o[:, :, : q.shape[1]].transpose(1, 2)

    return delta_rule


def _timer(forward: Callable[..., Any]) -> PeerFn:
    import torch

    def run(arrays, repeats):
        tensors = [torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)) for x in arrays]

        def fwd():
            with torch.no_grad():
                forward(*tensors)

        leaves = [t.clone().requires_grad_(True) for t in tensors]

        def fwdbwd():
            for t in leaves:
                t.grad = None
            forward(*leaves).square().sum().backward()

        return _median(fwd, repeats), _median(fwdbwd, repeats)

    return run


def _median(fn: Callable[[], None], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def fla_peers(ops: list[str]) -> dict[str, PeerFn]:
    """op name -> `(inputs, repeats) -> (fwd_s, fwdbwd_s)`.

    `inputs` are our op's positional inputs as numpy float32 arrays in our layout (`q, k, v`,
    then the op's gates in its argument order). Times are medians over `repeats` runs after
    one warm-up, forward under `torch.no_grad`, forward+backward of `sum(o ** 2)` w.r.t. every
    input. Ops that fla has no naive form for are left out; without torch or fla-core the
    result is `{}`.
    """
    try:
        import torch
    except ImportError as err:
        print(f"fla peer skipped: torch is not importable ({err})")
        return {}
    torch.set_num_threads(2)
    peers = {}
    for op in ops:
        if op not in NAIVE_FORMS:
            continue
        subpackage, name = NAIVE_FORMS[op]
        try:
            fn = getattr(load_naive(subpackage), name)
        except (ImportError, AttributeError) as err:
            print(f"fla peer skipped: {err}")
            return {}
        peers[op] = _timer(_forward(op, fn))
    return peers
