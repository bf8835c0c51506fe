"""Study 7: forms of the same layer. The recurrent, parallel and chunked forms of GLA, DeltaNet and
decayed linear attention compute the same function; their speed by length differs.

    python -m experiments.forms [--config=configs/studies/forms.py:quick] [--seeds=0,1,2]

For each op (`gla`: a decay per key channel; `delta_rule`; `decayed_linear_attention`:
`simple_gla`, a decay per head as in RetNet / Mamba-2) and length T, on random inputs drawn from
the seed, each form's output, final state and gradients (of a loss weighing both, w.r.t. every
input and the initial state) are compared with the recurrent form's (maximum relative error),
and its median forward and forward+backward times are measured (interleaved, compiled, on this
machine). The forms are the ops' impls: `"reference"` (recurrent: a token loop over the
`[K, V]` state), `"parallel"` (the quadratic masked form, one chunk as long as the sequence;
only up to `max_parallel_length`) and `"chunked"` (the chunkwise-parallel form).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections

from experiments.study import (
    Study,
    Summary,
    check_choices,
    fail,
    main,
    median_ms,
    plot_series,
    relative_error,
)
from seqjax.ops.delta_rule import delta_rule
from seqjax.ops.gla import gla, simple_gla

OPS = ("gla", "delta_rule", "decayed_linear_attention")
FORMS = {"recurrent": "reference", "parallel": "parallel", "chunked": "chunked"}


def make_inputs(op: str, key: jax.Array, batch: int, length: int, heads: int, dim: int):
    """The op's positional inputs and an initial state, decays as the layers make them."""
    keys = jax.random.split(key, 5)
    shape = (batch, length, heads, dim)
    q, v = jax.random.normal(keys[0], shape), jax.random.normal(keys[2], shape)
    k = jax.random.normal(keys[1], shape) * dim**-0.5
    h0 = jax.random.normal(keys[4], (batch, heads, dim, dim)) * 0.1
    if op == "gla":
        return (q, k, v, jax.nn.log_sigmoid(jax.random.normal(keys[3], shape)) / 16), h0
    if op == "delta_rule":
        k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
        return (q, k, v, jax.nn.sigmoid(jax.random.normal(keys[3], shape[:3]))), h0
    return (q, k, v, jax.nn.log_sigmoid(4.0 + jax.random.normal(keys[3], shape[:3]))), h0


def op_function(op: str, impl: str, chunk_size: int):
    fn = {"gla": gla, "delta_rule": delta_rule, "decayed_linear_attention": simple_gla}[op]
    return functools.partial(fn, impl=impl, chunk_size=chunk_size)


def loss(fn, weights, inputs, h0):
    out, final = fn(*inputs, initial_state=h0)
    return jnp.vdot(weights[0], out) + jnp.vdot(weights[1], final)


def run(config: ml_collections.ConfigDict, seed: int) -> tuple[list[dict], None]:
    rows = []
    for op in config.ops:
        for length in config.lengths:
            key = jax.random.fold_in(jax.random.key(seed), length)
            inputs, h0 = make_inputs(op, key, config.batch, length, config.heads, config.head_dim)
            forms = [
                f for f in config.forms if f != "parallel" or length <= config.max_parallel_length
            ]
            fns = {f: op_function(op, FORMS[f], config.chunk_size) for f in forms}
            out, final = jax.eval_shape(fns["recurrent"], *inputs, initial_state=h0)
            weight_key = jax.random.fold_in(key, 1)
            weights = (
                jax.random.normal(weight_key, out.shape),
                jax.random.normal(weight_key, final.shape),
            )
            forward = [jax.jit(lambda i, h, fn=fns[f]: fn(*i, initial_state=h)) for f in forms]
            backward = [
                jax.jit(jax.grad(functools.partial(loss, fns[f], weights), argnums=(0, 1)))
                for f in forms
            ]
            values = {f: fwd(inputs, h0) for f, fwd in zip(forms, forward, strict=True)}
            grads = {f: bwd(inputs, h0) for f, bwd in zip(forms, backward, strict=True)}
            fwd_ms = median_ms(forward, (inputs, h0), config.repeats)
            bwd_ms = median_ms(backward, (inputs, h0), config.repeats)
            for i, form in enumerate(forms):
                rows.append(
                    dict(
                        op=op,
                        form=form,
                        length=length,
                        fwd_ms=fwd_ms[i],
                        fwdbwd_ms=bwd_ms[i],
                        value_error=relative_error(values[form], values["recurrent"]),
                        grad_error=relative_error(grads[form], grads["recurrent"]),
                    )
                )
    return rows, None


