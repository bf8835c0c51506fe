"""The chunked forms over several blocks of chunks (`engine.scan_blocks`) equal the reference.

The contract tests' shapes fit one block at the default `BLOCK_BYTES`, so here a block is two
chunks: five chunks run as a loop over two blocks plus a last block of one, forward and in
reverse for the gradients, with packed segments that cross the blocks.
"""

import jax
import jax.numpy as jnp
import pytest
from contract import (
    GRAD_TOLERANCE,
    TOLERANCE,
    Case,
    assert_trees_close,
    cotangents_like,
    gradients,
    make_problem,
    run,
)
from test_delta_rule import delta_spec
from test_gla import CHUNK as GLA_CHUNK
from test_gla import GLA_SPEC, SIMPLE_GLA_SPEC, STRONG_DECAY_GLA_SPEC, make_gla_inputs
from test_mlstm import CHUNK as MLSTM_CHUNK
from test_mlstm import MLSTM_SPEC
from test_mlstm import make_inputs as make_mlstm_inputs

from seqjax.ops import chunked_linear_attention as engine
from seqjax.ops.gla import gla
from seqjax.ops.mlstm import mlstm

SPECS = {
    "gla": GLA_SPEC,
    "gla_strong_decays": STRONG_DECAY_GLA_SPEC,
    "simple_gla": SIMPLE_GLA_SPEC,
    "mlstm": MLSTM_SPEC,
    "delta_rule": delta_spec(gated=False, beta_max=2.0, unit_keys=True),
    "gated_delta_rule": delta_spec(gated=True, beta_max=1.0, unit_keys=False),
}
REPRESENTATIVE = {"gla_strong_decays", "gated_delta_rule"}


@pytest.fixture(autouse=True)
def two_chunk_blocks(monkeypatch):
    monkeypatch.setattr(engine, "block_chunks", lambda xs, axes: 2)


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(name, marks=() if name in REPRESENTATIVE else (pytest.mark.slow,))
        for name in SPECS
    ],
)
def test_blocks_match_reference(name):
    spec = SPECS[name]
    problem = make_problem(spec, Case(4 * spec.chunk_size + 3, jnp.float32, True))
    expected = run(spec, "reference", problem)
    tolerance = TOLERANCE[jnp.dtype(jnp.float32)] * spec.tolerance_scale
    assert_trees_close(run(spec, "chunked", problem), expected, tolerance, "(output, state)")
    weights = cotangents_like(expected, jax.random.key(1))
    assert_trees_close(
        gradients(spec, "chunked", problem, weights),
        gradients(spec, "reference", problem, weights),
        GRAD_TOLERANCE[jnp.dtype(jnp.float32)] * spec.tolerance_scale,
        "d(loss)/d(inputs, initial_state)",
    )


@pytest.mark.parametrize(
    "op, chunk, make_inputs",
    [
        (gla, GLA_CHUNK, make_gla_inputs),
        pytest.param(mlstm, MLSTM_CHUNK, make_mlstm_inputs, marks=pytest.mark.slow),
    ],
)
def test_gradient_with_respect_to_a_traced_scale_sums_over_blocks(op, chunk, make_inputs):
    # The engine applies the query scale inside each block: a learned (traced) scale gets
    # its gradient there, accumulated over the blocks of the reverse pass.
    inputs = make_inputs(jax.random.key(5), 1, 4 * chunk + 3, jnp.float32)
    names = list(inputs)

    def loss(impl):
        def f(scale, *args):
            o, final = op(*args, scale=scale, impl=impl, chunk_size=chunk)
            return jnp.sum(o * jnp.cos(o)) + sum(jnp.sum(x) for x in jax.tree.leaves(final))

        return jax.jit(jax.value_and_grad(f, argnums=tuple(range(len(names) + 1))))

    args = (jnp.float32(0.7), *(inputs[name] for name in names))
    assert_trees_close(
        loss("chunked")(*args),
        loss("reference")(*args),
        GRAD_TOLERANCE[jnp.dtype(jnp.float32)],
        "(loss, d(loss)/d(scale, inputs))",
    )
