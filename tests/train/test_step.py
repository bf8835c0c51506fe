"""The train step: gradient accumulation is one step on the whole batch, and the loss counts
only supervised tokens."""

import jax
import numpy as np
import optax
import pytest
from small_mixers import SMALL, WIDTH

from seqjax.data import IGNORE
from seqjax.models import MIXERS, LanguageModelConfig, build
from seqjax.parallel import make_mesh
from seqjax.train.state import abstract_state, init_state
from seqjax.train.step import compile_steps

VOCAB, LENGTH, BATCH = 16, 8, 4


@pytest.fixture(scope="module")
def setup():
    config = LanguageModelConfig(
        vocab_size=VOCAB,
        width=16,
        layers=("attention",),
        mixer_options={"attention": {"num_heads": 2}},
    )
    model, mesh = build(config), make_mesh()
    schedule = optax.constant_schedule(1e-2)
    tx = optax.adam(schedule)
    _, shardings = abstract_state(model, tx, LENGTH, mesh)
    rng = np.random.default_rng(0)
    targets = rng.integers(0, VOCAB, (BATCH, LENGTH)).astype(np.int32)
    targets[rng.random((BATCH, LENGTH)) < 0.5] = IGNORE
    batch = {
        "inputs": rng.integers(0, VOCAB, (BATCH, LENGTH)).astype(np.int32),
        "targets": targets,
        "segment_ids": np.ones((BATCH, LENGTH), np.int32),
        "positions": np.tile(np.arange(LENGTH, dtype=np.int32), (BATCH, 1)),
    }

    def run(accumulation_steps):
        state = init_state(model, tx, jax.random.key(0), LENGTH, shardings)
        train, evaluate = compile_steps(
            model, tx, schedule, mesh, shardings, accumulation_steps=accumulation_steps
        )
        history = []
        for _ in range(2):
            state, metrics = train(state, batch)
            history.append(jax.device_get(metrics))
        return state, history, jax.device_get(evaluate(state.params, batch))

    return model, batch, {steps: run(steps) for steps in (1, 4)}


def test_accumulating_over_micro_batches_equals_one_step_on_the_batch(setup):
    _, _, runs = setup
    whole, whole_metrics, _ = runs[1]
    accumulated, accumulated_metrics, _ = runs[4]
    for a, b in zip(whole_metrics, accumulated_metrics, strict=True):
        for key in ("loss", "accuracy", "grad_norm", "supervised_tokens"):
            np.testing.assert_allclose(a[key], b[key], rtol=1e-5, err_msg=key)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
        whole.params,
        accumulated.params,
    )


def test_eval_sums_count_only_the_supervised_tokens(setup):
    model, batch, runs = setup
    state, history, sums = runs[1]
    logits, _ = model.apply(
        {"params": state.params},
        batch["inputs"],
        segment_ids=batch["segment_ids"],
        positions=batch["positions"],
    )
    log_probs = np.asarray(jax.nn.log_softmax(logits))
    supervised = batch["targets"] != IGNORE
    rows, columns = np.nonzero(supervised)
    expected = -log_probs[rows, columns, batch["targets"][rows, columns]].sum()
    assert history[0]["supervised_tokens"] == sums["count"] == supervised.sum()
    np.testing.assert_allclose(sums["loss"], expected, rtol=1e-5)
    predictions = log_probs.argmax(-1)
    assert sums["correct"] == np.sum(supervised & (predictions == batch["targets"]))


# The mixers whose input projections once had more kernel axis names than the flattened kernel
# Flax's DenseGeneral initializes (an error only under a mesh with logical rules).
REPRESENTATIVE_MIXERS = ("lstm", "mlstm")


@pytest.mark.parametrize(
    "mixer",
    [m if m in REPRESENTATIVE_MIXERS else pytest.param(m, marks=pytest.mark.slow) for m in MIXERS],
)
def test_every_mixer_takes_a_train_step_on_a_mesh(mixer):
    config = LanguageModelConfig(VOCAB, WIDTH, (mixer,), mixer_options=SMALL)
    model, mesh = build(config), make_mesh()
    schedule = optax.constant_schedule(1e-2)
    tx = optax.adam(schedule)
    _, shardings = abstract_state(model, tx, LENGTH, mesh)
    state = init_state(model, tx, jax.random.key(0), LENGTH, shardings)
    train, _ = compile_steps(model, tx, schedule, mesh, shardings)
    inputs = np.random.default_rng(0).integers(0, VOCAB, (BATCH, LENGTH)).astype(np.int32)
    batch = {
        "inputs": inputs,
        "targets": np.roll(inputs, -1, axis=1),
        "segment_ids": np.ones((BATCH, LENGTH), np.int32),
        "positions": np.tile(np.arange(LENGTH, dtype=np.int32), (BATCH, 1)),
    }
    state, metrics = train(state, batch)
    assert np.isfinite(float(metrics["loss"])) and int(state.step) == 1
