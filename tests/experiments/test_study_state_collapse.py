"""Study 4, state collapse (`experiments/state_collapse.py`): bad configs fail at start, the
per-token losses and state norms are what they claim, the cached pass scores as the parallel
pass does, and the verdict reads the claim's direction from the numbers."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.state_collapse import (
    STUDY,
    binned_losses,
    cached_scorer,
    head_state_norms,
    verdict,
)
from experiments.study import Summary, load_config, run_study
from seqjax.data import IGNORE
from seqjax.models import LanguageModel, LanguageModelConfig
from seqjax.train.step import token_losses


def quick_config():
    return load_config("state_collapse", "quick")


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(mitigations=("none", "sliding_window")), r"config\.mitigations: unknown entry"),
        (dict(mitigations=("decay_clamp",)), r"config\.mitigations: must include 'none'"),
        (dict(test_length=16), r"config\.test_length: expected at least train_length = 32"),
        (dict(state_sizes=(4, 0)), r"config\.state_sizes: expected two or more positive"),
        (dict(state_sizes=(4,)), r"config\.state_sizes: expected two or more positive"),
        (dict(train_length=30), r"config\.train_length: expected a multiple of 4"),
        (dict(head_dim=5), r"config\.head_dim: must divide Mamba-2's inner width"),
        (dict(passkey_lengths=(112, 64)), r"config\.passkey_lengths: length: expected at least"),
        (dict(passkey_depths=(0.5, 1.5)), r"config\.passkey_depths: depth: expected a number"),
        (dict(test_length=2**40), r"config\.eval_rows: the test split has 0 files"),
    ],
)
def test_a_bad_config_fails_at_start(tmp_path, change, message):
    config = quick_config()
    config.update(change)
    with pytest.raises(ValueError, match=message):
        run_study(STUDY, config, [0], tmp_path)
    assert not any(tmp_path.iterdir())


def test_token_losses_and_state_norms_match_a_direct_computation():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
    targets = rng.integers(0, 7, size=(2, 5))
    targets[0, 1] = targets[1, 4] = IGNORE
    losses, valid = map(np.asarray, token_losses(jnp.asarray(logits), jnp.asarray(targets)))
    for b, t in np.ndindex(targets.shape):
        if targets[b, t] == IGNORE:
            assert not valid[b, t] and losses[b, t] == 0
        else:
            log_z = np.log(np.sum(np.exp(logits[b, t].astype(np.float64))))
            assert valid[b, t]
            np.testing.assert_allclose(losses[b, t], log_z - logits[b, t, targets[b, t]], 1e-5)
    # Bin (p / 2, p] averages its valid tokens only: (0, 2] holds tokens 0 and 1.
    means = binned_losses(losses, valid, [2, 4, 5])
    np.testing.assert_allclose(means[0], (losses[0, 0] + losses[1, :2].sum()) / 3, 1e-6)

    # Three layers, scanned (states stacked on a leading axis) or not: norms in layer order.
    options = {"mamba2": {"state_size": 3, "head_dim": 4}}
    for scanned in (True, False):
        config = LanguageModelConfig(
            vocab_size=8, width=4, layers=("mamba2",) * 3, mixer_options=options
        )
        config = dataclasses.replace(config, scan_layers=scanned)
        cache = LanguageModel(config).init_cache(2, 16)
        states = rng.normal(size=(3, 2, 2, 3, 4)).astype(np.float32)  # [L, B, H, N, P]
        if scanned:
            layers = (cache.layers[0]._replace(state=jnp.asarray(states)),)
        else:
            layers = tuple(
                (group[0]._replace(state=jnp.asarray(s)),)
                for group, s in zip(cache.layers, states, strict=True)
            )
        norms = head_state_norms(cache._replace(layers=layers))
        np.testing.assert_allclose(norms, np.sqrt((states**2).sum(axis=(-2, -1))), 1e-5)


@pytest.mark.slow
def test_the_cached_pass_scores_as_the_parallel_pass():
    config = LanguageModelConfig(
        vocab_size=256,
        width=16,
        layers=("mamba2", "mamba2"),
        mixer_options={"mamba2": {"state_size": 4, "head_dim": 8, "chunk_size": 8}},
    )
    model = LanguageModel(config)
    tokens = jax.random.randint(jax.random.key(0), (2, 48), 0, 256)
    targets = jnp.roll(tokens, -1, axis=1).at[:, -1].set(IGNORE)
    params = model.init(jax.random.key(1), tokens[:, :1])["params"]
    losses, valid, norms = cached_scorer(model, 12)(params, tokens, targets)
    logits, cache = model.apply({"params": params}, tokens)
    expected, expected_valid = token_losses(logits, targets)
    np.testing.assert_allclose(losses, expected, atol=1e-4)
    np.testing.assert_array_equal(valid, expected_valid)
    assert norms.shape == (4, 2, 2, 4)  # [48 / 12 probes, layers, rows, heads]
    np.testing.assert_allclose(norms[-1], head_state_norms(cache), rtol=1e-4)


def summary_of(loss: dict, passkey: dict) -> Summary:
    """Rows of two models: loss by `(model, mitigation)` at lengths 16 (the training length)
    and 32, 64 (past it); passkey accuracy by model at length 64 (past 32)."""
    rows = []
    for (model, mitigation), (at_train, past) in loss.items():
        for length, value in ((16, at_train), (32, past), (64, past)):
            rows.append(
                dict(
                    measure="loss",
                    model=model,
                    mitigation=mitigation,
                    length=length,
                    value=(value, 0.0, 1),
                )
            )
    for model in ("N=4", "N=64"):
        for length in (16, 32, 64):
            rows.append(
                dict(
                    measure="state_norm_max",
                    model=model,
                    mitigation="none",
                    length=length,
                    value=(1.0 + length / 64, 0.0, 1),
                )
            )
        for measure in ("passkey_accuracy", "passkey_digit_accuracy"):
            rows.append(
                dict(
                    measure=measure,
                    model=model,
                    mitigation="none",
                    length=64,
                    value=(passkey[model], 0.0, 1),
                )
            )
    config = dict(train_length=16, test_length=64, passkey_train_length=32)
    return Summary(rows, [0], config)


@pytest.mark.slow
def test_the_verdict_follows_the_numbers():
    paper = summary_of(
        {
            ("N=4", "none"): (2.0, 2.0),
            ("N=64", "none"): (1.9, 3.0),
            ("N=64", "decay_clamp"): (1.9, 2.0),
            ("N=64", "state_norm"): (1.9, 2.2),
        },
        {"N=4": 0.2, "N=64": 0.6},
    )
    text = verdict(paper)
    assert text.startswith("state collapse reproduces")
    assert "the mitigations reduce it" in text and "passkey capacity reproduces" in text
    assert "N=64 changes by +1.100" in text
    flat = summary_of(
        {
            ("N=4", "none"): (2.0, 2.5),
            ("N=64", "none"): (1.9, 2.0),
            ("N=64", "decay_clamp"): (1.9, 2.3),
        },
        {"N=4": 0.5, "N=64": 0.5},
    )
    text = verdict(flat)
    assert text.startswith("state collapse does NOT reproduce")
    assert "the mitigations do NOT reduce it" in text
    assert "passkey capacity does NOT reproduce" in text
