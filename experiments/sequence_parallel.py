"""Study 8: sequence parallelism. LASP-2, Ulysses and ring attention over P devices compute what
one device computes; LASP-2 moves a T-independent number of bytes, Ulysses and the ring O(T).

    python -m experiments.sequence_parallel [--config=configs/studies/sequence_parallel.py:quick]
        [--seeds=0,1,2]

The time axis of one long sequence is split over the `sequence` axis of a mesh of P devices
(`config.devices`; 8 emulated CPU devices at the CPU sizes), and each method runs on its shard
of `q, k, v: [B, T, H, K]`:

- `lasp2_*` (Sun et al., "LASP-2", 2025): each shard p summarizes itself as the affine map
  `S_out(p) = A_p S_in(p) + M_p` of the `[K, V]` state (`A_p = 1` for linear attention,
  `diag(exp(sum_t gk_t))` for GLA, the `[K, K]` product of its chunk transitions for the delta
  rule), one all-gather of the P pairs `(A_p, M_p)` and an exclusive fold give every shard its
  entering state, and the shard's own op from that state is its output. The bytes moved are P
  summaries (and one all-reduce that replicates the final state), independent of T
  (`seqjax.parallel.linear_attention`).
- `ulysses` (Jacobs et al., "DeepSpeed Ulysses", 2023): all-to-alls turn the sequence-sharded
  `q, k, v` into head-sharded ones, each device attends over the whole sequence for `H / P`
  heads, and one all-to-all turns the output back: O(B T H K / P) bytes per device.
- `ring` (Li et al., "Sequence Parallelism", 2021): queries stay, the key/value blocks go
  P - 1 steps around the ring (`ppermute`), merged with the online-softmax combine: O(T) bytes
  per device (`seqjax.parallel.attention`).

For each method and length T, on random inputs drawn from the seed (the decays and key norms
the layers make), one training step (outputs, then the gradient of a loss that weighs every
output and the final state with random weights, w.r.t. every input and the initial state) is
compiled with the inputs placed T-sharded over the mesh, and compared with the same step of the
single-device op on one device: the maximum relative error of the values and of the gradients.
The bytes one device receives in that step are counted from the compiled HLO's collectives by
`benchmarks.communication.received_bytes`, and the median time per step of both programs is
measured. The paper's speed claims (LASP-2 +36.6% over ring attention at 2048K tokens on 64
GPUs) need real interconnects; emulated devices share the host's cores, so the times here are
for completeness, not evidence.

The device count is fixed when JAX starts its CPU backend, and whoever calls `run` (the command
line, or `run_study` inside a test) may already have started it with one device. So `run`
always measures in a child Python process whose `XLA_FLAGS` ask for `config.devices` host
devices (`--xla_force_host_platform_device_count`), and reads its rows back from a file; the
calling process never needs more than its own devices. With `config.platform = "default"` the
child uses the accelerators instead (the `full` size, on a GPU or TPU host with P chips);
`received_bytes` counts an accelerator's asynchronous collectives by their `*-done` halves, and
a step in which it finds no collective at all fails rather than report zero bytes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from benchmarks.communication import COLLECTIVES, received_bytes
from experiments.study import (
    Row,
    Study,
    Summary,
    check_choices,
    fail,
    main,
    median_ms,
    relative_error,
)
from seqjax.ops.attention import ATTENTION_IMPLS, softmax_attention
from seqjax.ops.delta_rule import delta_rule
from seqjax.ops.gla import gla, linear_attention
from seqjax.parallel.attention import sequence_parallel_attention
from seqjax.parallel.linear_attention import (
    sequence_parallel_delta_rule,
    sequence_parallel_gla,
    sequence_parallel_linear_attention,
)
from seqjax.parallel.mesh import SEQUENCE

ROOT = Path(__file__).resolve().parents[1]
# method: (single-device op, its LASP-2 form, the gate input it takes after q, k, v)
RECURRENCES = {
    "lasp2_linear_attention": (linear_attention, sequence_parallel_linear_attention, None),
    "lasp2_gla": (gla, sequence_parallel_gla, "gk"),
    "lasp2_delta_rule": (delta_rule, sequence_parallel_delta_rule, "beta"),
}
ATTENTION = ("ulysses", "ring")
METHODS = (*RECURRENCES, *ATTENTION)
PLATFORMS = ("cpu", "default")
# Arrays without a time axis (the initial and final state): replicated over the mesh.
STATES = ("h0", "state")
# Float32 exactness: the forms differ only in summation order.
TOLERANCE = 1e-4
DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
# What `run`'s child process executes: `measure_to_file(config_json, seed, rows_path)`.
CHILD = "import sys, experiments.sequence_parallel as s; s.measure_to_file(*sys.argv[1:])"

Arrays = dict[str, jax.Array]


def make_inputs(method: str, key: jax.Array, batch: int, length: int, heads: int, dim: int):
    """The method's inputs (`q, k, v`, its gate, the initial state `h0`), gated as the layers
    gate them: GLA's `gk = log_sigmoid(x) / 16`, DeltaNet's L2-normalized keys and sigmoid
    `beta`."""
    keys = jax.random.split(key, 5)
    shape = (batch, length, heads, dim)
    k = jax.random.normal(keys[1], shape) * dim**-0.5
    inputs = {
        "q": jax.random.normal(keys[0], shape),
        "k": k,
        "v": jax.random.normal(keys[2], shape),
    }
    if method not in RECURRENCES:
        return inputs
    inputs["h0"] = jax.random.normal(keys[4], (batch, heads, dim, dim)) * 0.1
    gate = RECURRENCES[method][2]
    if gate == "gk":
        inputs["gk"] = jax.nn.log_sigmoid(jax.random.normal(keys[3], shape)) / 16
    elif gate == "beta":
        inputs["k"] = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
        inputs["beta"] = jax.nn.sigmoid(jax.random.normal(keys[3], shape[:3]))
    return inputs


def forward_functions(
    method: str, mesh: Mesh, config: ml_collections.ConfigDict
) -> tuple[Callable[[Arrays], Arrays], Callable[[Arrays], Arrays]]:
    """`(single_device, sequence_parallel)`, each `inputs -> outputs`: `{"o"}` for attention
    (causal; `config.attention_impl` on one device and in Ulysses' head groups), `{"o",
    "state"}` (the final state) for the recurrences."""
    chunk_size, impl = config.chunk_size, config.attention_impl
    if method in ATTENTION:

        def single(x):
            return {"o": softmax_attention(x["q"], x["k"], x["v"], causal=True, impl=impl)[0]}

        def parallel(x):
            o, _ = sequence_parallel_attention(
                x["q"], x["k"], x["v"], mesh=mesh, method=method, impl=impl
            )
            return {"o": o}

        return single, parallel
    op, parallel_op, gate = RECURRENCES[method]

    def recurrence(fn, **options):
        def apply(x):
            gates = () if gate is None else (x[gate],)
            o, state = fn(
                x["q"],
                x["k"],
                x["v"],
                *gates,
                initial_state=x["h0"],
                chunk_size=chunk_size,
                **options,
            )
            return {"o": o, "state": state}

        return apply

    return recurrence(op), recurrence(parallel_op, mesh=mesh)


def training_step(forward: Callable[[Arrays], Arrays]):
    """`(inputs, weights) -> (gradients, outputs)`: the gradient of `sum_y <w_y, y>` over the
    outputs `y` (random weights, so that every output and the final state get a cotangent)
    with respect to every input, and the outputs themselves."""

    def loss(inputs, weights):
        outputs = forward(inputs)
        return sum(jnp.vdot(weights[name], y) for name, y in outputs.items()), outputs

    return jax.grad(loss, has_aux=True)


def placement(tree: Arrays, mesh: Mesh) -> dict[str, NamedSharding]:
    """Token arrays `[B, T, ...]` split along T over the mesh's `sequence` axis; the states
    replicated."""
    return {
        name: NamedSharding(mesh, P() if name in STATES else P(None, SEQUENCE)) for name in tree
    }


def compile_step(forward: Callable[[Arrays], Arrays], inputs: Arrays, weights: Arrays, mesh: Mesh):
    """The compiled training step over `mesh`, its inputs and weights placed on it, and the
    gradients and outputs kept where the inputs and outputs live: every collective in the
    program is then the method's own."""
    arguments = (placement(inputs, mesh), placement(weights, mesh))
    step = jax.jit(training_step(forward), in_shardings=arguments, out_shardings=arguments)
    placed = jax.device_put((inputs, weights), arguments)
    return step.lower(*placed).compile(), placed


def measure_cell(
    method: str, length: int, seed: int, config: ml_collections.ConfigDict, devices: list
) -> Row:
    """One row: errors against one device, bytes per device and time per step."""
    mesh = Mesh(np.asarray(devices[: config.devices]), (SEQUENCE,))
    one_device = Mesh(np.asarray(devices[:1]), (SEQUENCE,))
    key = jax.random.fold_in(jax.random.key(seed), length)
    inputs = make_inputs(method, key, config.batch, length, config.heads, config.head_dim)
    single, parallel = forward_functions(method, mesh, config)
    shapes = jax.eval_shape(single, inputs)
    weight_keys = jax.random.split(jax.random.fold_in(key, 1), len(shapes))
    weights = {
        name: jax.random.normal(k, y.shape)
        for k, (name, y) in zip(weight_keys, shapes.items(), strict=True)
    }
    reference, reference_args = compile_step(single, inputs, weights, one_device)
    sharded, sharded_args = compile_step(parallel, inputs, weights, mesh)
    # Compared on the host: the two programs' results live on different devices.
    expected_grads, expected = jax.device_get(reference(*reference_args))
    grads, outputs = jax.device_get(sharded(*sharded_args))
    collectives = received_bytes(sharded.as_text(), config.devices)
    if not collectives:
        raise RuntimeError(
            f"{method}: no collective found in the compiled step; `received_bytes` reads "
            f"{', '.join(COLLECTIVES)} and their asynchronous `-done` halves"
        )
    return dict(
        method=method,
        length=length,
        value_error=relative_error(outputs, expected),
        grad_error=relative_error(grads, expected_grads),
        received_kib=sum(moved for _, moved in collectives.values()) / 1024,
        step_ms=median_ms([sharded], sharded_args, config.repeats)[0],
        single_device_ms=median_ms([reference], reference_args, config.repeats)[0],
        collectives=", ".join(f"{op} x{count}" for op, (count, _) in sorted(collectives.items())),
    )


def measure(config: ml_collections.ConfigDict, seed: int) -> list[Row]:
    """Every (method, length) cell, in this process: needs `config.devices` devices of
    `config.platform` (see the module docstring)."""
    devices = jax.devices("cpu") if config.platform == "cpu" else jax.devices()
    if len(devices) < config.devices:
        fail(
            "devices",
            f"{config.devices} devices asked for, {len(devices)} available on platform "
            f"{devices[0].platform!r}",
        )
    rows = []
    for method in config.methods:
        for length in config.lengths:
            rows.append(measure_cell(method, length, seed, config, devices))
            print(f"sequence_parallel: {method} T={length}: {rows[-1]}", flush=True)
    return rows


def measure_to_file(config_json: str, seed: str, rows_path: str) -> None:
    """The child process's entry point: `measure`, its rows written as JSON to `rows_path`."""
    config = ml_collections.ConfigDict(json.loads(config_json))
    Path(rows_path).write_text(json.dumps(measure(config, int(seed))))


def run(config: ml_collections.ConfigDict, seed: int) -> tuple[list[Row], None]:
    """`measure` in a child process started with `config.devices` emulated host devices."""
    flags = [
        flag
        for flag in os.environ.get("XLA_FLAGS", "").split()
        if not flag.startswith(DEVICE_COUNT_FLAG)
    ]
    env = {
        **os.environ,
        "XLA_FLAGS": " ".join([*flags, f"{DEVICE_COUNT_FLAG}={config.devices}"]),
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    with tempfile.TemporaryDirectory() as scratch:
        rows_path = Path(scratch) / "rows.json"
        command = [sys.executable, "-c", CHILD, config.to_json(), str(seed), str(rows_path)]
        subprocess.run(command, cwd=ROOT, env=env, check=True)
        return json.loads(rows_path.read_text()), None


def validate(config: ml_collections.ConfigDict) -> None:
    check_choices("methods", config.methods, METHODS)
    check_choices("platform", (config.platform,), PLATFORMS)
    check_choices("attention_impl", (config.attention_impl,), ATTENTION_IMPLS)
    for field in ("batch", "heads", "head_dim", "chunk_size", "repeats"):
        if config[field] < 1:
            fail(field, f"expected a positive integer, got {config[field]}")
    if config.devices < 2:
        fail("devices", f"sequence parallelism needs at least 2 devices, got {config.devices}")
    if len(set(config.lengths)) < 2:
        fail("lengths", f"the scaling in T needs at least two lengths, got {config.lengths}")
    for length in config.lengths:
        if length < 1 or length % config.devices:
            fail(
                "lengths",
                f"T = {length} is not a positive multiple of the {config.devices} devices",
            )
    if "ulysses" in config.methods and config.heads % config.devices:
        fail(
            "heads",
            f"Ulysses splits heads over the devices: {config.heads} heads are not divisible by "
            f"{config.devices} devices",
        )


def _by_method(summary: Summary, method: str) -> list[Row]:
    return sorted((r for r in summary.rows if r["method"] == method), key=lambda r: r["length"])


def plot(summary: Summary, figure) -> None:
    bytes_axes, time_axes = figure.subplots(1, 2)
    for index, method in enumerate(m for m in METHODS if _by_method(summary, m)):
        rows = _by_method(summary, method)
        lengths = [r["length"] for r in rows]
        color = f"C{index}"
        bytes_axes.plot(lengths, [r["received_kib"][0] for r in rows], "o-", color=color)
        time_axes.errorbar(
            lengths,
            [r["step_ms"][0] for r in rows],
            yerr=[r["step_ms"][1] for r in rows],
            marker="o",
            color=color,
            capsize=2,
            label=method,
        )
        time_axes.plot(lengths, [r["single_device_ms"][0] for r in rows], ":", color=color)
    lengths = sorted({r["length"] for r in summary.rows})
    bytes_axes.set(title="communication", ylabel="KiB received per device per step")
    time_axes.set(title="time (dotted: one device)", ylabel="ms per step")
    for axes in (bytes_axes, time_axes):
        axes.set(xscale="log", yscale="log", xlabel="T (tokens)")
        axes.set_xticks(lengths, [str(t) for t in lengths], minor=False)
        axes.set_xticks([], minor=True)
    time_axes.legend(fontsize="small")


def bytes_slope(rows: list[Row]) -> float:
    """The exponent `a` of the least-squares fit `bytes ~ T^a` (0: independent of T; 1:
    linear)."""
    lengths = np.log([r["length"] for r in rows])
    return float(np.polyfit(lengths, np.log([r["received_kib"][0] for r in rows]), 1)[0])


def verdict(summary: Summary) -> str:
    """Exactness within float32 tolerance, and the byte scaling each paper claims."""
    worst = max(max(r["value_error"][0], r["grad_error"][0]) for r in summary.rows)
    exact = "are exact" if worst < TOLERANCE else "are NOT exact"
    parts = [
        f"the sequence-parallel forms {exact} against one device (worst relative error "
        f"{worst:.1e} over values and gradients, tolerance {TOLERANCE:.0e})"
    ]
    methods = [m for m in METHODS if _by_method(summary, m)]
    slopes = {m: bytes_slope(_by_method(summary, m)) for m in methods}
    lasp = [m for m in methods if m in RECURRENCES]
    if lasp:
        constant = all(abs(slopes[m]) < 0.05 for m in lasp)
        fits = ", ".join(f"{m} T^{slopes[m]:.2f}" for m in lasp)
        says = "reproduces" if constant else "does NOT reproduce"
        parts.append(f"LASP-2's bytes independent of T {says} ({fits})")
    rings = [m for m in methods if m in ATTENTION]
    if rings:
        linear = all(abs(slopes[m] - 1) < 0.1 for m in rings)
        fits = ", ".join(f"{m} T^{slopes[m]:.2f}" for m in rings)
        says = "reproduces" if linear else "does NOT reproduce"
        parts.append(f"Ulysses' and the ring's bytes linear in T {says} ({fits})")
    if lasp and rings:
        longest = max(r["length"] for r in summary.rows)
        kib = {r["method"]: r["received_kib"][0] for r in summary.rows if r["length"] == longest}
        if all(m in kib for m in (*lasp, *rings)):
            ratio = min(kib[m] for m in rings) / max(kib[m] for m in lasp)
            parts.append(
                f"at T={longest} the fewer of Ulysses' and the ring's bytes are {ratio:.2g}x the "
                f"most of the LASP-2 methods'"
            )
    return "; ".join(parts) + ". Times are on emulated devices sharing the host's cores."


STUDY = Study(
    number=8,
    name="sequence_parallel",
    title="Sequence parallelism",
    claim=(
        "Sun et al. (LASP-2, 2025): linear attention split over P devices needs one all-gather "
        "of P d_k x d_v states per pass, so its communication is independent of the sequence "
        "length T, while DeepSpeed-Ulysses (Jacobs et al., 2023: four all-to-alls of a shard's "
        "q, k, v, o) and ring attention (Li et al., 2021: P - 1 rounds of key/value blocks) "
        "move O(T) bytes per device; all of them compute exactly what one device computes."
    ),
    keys=("method", "length"),
    metrics=("value_error", "grad_error", "received_kib", "step_ms", "single_device_ms"),
    run=run,
    validate=validate,
    plot=plot,
    verdict=verdict,
)

if __name__ == "__main__":
    main(STUDY)