def validate(config: ml_collections.ConfigDict) -> None:
    check_choices("ops", config.ops, OPS)
    check_choices("forms", config.forms, tuple(FORMS))
    if "recurrent" not in config.forms:
        fail("forms", "must include 'recurrent', the form the others are checked against")
    for field in ("batch", "heads", "head_dim", "chunk_size", "repeats"):
        if config[field] < 1:
            fail(field, f"expected a positive integer, got {config[field]}")
    if not config.lengths or min(config.lengths) < 1:
        fail("lengths", f"expected positive lengths, got {config.lengths}")


def plot(summary: Summary, figure) -> None:
    ops = sorted({row["op"] for row in summary.rows})
    axes = figure.subplots(1, len(ops), sharey=True, squeeze=False)[0]
    for ax, op in zip(axes, ops, strict=True):
        for form in FORMS:
            rows = [r for r in summary.rows if r["op"] == op and r["form"] == form]
            plot_series(ax, rows, "length", "fwdbwd_ms", form)
        ax.set(xscale="log", yscale="log", title=op, xlabel="T (tokens)")
    axes[0].set_ylabel("forward + backward (ms)")
    axes[-1].legend()


def verdict(summary: Summary) -> str:
    """Agreement within float32 tolerance, and the speed ordering at the longest length."""
    worst = max(max(r["value_error"][0], r["grad_error"][0]) for r in summary.rows)
    agree = "agree" if worst < 1e-3 else "DO NOT agree"
    parts = [f"the forms {agree} (worst relative error {worst:.1e} over values and gradients)"]
    for op in sorted({r["op"] for r in summary.rows}):
        rows = [r for r in summary.rows if r["op"] == op]
        longest = max(r["length"] for r in rows)
        time_of = {r["form"]: r["fwdbwd_ms"][0] for r in rows if r["length"] == longest}
        if "chunked" in time_of and "recurrent" in time_of:
            ratio = time_of["recurrent"] / time_of["chunked"]
            parts.append(f"{op}: chunked is {ratio:.1f}x the recurrent form's speed at T={longest}")
        parallel = [r for r in rows if r["form"] == "parallel"]
        if parallel:
            at = max(r["length"] for r in parallel)
            pair = {r["form"]: r["fwdbwd_ms"][0] for r in rows if r["length"] == at}
            faster = "faster" if pair["chunked"] < pair["parallel"] else "slower"
            parts.append(f"{op}: chunked is {faster} than parallel at T={at}")
    return "; ".join(parts) + "."


STUDY = Study(
    number=7,
    name="forms",
    title="Forms of the same layer",
    claim=(
        "Yang et al. (GLA, 2024) and the DeltaNet paper (2024): the chunkwise-parallel form "
        "computes exactly what the recurrent and the parallel form compute, and is the fastest "
        "of the three for training at all but short lengths (the recurrent form is sequential "
        "in T, the parallel form quadratic)."
    ),
    keys=("op", "form", "length"),
    metrics=("fwd_ms", "fwdbwd_ms", "value_error", "grad_error"),
    run=run,
    validate=validate,
    plot=plot,
    verdict=verdict,
)

if __name__ == "__main__":
    main(STUDY)
