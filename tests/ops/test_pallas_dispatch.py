"""The ops reach the Pallas kernels with `impl="pallas"` and fall back, with the reason, where
the kernels do not apply. On CPU the kernels run interpreted (the GPU kernels), so these
checks are about the wiring (argument order, scale, decay layout, the op's own pre- and
post-processing around the kernel); the kernels themselves are checked in
`tests/pallas_kernels/`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from contract import assert_trees_close

import pallas_kernels.delta_rule
import pallas_kernels.gla
import pallas_kernels.linear_recurrence
import pallas_kernels.selective_scan
from seqjax import kernels
from seqjax.ops.delta_rule import gated_delta_rule
from seqjax.ops.gla import gla, linear_attention
from seqjax.ops.hgrn import hgrn
from seqjax.ops.selective_scan import selective_scan

B, T, H, K, V = 1, 21, 2, 16, 16


def normal(i, shape, scale=1.0):
    return jax.random.normal(jax.random.key(i), shape) * scale


def head_inputs():
    q, k, v = normal(0, (B, T, H, K)), normal(1, (B, T, H, K), K**-0.5), normal(2, (B, T, H, V))
    return q, k, v, normal(3, (B, H, K, V))


def gla_case():
    q, k, v, h0 = head_inputs()
    gk = jax.nn.log_sigmoid(normal(4, (B, T, H, K))) / 4

    def run(impl, q, k, v, gk, h0):
        return gla(q, k, v, gk, scale=0.3, initial_state=h0, impl=impl)

    return run, (q, k, v, gk, h0)


def normalized_linear_attention_case():
    q, k, v, _ = head_inputs()

    def run(impl, q, k, v):
        o, state = linear_attention(
            jax.nn.elu(q) + 1, jax.nn.elu(k) + 1, v, normalize=True, impl=impl
        )
        return o, tuple(state)

    return run, (q, k, v)


def gated_delta_rule_case():
    q, k, v, h0 = head_inputs()
    g = jax.nn.log_sigmoid(3.0 + normal(5, (B, T, H)))
    beta = jax.nn.sigmoid(normal(6, (B, T, H))) * 2

    def run(impl, q, k, v, g, beta, h0):
        k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
        return gated_delta_rule(q, k, v, g, beta, initial_state=h0, impl=impl)

    return run, (q, k, v, g, beta, h0)


def hgrn_case():
    # Two trailing feature axes: the scan layer flattens them for the kernel.
    x, g = normal(7, (B, T, 3, 8)), jax.nn.log_sigmoid(normal(8, (B, T, 3, 8)))

    def run(impl, x, g, h0):
        return hgrn(x.reshape(B, T, 24), g.reshape(B, T, 24), h0, impl=impl)

    return run, (x, g, normal(9, (B, 24)))


def selective_scan_case():
    d, n = 32, 8
    x, dt, z = normal(10, (B, T, d)), normal(11, (B, T, d)), normal(12, (B, T, d))
    A = -jnp.exp(normal(13, (d, n), 0.5))
    Bm, Cm = normal(14, (B, T, 2, n)), normal(15, (B, T, 2, n))
    D, dt_bias, h0 = normal(16, (d,)), normal(17, (d,)), normal(18, (B, d, n))

    def run(impl, x, dt, A, Bm, Cm, D, z, dt_bias, h0):
        return selective_scan(x, dt, A, Bm, Cm, D, z, dt_bias, h0, impl=impl)

    return run, (x, dt, A, Bm, Cm, D, z, dt_bias, h0)


CASES = {
    "gla": gla_case,
    "normalized_linear_attention": normalized_linear_attention_case,
    "gated_delta_rule": gated_delta_rule_case,
    "hgrn": hgrn_case,
    "selective_scan": selective_scan_case,
}
DEFAULT = ("gla", "hgrn")


@pytest.mark.parametrize(
    "name", [n if n in DEFAULT else pytest.param(n, marks=pytest.mark.slow) for n in CASES]
)
def test_pallas_impl_equals_the_reference(name):
    """Values, and gradients w.r.t. every input through the op's own pre- and post-processing
    (feature flattening, the scale, the decay layout, the normalizer, skip and gate)."""
    run, inputs = CASES[name]()
    expected = run("reference", *inputs)
    assert_trees_close(run("pallas", *inputs), expected, 2e-5, f"{name} values")
    weights = jax.tree.map(lambda x: normal(99, x.shape), expected)

    def loss(impl, *inputs):
        out = run(impl, *inputs)
        pairs = zip(jax.tree.leaves(weights), jax.tree.leaves(out), strict=True)
        return sum(jnp.vdot(w, x) for w, x in pairs)

    argnums = tuple(range(1, len(inputs) + 1))
    actual = jax.grad(loss, argnums)("pallas", *inputs)
    assert_trees_close(actual, jax.grad(loss, argnums)("reference", *inputs), 5e-5, f"{name} grad")


def test_packed_segments_fall_back_with_the_reason():
    q, k, v, _ = head_inputs()
    segment_ids = jnp.asarray([[0] * 10 + [1] * (T - 10)])
    with pytest.warns(UserWarning, match=r"pallas_kernels.gla .*packed segments"):
        o, state = linear_attention(q, k, v, segment_ids=segment_ids, impl="pallas")
    expected = linear_attention(q, k, v, segment_ids=segment_ids, impl="reference")
    assert_trees_close((o, state), expected, 2e-5, "fallback")


def test_auto_on_gpu_skips_the_kernels_measured_slower_there(monkeypatch):
    args = (*head_inputs()[:3], None, None)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert kernels.choose("gla", "auto", args) is None
    assert kernels.choose("gla", "pallas", args) is pallas_kernels.gla
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    assert kernels.choose("gla", "auto", args) is pallas_kernels.gla


def test_every_family_answers_an_unknown_backend_with_a_reason():
    """`unsupported` is how `seqjax.kernels` decides to fall back: it returns the reason for a
    backend without kernels rather than raising, in every family alike."""
    reasons = [
        pallas_kernels.linear_recurrence.unsupported(None, None, None, "cpu"),
        pallas_kernels.gla.unsupported(None, None, None, None, None, "cpu"),
        pallas_kernels.delta_rule.unsupported(None, None, None, None, None, None, "cpu"),
        pallas_kernels.selective_scan.unsupported(None, None, None, None, None, None, "cpu"),
    ]
    assert all(reason.startswith("backend:") for reason in reasons), reasons


@pytest.mark.slow
def test_selective_scan_without_an_initial_state_reaches_the_kernel():
    run, (x, dt, A, Bm, Cm, D, z, dt_bias, _) = selective_scan_case()
    expected = run("reference", x, dt, A, Bm, Cm, D, z, dt_bias, None)
    assert_trees_close(run("pallas", x, dt, A, Bm, Cm, D, z, dt_bias, None), expected, 2e-5, "h0")
