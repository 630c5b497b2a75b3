"""condnoise.stats against scipy and closed forms: t and Welch intervals (one rule for n = 1),
the top-fraction rule, covariance shrinkage and the Gaussian W2^2."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
from scipy import stats as sps

from condnoise import stats
from condnoise.errors import UserError


def test_t_interval_is_scipys_and_undefined_for_one_value():
    rng = np.random.default_rng(0)
    for n in (2, 3, 10):
        x = rng.normal(1.0, 2.0, size=n)
        mean, half = stats.t_interval(x)
        lo, hi = sps.t.interval(0.95, df=n - 1, loc=x.mean(), scale=sps.sem(x))
        assert math.isclose(mean - half, lo, rel_tol=1e-12) and math.isclose(mean + half, hi, rel_tol=1e-12)
    table = rng.normal(size=(5, 4))  # along an axis: one interval per column
    means, halves = stats.t_interval(table, axis=0)
    assert halves.shape == (4,) and math.isclose(halves[2], stats.t_interval(table[:, 2])[1])
    mean, half = stats.t_interval(np.array([3.0]))
    assert mean == 3.0 and math.isnan(half)
    assert np.isnan(stats.t_interval(np.ones((1, 3)))[1]).all()


def test_format_interval_says_n_a_never_zero_for_one_value():
    assert stats.format_interval(3.0, math.nan, 1) == "3 ± n/a (n=1)"
    assert stats.format_interval(math.nan, math.nan, 0) == "n/a"
    assert stats.format_interval(1.23456, 0.0123, 3) == "1.235 ± 0.012"
    assert stats.format_interval(2.0, 0.0, 3) == "2 ± 0"  # two equal seeds: a real zero width


def test_welch_interval_is_scipys():
    rng = np.random.default_rng(1)
    a, b = rng.normal(0, 1, 6), rng.normal(0.5, 2, 9)
    diff, lo, hi = stats.welch_interval(a, b)
    ref = sps.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert math.isclose(lo, ref.low, rel_tol=1e-9) and math.isclose(hi, ref.high, rel_tol=1e-9)
    assert math.isclose(diff, a.mean() - b.mean())
    assert all(math.isnan(v) for v in stats.welch_interval(a[:1], b)[1:])
    assert stats.welch_interval(np.ones(3), np.zeros(3)) == (1.0, 1.0, 1.0)


@pytest.mark.parametrize(("n", "count"), [(1, 1), (50, 1), (100, 1), (101, 2), (700, 7),
                                          (1000, 10), (2001, 21)])  # fmt: skip
def test_top_fraction_is_ceil_of_one_percent_at_least_one(n, count):
    assert stats.top_fraction_count(n, 0.01) == count
    scores = np.arange(float(n))
    np.testing.assert_array_equal(stats.top_fraction(scores), scores[::-1][:count])
    assert stats.top_fraction_mean(scores) == pytest.approx(scores[-count:].mean())
    with pytest.raises(UserError, match="empty"):
        stats.top_fraction_mean(np.array([]))


def test_shrink_covariance():
    cov = np.array([[4.0, 1.0], [1.0, 2.0]])
    np.testing.assert_allclose(stats.shrink_covariance(cov, 0.5), [[3.5, 0.5], [0.5, 2.5]])
    assert stats.shrink_covariance(cov, 0.0) is not None
    np.testing.assert_allclose(stats.shrink_covariance(cov, 1.0), 3.0 * np.eye(2))
    with pytest.raises(UserError, match="shrinkage"):
        stats.shrink_covariance(cov, 1.5)


def test_gaussian_w2_squared_closed_forms_and_fid_formula():
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2
    assert stats.gaussian_w2_squared([0.3], [[1.5**2]], [-0.4], [[0.6**2]]) == pytest.approx(
        0.7**2 + 0.9**2, rel=1e-12)
    rng = np.random.default_rng(2)
    d = 12
    a, b = rng.normal(size=(d, 3 * d)), rng.normal(size=(d, 3 * d))
    c1, c2 = a @ a.T / d, b @ b.T / d
    m1, m2 = rng.normal(size=d), rng.normal(size=d)
    covmean = scipy.linalg.sqrtm(c1 @ c2).real  # the FID reference formula
    ref = float((m1 - m2) @ (m1 - m2) + np.trace(c1 + c2 - 2 * covmean))
    assert stats.gaussian_w2_squared(m1, c1, m2, c2) == pytest.approx(ref, rel=1e-9)
    assert stats.gaussian_w2_squared(m1, c1, m1, c1) == pytest.approx(0.0, abs=1e-9)
    singular = np.diag([1.0] + [0.0] * (d - 1))
    assert math.isfinite(stats.gaussian_w2_squared(m1, singular, m2, c2))
    with pytest.raises(UserError, match="shapes"):
        stats.gaussian_w2_squared(m1, c1, m2[:3], c2[:3, :3])
