"""The op-contract harness: every op of `seqjax.ops` is tested by subclassing `OpContract`.

A test module describes its op with an `OpSpec` (how to make inputs, call the op, step it) and
declares `class TestMyOp(OpContract): spec = MY_SPEC`. The harness then checks the contract of
DESIGN.md for every fast impl against `impl="reference"`:

- values and final state agree, at lengths 1, odd, exactly one chunk, one past a chunk and
  several hundred, with and without packed segments, in float32 and bfloat16;
- gradients agree with respect to every input and the initial state, for a loss that weighs
  the output and the final state with fixed random cotangents;
- packed segments equal the same segments run separately;
- stepping token by token with the op's `*_step` equals the parallel form;
- the reference's gradients equal finite differences (float64);
- random shapes drawn by hypothesis agree with the reference (slow job only: every example
  compiles anew).

Compilation dominates on CPU, so each check runs one representative case per impl by default
(`length = chunk + 1`, packed, float32, plus one bfloat16 case); the rest of the matrix is
marked `slow` (`pytest -m slow`).
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

# Each hypothesis example compiles the op for a new shape (1-2 s on CPU): few by default,
# more with HYPOTHESIS_MAX_EXAMPLES=50 in the slow job. Loaded before the decorators below.
settings.register_profile(
    "seqjax",
    max_examples=int(os.environ.get("HYPOTHESIS_MAX_EXAMPLES", "4")),
    deadline=None,
    derandomize=True,
)
settings.load_profile("seqjax")

Inputs = dict[str, jax.Array]
TOLERANCE = {jnp.dtype("float64"): 1e-9, jnp.dtype("float32"): 2e-5, jnp.dtype("bfloat16"): 2e-2}
GRAD_TOLERANCE = {
    jnp.dtype("float64"): 1e-9,
    jnp.dtype("float32"): 5e-5,
    jnp.dtype("bfloat16"): 3e-2,
}


@dataclasses.dataclass(frozen=True)
class OpSpec:
    """How the harness drives one op.

    Attributes:
      make_inputs: `(key, batch, length, dtype) -> inputs`, a dict of arrays. Inputs named in
        `time_inputs` have layout `[B, T, ...]`, those in `row_inputs` `[B, ...]`; the others
        (parameters such as `A`) have neither. Only floating inputs are differentiated.
      apply: `(inputs, initial_state, segment_ids, impl) -> (output, final_state)`.
      make_state: `(key, batch) -> initial_state`, a random state pytree (None: the op's
        default start). Integer leaves (a KV cache's positions) are not differentiated.
      step: `(inputs_t, state) -> (output_t, state)`, where the time inputs of `inputs_t` have
        the time axis removed; `state` may be None (the op's default start).
      time_inputs: names of the inputs that carry a time axis.
      impls: the fast impls checked against `"reference"`.
      chunk_size: the op's chunk length; the lengths tested are built around it.
      tolerance_scale: multiplies the default tolerances, for ops whose error grows (e.g. FFTs).
      row_inputs: names of the inputs with a batch axis but no time axis (JRT's `prefix_len`).
      state_view: `state -> tree`, what two final states must agree in when they may differ in
        layout (a KV cache's capacity): used where a state from one run (a packed row, a
        token-by-token decode) is compared with one from another (separate segments, the
        parallel form).
    """

    make_inputs: Callable[[jax.Array, int, int, Any], Inputs]
    apply: Callable[[Inputs, Any, jax.Array | None, str], tuple[Any, Any]]
    make_state: Callable[[jax.Array, int], Any]
    step: Callable[[Inputs, Any], tuple[Any, Any]] | None
    time_inputs: frozenset[str]
    impls: tuple[str, ...]
    chunk_size: int = 16
    tolerance_scale: float = 1.0
    row_inputs: frozenset[str] = frozenset()
    state_view: Callable[[Any], Any] = lambda state: state


class Case(NamedTuple):
    length: int
    dtype: Any
    packed: bool


def case_matrix(chunk_size: int) -> list[Any]:
    """All (length, dtype, packed) cases; the representative ones are not marked slow."""
    lengths = (1, 7, chunk_size, chunk_size + 1, 300)
    representative = {
        Case(chunk_size + 1, jnp.float32, True),
        Case(chunk_size + 1, jnp.bfloat16, False),
    }
    params = []
    for length in lengths:
        for dtype in (jnp.float32, jnp.bfloat16):
            for packed in (False, True):
                case = Case(length, dtype, packed)
                marks = () if case in representative else (pytest.mark.slow,)
                name = f"T{length}-{jnp.dtype(dtype).name}-{'packed' if packed else 'single'}"
                params.append(pytest.param(case, marks=marks, id=name))
    return params


# ----------------------------------------------------------------------------- comparisons


def relative_error(actual: jax.Array, expected: jax.Array) -> tuple[float, float]:
    """Norm-wise relative error and the worst element's error relative to max |expected|."""
    actual = np.asarray(jnp.asarray(actual).astype(jnp.promote_types(actual.dtype, jnp.float32)))
    expected = np.asarray(
        jnp.asarray(expected).astype(jnp.promote_types(expected.dtype, jnp.float32))
    )
    # An expected leaf of exact zeros (the gradient of a softmax over one key) is compared in
    # absolute terms: the fast form's rounding cannot be relative to nothing.
    scale = float(np.max(np.abs(expected), initial=0.0)) or 1.0
    norm = float(np.linalg.norm(expected)) or 1.0
    return float(np.linalg.norm(actual - expected)) / norm, float(
        np.max(np.abs(actual - expected), initial=0.0)
    ) / scale


def assert_trees_close(actual: Any, expected: Any, tolerance: float, what: str) -> None:
    """Every leaf: norm-wise relative error <= tol and worst element <= 10 tol (of the max)."""
    actual_leaves, actual_tree = jax.tree.flatten(actual)
    expected_leaves, expected_tree = jax.tree.flatten(expected)
    assert actual_tree == expected_tree, f"{what}: structure {actual_tree} != {expected_tree}"
    for index, (a, e) in enumerate(zip(actual_leaves, expected_leaves, strict=True)):
        assert a.shape == e.shape, f"{what}[{index}]: shape {a.shape} != {e.shape}"
        assert np.all(np.isfinite(np.asarray(a, np.complex128))), f"{what}[{index}]: not finite"
        norm_error, element_error = relative_error(a, e)
        assert norm_error <= tolerance and element_error <= 10 * tolerance, (
            f"{what}[{index}]: relative error {norm_error:.3g} (norm), {element_error:.3g} "
            f"(worst element) > tolerance {tolerance:.3g}"
        )


# ----------------------------------------------------------------------------- helpers


def packed_segment_ids(batch: int, length: int) -> jax.Array:
    """Row 0 holds segments of lengths ~T/3, 1, ~T/3 and the rest; other rows one segment."""
    ids = np.zeros((batch, length), np.int32)
    cuts = sorted({c for c in (length // 3, length // 3 + 1, 2 * length // 3) if 0 < c < length})
    for cut in cuts:
        ids[0, cut:] += 1
    return jnp.asarray(ids)


def upcast(tree: Any) -> Any:
    """bfloat16 leaves to float32 (the reference then sees exactly the rounded inputs)."""
    return jax.tree.map(lambda x: x.astype(jnp.float32) if x.dtype == jnp.bfloat16 else x, tree)


def cotangents_like(tree: Any, key: jax.Array) -> Any:
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, len(leaves))
    weights = []
    for k, leaf in zip(keys, leaves, strict=True):
        w = jax.random.normal(k, leaf.shape, jnp.float32)
        if jnp.iscomplexobj(leaf):
            w = w + 1j * jax.random.normal(jax.random.fold_in(k, 1), leaf.shape, jnp.float32)
        weights.append(w)
    return jax.tree.unflatten(treedef, weights)


def weighted_sum(tree: Any, weights: Any) -> jax.Array:
    """A real scalar that depends on every element of every leaf."""
    terms = jax.tree.map(lambda x, w: jnp.sum(jnp.real(x.astype(w.dtype) * w)), tree, weights)
    return sum(jax.tree.leaves(terms))


def slice_time(spec: OpSpec, inputs: Inputs, rows: slice, times: slice | int) -> Inputs:
    def piece(name, value):
        if name in spec.time_inputs:
            return value[rows, times]
        return value[rows] if name in spec.row_inputs else value

    return {name: piece(name, value) for name, value in inputs.items()}


def split_floating(inputs: Inputs) -> tuple[Inputs, Inputs]:
    """(floating inputs, the others): gradients are taken w.r.t. the first only."""
    floating = {n: x for n, x in inputs.items() if jnp.issubdtype(x.dtype, jnp.inexact)}
    return floating, {n: x for n, x in inputs.items() if n not in floating}


def split_state(state: Any) -> tuple[list[Any], Callable[[list[Any]], Any]]:
    """(the floating leaves of `state`, with None for the others; a function rebuilding the
    state from such a list): gradients are taken w.r.t. the floating leaves only."""
    leaves, treedef = jax.tree.flatten(state)
    floating = [x if jnp.issubdtype(x.dtype, jnp.inexact) else None for x in leaves]

    def rebuild(new_floating):
        merged = [f if f is not None else x for f, x in zip(new_floating, leaves, strict=True)]
        return jax.tree.unflatten(treedef, merged)

    return floating, rebuild


def ring_view(slots: tuple[jax.Array, ...], positions: jax.Array, length: jax.Array) -> list:
    """A ring buffer as what decoding from it depends on: per row, the filled slots' contents
    ordered by position, and those positions relative to the next token (whatever the
    capacity and the slot each token landed in). Runs on concrete arrays."""
    rows = []
    for b in range(positions.shape[0]):
        row = np.asarray(positions[b])
        order = np.argsort(row)[np.sort(row) >= 0]
        relative = jnp.asarray(row[order] - int(length[b]))
        rows.append((*(x[b][order] for x in slots), relative))
    return rows


def slice_rows(tree: Any, rows: slice) -> Any:
    return None if tree is None else jax.tree.map(lambda x: x[rows], tree)


class Problem(NamedTuple):
    inputs: Inputs
    state: Any
    segment_ids: jax.Array | None


def make_problem(spec: OpSpec, case: Case, batch: int = 2, seed: int = 0) -> Problem:
    key_inputs, key_state = jax.random.split(jax.random.key(seed))
    inputs = spec.make_inputs(key_inputs, batch, case.length, case.dtype)
    state = spec.make_state(key_state, batch)
    segment_ids = packed_segment_ids(batch, case.length) if case.packed else None
    return Problem(inputs, state, segment_ids)


def run(spec: OpSpec, impl: str, problem: Problem) -> tuple[Any, Any]:
    fn = jax.jit(lambda inputs, state, ids: spec.apply(inputs, state, ids, impl))
    return fn(problem.inputs, problem.state, problem.segment_ids)


def gradients(spec: OpSpec, impl: str, problem: Problem, weights: Any) -> Any:
    floating, others = split_floating(problem.inputs)
    state, rebuild = split_state(problem.state)

    def loss(inputs, state):
        out = spec.apply({**inputs, **others}, rebuild(state), problem.segment_ids, impl)
        return weighted_sum(out, weights)

    return jax.jit(jax.grad(loss, argnums=(0, 1)))(floating, state)


# ----------------------------------------------------------------------------- the contract


class OpContract:
    """Subclass with `spec = OpSpec(...)`; pytest then runs every check below for the op."""

    spec: OpSpec

    def test_matches_reference(self, impl: str, case: Case):
        problem = make_problem(self.spec, case)
        expected = run(self.spec, "reference", upcast(problem))
        actual = run(self.spec, impl, problem)
        tolerance = TOLERANCE[jnp.dtype(case.dtype)] * self.spec.tolerance_scale
        assert_trees_close(actual, expected, tolerance, f"{impl} (output, final_state)")

    def test_gradients_match_reference(self, impl: str, case: Case):
        problem = make_problem(self.spec, case)
        expected_out = run(self.spec, "reference", upcast(problem))
        weights = cotangents_like(expected_out, jax.random.key(1))
        expected = gradients(self.spec, "reference", upcast(problem), weights)
        actual = gradients(self.spec, impl, problem, weights)
        tolerance = GRAD_TOLERANCE[jnp.dtype(case.dtype)] * self.spec.tolerance_scale
        assert_trees_close(
            upcast(actual), expected, tolerance, f"{impl} d(loss)/d(inputs, initial_state)"
        )

    def test_packed_segments_equal_separate_sequences(self, impl: str):
        length = 2 * self.spec.chunk_size + 3
        problem = make_problem(self.spec, Case(length, jnp.float32, True))
        packed_out, packed_state = run(self.spec, impl, problem)
        ids = np.asarray(problem.segment_ids[0])
        bounds = [0, *np.flatnonzero(ids[1:] != ids[:-1]) + 1, length]
        state = slice_rows(problem.state, slice(0, 1))
        for start, stop in itertools.pairwise(bounds):
            segment = Problem(
                slice_time(self.spec, problem.inputs, slice(0, 1), slice(start, stop)),
                state,
                None,
            )
            out, final = run(self.spec, impl, segment)
            expected_piece = jax.tree.map(lambda x, a=start, b=stop: x[0:1, a:b], packed_out)
            assert_trees_close(
                expected_piece,
                out,
                5 * TOLERANCE[jnp.dtype(jnp.float32)],
                f"segment [{start}, {stop})",
            )
            state = None
        assert_trees_close(
            self.spec.state_view(slice_rows(packed_state, slice(0, 1))),
            self.spec.state_view(final),
            5 * TOLERANCE[jnp.dtype(jnp.float32)],
            "final state after the last segment",
        )

    def test_step_equals_parallel(self):
        if self.spec.step is None:
            # An anti-causal op (the reversed scan), one that reads ahead (JRT's prefix) or
            # bidirectional attention has no step from t = 0; its test module checks decoding
            # where decoding exists.
            pytest.skip("spec.step is None: the op has no token-by-token step from t = 0")
        problem = make_problem(self.spec, Case(9, jnp.float32, False))
        expected_out, expected_state = run(self.spec, "reference", problem)
        step = jax.jit(self.spec.step)
        state, outputs = problem.state, []
        for t in range(9):
            out, state = step(slice_time(self.spec, problem.inputs, slice(None), t), state)
            outputs.append(out)
        stepped = jax.tree.map(lambda *xs: jnp.stack(xs, axis=1), *outputs)
        tolerance = 5 * TOLERANCE[jnp.dtype(jnp.float32)]
        assert_trees_close(stepped, expected_out, tolerance, "stepped outputs")
        assert_trees_close(
            self.spec.state_view(state),
            self.spec.state_view(expected_state),
            tolerance,
            "stepped final state",
        )

    def test_reference_gradients_match_finite_differences(self):
        with jax.enable_x64(True):
            problem = make_problem(self.spec, Case(5, jnp.float64, True))
            state, rebuild = split_state(problem.state)
            state = [
                None if x is None else x.astype(jnp.promote_types(x.dtype, jnp.float64))
                for x in state
            ]
            weights = jax.tree.map(
                lambda x: x.astype(jnp.promote_types(x.dtype, jnp.float64)),
                cotangents_like(
                    run(self.spec, "reference", problem._replace(state=rebuild(state))),
                    jax.random.key(2),
                ),
            )

            floating, others = split_floating(problem.inputs)

            # jit: check_grads evaluates the loss many times; compile it once.
            @jax.jit
            def loss(inputs, state):
                out = self.spec.apply(
                    {**inputs, **others}, rebuild(state), problem.segment_ids, "reference"
                )
                return weighted_sum(out, weights)

            check_grads(
                loss,
                (floating, state),
                order=1,
                modes=("rev",),
                atol=1e-5,
                rtol=1e-5,
                eps=1e-6,
            )

    # Every subclass runs this method for its own op, which hypothesis sees as "differing
    # executors"; the examples are derandomized, so each op's run is reproducible. Each example
    # compiles anew, so this runs in the slow job (the fixed cases above cover the default).
    @pytest.mark.slow
    @settings(
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.differing_executors]
    )
    @given(batch=st.integers(1, 3), length=st.integers(1, 80), seed=st.integers(0, 2**16))
    def test_random_shapes_match_reference(self, batch: int, length: int, seed: int):
        for impl in self.spec.impls:
            problem = make_problem(self.spec, Case(length, jnp.float32, length > 3), batch, seed)
            expected = run(self.spec, "reference", problem)
            actual = run(self.spec, impl, problem)
            tolerance = TOLERANCE[jnp.dtype(jnp.float32)] * self.spec.tolerance_scale
            assert_trees_close(actual, expected, tolerance, f"{impl} B={batch} T={length}")
