"""Synthetic time-series forecasting: noisy sums of sinusoids, for a lookback-to-horizon task.

Stands in for the real forecasting datasets (ETT, Weather, Exchange, ...) of "Attention as an
RNN" (Feng et al., 2024; `../shared/PAPERS.md` B.1.8) on a laptop: a model reads a lookback
window of `T` real values per channel and predicts the next `H`. Each series mixes a
seasonal part, which a model can extrapolate once it has inferred the periods and phases from
the window, and a stationary AR(1) part, whose predictable share decays as `rho ** h` with the
lead `h`, so the best possible error grows with the lead as in real data.

Example `i` (a pure function of `(seed, i)`, as every source of `seqjax.data`): with
`J = num_components`, `C = channels`, `N = T + H` and `t = 0 .. N - 1`,

    P_j     ~ LogUniform[min_period, max_period]           j = 1..J  (shared by the channels)
    A_{c,j} ~ Uniform[0.5, 1.5],  phi_{c,j} ~ Uniform[0, 2 pi)        (per channel)
    e_{c,0} ~ N(0, sigma^2),  e_{c,t} = rho e_{c,t-1} + sigma sqrt(1 - rho^2) eps_{c,t},
                                                    eps ~ N(0, 1)  (stationary, std sigma)
    x_{c,t} = sum_j A_{c,j} sin(2 pi t / P_j + phi_{c,j}) + e_{c,t}

with `sigma = noise_std`, `rho = noise_ar`. The channels share their periods, as the
variables of a multivariate series share its seasons, and differ in amplitude, phase and
noise. Unlike the token tasks' examples, this source's are real-valued and its targets do not
share the inputs' length:

- `inputs: [T, C] float32`, the lookback `x_{:, 0..T-1}` (time first);
- `targets: [H, C] float32`, the horizon `x_{:, T..T+H-1}`.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from seqjax.checks import check_at_least, check_positive
from seqjax.data.source import check_index, example_rng


@dataclasses.dataclass(frozen=True, kw_only=True)
class NoisySinusoids:
    """Lookback `context` -> `horizon` forecasting of noisy sums of sinusoids (module
    docstring)."""

    context: int = 96
    horizon: int = 96
    channels: int = 1
    num_components: int = 3
    min_period: float = 4.0
    max_period: float = 48.0
    noise_std: float = 0.3
    noise_ar: float = 0.9
    seed: int = 0
    num_examples: int = 100_000

    def __post_init__(self):
        for name in ("context", "horizon", "channels", "num_components", "num_examples"):
            check_positive(name, getattr(self, name))
        check_at_least("seed", self.seed, 0)
        if not 2.0 <= self.min_period <= self.max_period:
            raise ValueError(
                "min_period, max_period: expected 2 <= min_period <= max_period (a period of "
                f"at least two samples), got {self.min_period}, {self.max_period}"
            )
        if self.noise_std < 0:
            raise ValueError(f"noise_std: expected >= 0, got {self.noise_std}")
        if not -1.0 < self.noise_ar < 1.0:
            raise ValueError(
                f"noise_ar: expected a stationary AR(1) in (-1, 1), got {self.noise_ar}"
            )

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index: int) -> dict:
        rng = example_rng(self.seed, check_index(index, self.num_examples))
        series = self.series(rng)
        return {"inputs": series[: self.context], "targets": series[self.context :]}

    def series(self, rng: np.random.Generator) -> np.ndarray:
        """One whole series `x: [T + H, C]` float32, drawn from `rng` as the docstring says."""
        length, channels = self.context + self.horizon, self.channels
        bounds = np.log(self.min_period), np.log(self.max_period)
        log_period = rng.uniform(*bounds, self.num_components)
        amplitude = rng.uniform(0.5, 1.5, (channels, self.num_components))
        phase = rng.uniform(0.0, 2.0 * np.pi, (channels, self.num_components))
        t = np.arange(length)[:, None, None]  # [N, 1, 1]
        seasonal = np.sum(amplitude * np.sin(2 * np.pi * t / np.exp(log_period) + phase), axis=-1)
        innovations = rng.standard_normal((length, channels))
        rho, sigma = self.noise_ar, self.noise_std
        noise = np.empty((length, channels))
        noise[0] = sigma * innovations[0]
        for step in range(1, length):
            noise[step] = rho * noise[step - 1] + sigma * np.sqrt(1 - rho**2) * innovations[step]
        return (seasonal + noise).astype(np.float32)

    def batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """Examples `indices` stacked: `inputs: [B, T, C]`, `targets: [B, H, C]`."""
        examples = [self[int(i)] for i in indices]
        return {key: np.stack([e[key] for e in examples]) for key in ("inputs", "targets")}
