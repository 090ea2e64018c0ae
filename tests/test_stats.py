"""Seed statistics of the experiment tables against closed forms and a brute-force bootstrap."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from gdsd_jax.experiments import stats


def test_seed_stats_against_numpy():
    v = [0.61, 0.74, 0.70, None]
    assert stats.seed_stats(v) == pytest.approx((np.mean(v[:3]), np.std(v[:3], ddof=1), 3))
    assert stats.seed_stats([0.4]) == (0.4, 0.0, 1)
    assert stats.seed_stats([])[2] == 0


@pytest.mark.parametrize("values", [[0.2, 0.5], [0.61, 0.74, 0.70]])
def test_mean_ci_against_the_closed_form_t_quantiles(values):
    # t quantiles in closed form: df = 1 is the Cauchy law, t = tan(pi (p - 1/2)); df = 2 has
    # t = (2p - 1) / sqrt(2 p (1 - p)).
    p = 0.975
    t = {1: math.tan(math.pi * (p - 0.5)), 2: (2 * p - 1) / math.sqrt(2 * p * (1 - p))}[len(values) - 1]
    m, s = float(np.mean(values)), float(np.std(values, ddof=1))
    half = t * s / math.sqrt(len(values))
    assert stats.mean_ci(values) == pytest.approx((m - half, m + half), rel=1e-12)
    assert all(math.isnan(x) for x in stats.mean_ci([0.3]))


def _brute_force_bootstrap(d, level=0.95):
    """Every one of the n^n ordered resamples, equally likely; NumPy's inverted-CDF quantiles."""
    n = len(d)
    means = [np.mean([d[i] for i in idx]) for idx in itertools.product(range(n), repeat=n)]
    a = (1 - level) / 2
    return tuple(np.quantile(means, [a, 1 - a], method="inverted_cdf"))


@pytest.mark.parametrize("a, b", [
    ([0.79, 0.74, 0.76], [0.70, 0.73, 0.71]),
    ([0.30, 0.28, 0.41, 0.35], [0.33, 0.20, 0.36, 0.29]),
    ([0.5, 0.6, 0.7, 0.8, 0.9], [0.55, 0.52, 0.71, 0.60, 0.95]),
])
@pytest.mark.parametrize("level", [0.95, 0.8])
def test_paired_bootstrap_ci_against_brute_force_enumeration(a, b, level):
    d = np.subtract(a, b)
    mean, lo, hi = stats.paired_bootstrap_ci(a, b, level)
    assert mean == pytest.approx(d.mean())
    assert (lo, hi) == pytest.approx(_brute_force_bootstrap(d, level), abs=1e-12)
    assert d.min() <= lo <= mean <= hi <= d.max()


def test_paired_bootstrap_ci_two_seeds_by_hand():
    # Differences 0.1 and 0.3: the resample means 0.1, 0.2, 0.2, 0.3 -> the 2.5% and 97.5% quantiles are the
    # extremes; at the 50% level (cumulative probabilities 1/4, 3/4, 1) the 25% quantile is 0.1, the 75% one 0.2.
    assert stats.paired_bootstrap_ci([0.6, 0.8], [0.5, 0.5]) == pytest.approx((0.2, 0.1, 0.3))
    assert stats.paired_bootstrap_ci([0.6, 0.8], [0.5, 0.5], level=0.5) == pytest.approx((0.2, 0.1, 0.2))


def test_paired_bootstrap_ci_rejects_unpaired_input():
    with pytest.raises(ValueError, match="paired values"):
        stats.paired_bootstrap_ci([0.1, 0.2], [0.1])
    with pytest.raises(ValueError, match="paired values"):
        stats.paired_bootstrap_ci([], [])
