"""Statistics over seeds for the experiment tables: mean, sample std, a t confidence interval, and a paired
bootstrap interval for the difference of two methods run on the same seeds. Pure functions of the values.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np
from scipy import stats as _scipy_stats

MAX_EXACT_BOOTSTRAP = 10   # seeds: the exact bootstrap enumerates C(2n-1, n) resamples (92,378 at n = 10)


def _finite(values: Sequence[float | None]) -> np.ndarray:
    return np.asarray([v for v in values if v is not None], dtype=np.float64)


def seed_stats(values: Sequence[float | None]) -> tuple[float, float, int]:
    """(mean, sample std with ddof=1 (0 for a single value), n) over seeds; None values are left out."""
    a = _finite(values)
    if a.size == 0:
        return math.nan, math.nan, 0
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0, int(a.size)


def mean_ci(values: Sequence[float | None], level: float = 0.95) -> tuple[float, float]:
    """Student-t confidence interval of the mean over seeds: ``mean -+ t_{(1+level)/2, n-1} * std / sqrt(n)``
    (NaNs below 2 values)."""
    mean, std, n = seed_stats(values)
    if n < 2:
        return math.nan, math.nan
    half = float(_scipy_stats.t.ppf(0.5 + level / 2, n - 1)) * std / math.sqrt(n)
    return mean - half, mean + half


def _compositions(n: int):
    """Every way to draw n items with replacement from n, as counts per item ([n] each, summing to n)."""
    for cut in itertools.combinations(range(2 * n - 1), n - 1):
        bounds = (-1, *cut, 2 * n - 1)
        yield [bounds[i + 1] - bounds[i] - 1 for i in range(n)]


def paired_bootstrap_ci(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """(mean of a - b, lower, upper): the percentile bootstrap interval of the mean paired difference.

    ``a[i]`` and ``b[i]`` are two methods' results on seed i. The bootstrap distribution is computed exactly,
    not sampled: every resample of the n differences with replacement (a multiset of counts, weighted by its
    multinomial probability), so the interval does not depend on a random seed. The bounds are the
    distribution's ``(1 -+ level) / 2`` quantiles (the smallest resample mean whose cumulative probability
    reaches the level, NumPy's ``inverted_cdf``). With n seeds the interval can never be wider than the range
    of the differences; with 3 seeds it is a coarse statement.
    """
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.ndim != 1 or x.shape != y.shape or x.size == 0:
        raise ValueError(f"expected two non-empty 1-D sequences of paired values (one per seed), got shapes "
                         f"{x.shape} and {y.shape}")
    d = x - y
    n = d.size
    if n > MAX_EXACT_BOOTSTRAP:
        raise ValueError(f"the exact bootstrap enumerates every resample; {n} pairs is more than "
                         f"{MAX_EXACT_BOOTSTRAP}")
    means, weights = [], []
    for counts in _compositions(n):
        means.append(float(np.dot(counts, d)) / n)
        weights.append(math.factorial(n) // math.prod(math.factorial(c) for c in counts))
    order = np.argsort(means, kind="stable")
    means_sorted = np.asarray(means)[order]
    cum = np.cumsum(np.asarray(weights, dtype=np.float64)[order]) / float(n ** n)
    alpha = (1.0 - level) / 2

    def quantile(q: float) -> float:
        return float(means_sorted[np.searchsorted(cum, q - 1e-12, side="left")])

    return float(d.mean()), quantile(alpha), quantile(1.0 - alpha)
