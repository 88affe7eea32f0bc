"""Paired comparison statistics for `caft compare`: mean, standard deviation and a bootstrap
confidence interval of the CAFT − next-token difference.

Why a two-level bootstrap: at small scale the spread between seeds is as large as the effect, and
a test set of a few hundred rows adds its own sampling noise. Each bootstrap draw resamples the
seeds (with replacement) and, for metrics defined per test row, the test rows too. Both methods are
resampled together (same seeds, same rows), so the interval is for the paired difference.

Example:
    >>> caft = np.array([[1, 0, 1], [1, 1, 0]])   # (seeds, rows) per-row scores
    >>> ntp = np.array([[0, 0, 1], [1, 0, 0]])
    >>> paired_bootstrap(caft, ntp, samples=2000, seed=0)
    PairedDifference(mean=0.333..., low=..., high=..., ...)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


@dataclass
class PairedDifference:
    """CAFT − next-token: the observed mean difference and its bootstrap interval."""

    mean: float
    low: float
    high: float
    confidence: float
    resampled: str  # "seeds and rows" or "seeds"
    significant: bool  # the interval excludes 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def paired_bootstrap(
    treatment: np.ndarray, control: np.ndarray, samples: int = 2000, confidence: float = 0.95, seed: int = 0
) -> PairedDifference:
    """Bootstrap interval of mean(treatment) − mean(control), paired by seed (and row).

    Args:
        treatment, control: (S,) one value per seed (corpus-level metrics), or (S, N) one value per
            seed and test row. Both have the same shape; row r of seed s is the same test row in both.
        samples: bootstrap draws.
        confidence: two-sided level, for example 0.95.
    """
    treatment = np.asarray(treatment, dtype=np.float64)
    control = np.asarray(control, dtype=np.float64)
    if treatment.shape != control.shape:
        raise ValueError(f"paired values need the same shape, got {treatment.shape} and {control.shape}")
    if treatment.ndim not in (1, 2) or treatment.shape[0] < 1:
        raise ValueError(f"expected (seeds,) or (seeds, rows) values, got shape {treatment.shape}")
    difference = treatment - control  # (S,) or (S, N)
    observed = float(difference.mean())
    rng = np.random.default_rng(seed)
    num_seeds = difference.shape[0]
    seed_draws = rng.integers(0, num_seeds, size=(samples, num_seeds))  # (B, S)
    if difference.ndim == 1:
        draws = difference[seed_draws].mean(axis=1)  # (B,)
        resampled = "seeds"
    else:
        num_rows = difference.shape[1]
        draws = np.empty(samples)
        # One row draw per bootstrap sample, shared by the resampled seeds: the test set is drawn once
        # from its population, then each seed is evaluated on that same set.
        for index in range(samples):
            rows = rng.integers(0, num_rows, size=num_rows)
            draws[index] = difference[seed_draws[index]][:, rows].mean()
        resampled = "seeds and rows"
    tail = (1 - confidence) / 2
    low, high = np.quantile(draws, [tail, 1 - tail])
    return PairedDifference(
        mean=observed,
        low=float(low),
        high=float(high),
        confidence=confidence,
        resampled=resampled,
        significant=bool(low > 0 or high < 0),
    )


def mean_and_sd(values: list[float] | np.ndarray) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; 0 for a single value)."""
    array = np.asarray(values, dtype=np.float64)
    sd = float(array.std(ddof=1)) if array.size > 1 else 0.0
    return float(array.mean()), sd
