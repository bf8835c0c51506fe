"""Study 5 (`experiments/aaren.py`): its bad configs fail at start, and its data, the noisy
sinusoids of `seqjax.data.forecasting`, follow their definition."""

from __future__ import annotations

import numpy as np
import pytest

from experiments.aaren import STUDY
from experiments.study import load_config, run_study
from seqjax.data import make_source
from seqjax.data.source import example_rng


def quick_config():
    return load_config("aaren", "quick")


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(models=("aaren", "mamba3")), r"config\.models: unknown entry 'mamba3'"),
        (dict(models=("aaren",)), r"config\.models: must include 'attention'"),
        (dict(heads=3), r"config\.heads: must divide config\.width"),
        (dict(data=dict(noise_ar=1.0)), r"config\.data: noise_ar: expected a stationary"),
    ],
)
def test_a_bad_config_fails_at_start(tmp_path, change, message):
    config = quick_config()
    config.update(change)
    with pytest.raises(ValueError, match=message):
        run_study(STUDY, config, [0], tmp_path)
    assert not any(tmp_path.iterdir())


def test_noisy_sinusoids_follow_their_definition():
    options = dict(context=40, horizon=24, channels=3, num_components=2, seed=7)
    source = make_source("noisy_sinusoids", **options, noise_std=0.5, noise_ar=0.8)
    example = source[11]
    assert example["inputs"].shape == (40, 3) and example["targets"].shape == (24, 3)
    assert example["inputs"].dtype == example["targets"].dtype == np.float32

    # The docstring's draws, in its order, from example 11's own generator.
    rng = example_rng(7, 11)
    periods = np.exp(rng.uniform(np.log(4.0), np.log(48.0), 2))
    amplitudes, phases = rng.uniform(0.5, 1.5, (3, 2)), rng.uniform(0, 2 * np.pi, (3, 2))
    innovations = rng.standard_normal((64, 3))
    t = np.arange(64)[:, None, None]
    seasonal = (amplitudes * np.sin(2 * np.pi * t / periods + phases)).sum(-1)
    noise = [0.5 * innovations[0]]
    for eps in innovations[1:]:
        noise.append(0.8 * noise[-1] + 0.5 * np.sqrt(1 - 0.8**2) * eps)
    series = np.concatenate([example["inputs"], example["targets"]])
    np.testing.assert_allclose(series, seasonal + np.array(noise), rtol=1e-5, atol=1e-5)

    # The AR(1) part (the series less its noiseless twin: the same draws) is stationary, of
    # std `noise_std` from the first step on, with lag-1 correlation `noise_ar`.
    noisy = make_source("noisy_sinusoids", **options, noise_std=0.5, noise_ar=0.8)
    clean = make_source("noisy_sinusoids", **options, noise_std=0.0, noise_ar=0.8)
    residual = np.stack([noisy[i]["inputs"] - clean[i]["inputs"] for i in range(400)])
    assert np.allclose(residual.std(axis=(0, 2))[[0, -1]], 0.5, atol=0.05)
    lag1 = np.mean(residual[:, 1:] * residual[:, :-1]) / np.mean(residual**2)
    assert abs(lag1 - 0.8) < 0.03
