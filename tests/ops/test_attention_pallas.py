"""JAX's Pallas attention kernels behind `impl="pallas"`: interpreted on CPU against the
reference, and lowered for the GPU and TPU they are written for."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import pytest
from contract import assert_trees_close
from exporting import interpret_mode, target

from seqjax.ops import attention_pallas
from seqjax.ops.attention import softmax_attention

HEADS, KV_HEADS, DIM, LENGTH = 4, 2, 16, 77  # odd length: the wrappers pad to whole blocks


def inputs(dtype=jnp.float32, length=LENGTH):
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (2, length, HEADS, DIM)).astype(dtype)
    k = jax.random.normal(keys[1], (2, length, KV_HEADS, DIM)).astype(dtype)
    v = jax.random.normal(keys[2], (2, length, KV_HEADS, DIM)).astype(dtype)
    return q, k, v


SEGMENTS = jnp.asarray([[3] * 30 + [7] * (LENGTH - 30), [0] * LENGTH])


def kernel_fn(kernel, causal, window, segment_ids):
    return functools.partial(
        attention_pallas.attention,
        causal=causal,
        window=window,
        segment_ids=segment_ids,
        scale=DIM**-0.5,
        kernel=kernel,
        interpret=interpret_mode("gpu" if kernel == "triton" else "tpu"),
    )


@pytest.mark.parametrize(
    "kernel, causal, window",
    [("triton", True, None), ("triton", False, None), ("splash", True, 19)],
)
def test_kernel_matches_reference_in_values_and_gradients(kernel, causal, window):
    args = inputs()
    ours = kernel_fn(kernel, causal, window, SEGMENTS)

    def reference(q, k, v):
        out = softmax_attention(
            q, k, v, causal=causal, window=window, segment_ids=SEGMENTS, impl="reference"
        )
        return out[0]

    assert_trees_close(jax.jit(ours)(*args), reference(*args), 2e-5, kernel)

    def grads(f):
        loss = lambda *a: jnp.sum(jnp.sin(f(*a)))  # noqa: E731
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(*args)

    assert_trees_close(grads(ours), grads(reference), 5e-5, f"{kernel} gradients")


def test_bfloat16_inputs():
    args = inputs(jnp.bfloat16)
    out = jax.jit(kernel_fn("triton", True, None, None))(*args)
    expected, _ = softmax_attention(*(x.astype(jnp.float32) for x in args), impl="reference")
    assert out.dtype == jnp.bfloat16
    assert_trees_close(out, expected, 2e-2, "bf16")


def test_impl_pallas_falls_back_for_what_the_kernel_cannot_do():
    """On CPU `impl="pallas"` interprets the Triton kernel, which has no window: the call
    falls back to blockwise and still equals the reference."""
    args = inputs()
    for window in (None, 5):
        out, _ = softmax_attention(*args, window=window, impl="pallas")
        expected, _ = softmax_attention(*args, window=window, impl="reference")
        assert_trees_close(out, expected, 2e-5, f"window {window}")
    assert not attention_pallas.supports("triton", *args, True, 5, None, None, None)
    assert attention_pallas.supports("splash", *args, True, 5, None, None, None)


@pytest.mark.parametrize(
    "kernel, platform",
    [("triton", "cuda"), ("splash", "tpu")],
)
def test_kernel_lowers_for_its_platform(kernel, platform):
    """Forward and gradient export for the target (Mosaic / PTX compilation needs the device)."""
    shape = jax.ShapeDtypeStruct((1, 256, HEADS, 64), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, 256, KV_HEADS, 64), jnp.bfloat16)
    window = 64 if kernel == "splash" else None
    fn = functools.partial(
        attention_pallas.attention,
        causal=True,
        window=window,
        segment_ids=None,
        scale=0.125,
        kernel=kernel,
    )

    def grad(q, k, v):
        return jax.grad(lambda *a: jnp.sum(fn(*a).astype(jnp.float32)), argnums=(0, 1, 2))(q, k, v)

    checks = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    for f in (fn, grad):
        with target(platform):
            exported = jax.export.export(
                jax.jit(f),
                platforms=[platform],
                disabled_checks=checks if kernel == "triton" else (),
            )(shape, kv, kv)
        text = exported.mlir_module()
        custom_call = "__gpu$xla.gpu.triton" if kernel == "triton" else "tpu_custom_call"
        assert custom_call in text
