"""A PyTorch CPU peer for the linear-attention benchmark: flash-linear-attention's naive ops.

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

The fla function behind each op (all take our layout, `[B, T, H, K]`, and return
`[B, T, H, V]`; the scale is `K ** -0.5`):

- `"gla"`: `naive_recurrent_gla(q, k, v, gk)`, a token loop (fla has no chunked naive GLA);
  `gk: [B, T, H, K]` is the per-channel log decay; its scale is fixed at `K ** -0.5`.
- `"simple_gla"`: `naive_chunk_simple_gla(q, k, v, g, scale=...)`, chunked, 64-token chunks
  (the tail padded); `g: [B, T, H]` is the per-head log decay.
- `"linear_attention"`: `naive_chunk_linear_attn(q, k, v, scale=...)`, chunked, 64-token
  chunks, unnormalized (fla's `normalize=False` default). It requires `T % 64 == 0`, so
  the inputs are zero-padded at the end of T and the output cut back (causal: the padding
  changes no earlier output).

Peak memory is not measured (always `None`): torch has no CPU counterpart of
`torch.cuda.max_memory_allocated`, and `torch.profiler`'s `profile_memory` gives per-op
allocation totals, not a peak.
"""

from __future__ import annotations

import importlib.util
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

# Our op name -> (fla subpackage under fla/ops, naive function).
NAIVE_FORMS = {
    "gla": ("gla", "naive_recurrent_gla"),
    "simple_gla": ("simple_gla", "naive_chunk_simple_gla"),
    "linear_attention": ("linear_attn", "naive_chunk_linear_attn"),
}
GATED = {"gla", "simple_gla"}
LINEAR_ATTN_CHUNK = 64  # naive_chunk_linear_attn's fixed chunk size

PeerFn = Callable[
    [np.ndarray, np.ndarray, np.ndarray, np.ndarray | None, int],
    tuple[float, float, int | None],
]


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


def _forward(op: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """(q, k, v, g) -> o for one op, torch tensors in and out, our layout."""
    import torch

    if op == "gla":
        return lambda q, k, v, g: fn(q, k, v, g)[0]
    if op == "simple_gla":
        return lambda q, k, v, g: fn(q, k, v, g, scale=q.shape[-1] ** -0.5)[0]

    def linear_attention(q, k, v, g):
        length = q.shape[1]
        pad = -length % LINEAR_ATTN_CHUNK
        if pad:
            q, k, v = (torch.nn.functional.pad(x, (0, 0, 0, 0, 0, pad)) for x in (q, k, v))
        return fn(q, k, v, scale=q.shape[-1] ** -0.5)[:, :length]

    return linear_attention


def _timer(op: str, forward: Callable[..., Any]) -> PeerFn:
    import torch

    def run(q, k, v, g, repeats):
        if (g is None) == (op in GATED):
            raise ValueError(f"{op}: g must be {'given' if op in GATED else 'None'}")
        arrays = [q, k, v] if g is None else [q, k, v, g]
        tensors = [torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)) for x in arrays]
        if g is None:
            tensors.append(None)

        def fwd():
            with torch.no_grad():
                forward(*tensors)

        leaves = [t.clone().requires_grad_(True) if t is not None else None for t in tensors]

        def fwdbwd():
            for t in leaves:
                if t is not None:
                    t.grad = None
            out = forward(*leaves)
            out.square().sum().backward()

        return _median(fwd, repeats), _median(fwdbwd, repeats), None

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
    """op name -> `(q, k, v, g_or_None, repeats) -> (fwd_s, fwdbwd_s, peak_bytes_or_None)`.

    Inputs are numpy float32 in our layout: `q, k: [B, T, H, K]`, `v: [B, T, H, V]`, `g` the
    log decay, `[B, T, H]` (simple_gla) or `[B, T, H, K]` (gla), None for linear_attention.
    Times are medians over `repeats` runs after one warm-up, forward under `torch.no_grad`,
    forward+backward of `sum(o ** 2)` w.r.t. q, k, v (and g). Ops that fla has no naive form
    for are left out; without torch or fla-core the result is `{}`.
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
        peers[op] = _timer(op, _forward(op, fn))
    return peers
