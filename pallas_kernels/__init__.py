"""Pallas kernels for TPU (Mosaic) and GPU (Triton lowering) behind the ops' `impl="pallas"`.

One subpackage per family, each with `tpu.py` and `gpu.py` and a `jax.custom_vjp` entry point
in its `__init__`:

- `linear_recurrence`: the diagonal recurrence `h_t = a_t * h_{t-1} + b_t` (hgrn, LRU, RG-LRU);
- `gla`: chunked gated linear attention (`linear_attention`, `simple_gla`, `gla`);
- `delta_rule`: the chunked delta rule with its UT transform (`delta_rule`, `gated_delta_rule`);
- `selective_scan`: Mamba-1's selective scan.

The kernels import nothing from `seqjax`. Users reach them through the ops, which import them
lazily (`seqjax.ops.pallas`), check `unsupported(...)` and fall back to the pure-JAX path with
a message for what a kernel does not cover. Block sizes come from `blocks.py`, one table per
backend. Every kernel accumulates in float32, takes an initial state, returns the final
state, and saves only chunk-boundary states for its backward pass.
"""
