"""The one statistics module: confidence intervals, top-fraction means, the Gaussian W2^2
and covariance shrinkage (numpy / scipy, float64).

Used by the evaluation metrics (FID = W2^2 of fitted Gaussians, RMD's top 1%, shrinkage),
the theory lab (W2^2 of the generated Gaussians, CIs over replicates), the study's
aggregator (mean +- CI over seeds, Welch comparisons) and its report.

One rule for a single value (n = 1): the half-width of an interval is NaN, rendered
``n/a`` by :func:`format_interval`; it is never reported as 0.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats as _scipy_stats

from condnoise.errors import UserError

CONFIDENCE = 0.95


def _t_quantile(dof: float | np.ndarray) -> float | np.ndarray:
    return _scipy_stats.t.ppf(0.5 + CONFIDENCE / 2, dof)


def t_interval(x: np.ndarray, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Mean and half-width of the two-sided 95% Student-t interval of the mean along
    ``axis``: ``t_{0.975, n-1} * sd / sqrt(n)``; the half-width is NaN when n < 2."""
    x = np.asarray(x, dtype=np.float64)
    n = x.shape[axis]
    mean = x.mean(axis=axis) if n else np.full(np.delete(x.shape, axis), np.nan)
    if n < 2:
        return mean, np.full_like(mean, np.nan)
    return mean, _t_quantile(n - 1) * x.std(axis=axis, ddof=1) / math.sqrt(n)


def welch_interval(a: np.ndarray, b: np.ndarray) -> tuple[float, float, float]:
    """Welch 95% interval for ``mean(a) - mean(b)``: ``(difference, low, high)``; the bounds
    are NaN when either sample has fewer than 2 values, equal to the difference when both
    have zero variance."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    diff = float(a.mean() - b.mean())
    if len(a) < 2 or len(b) < 2:
        return diff, math.nan, math.nan
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:
        return diff, diff, diff
    dof = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    half = float(_t_quantile(dof)) * se
    return diff, diff - half, diff + half


def format_interval(mean: float, half: float, n: int) -> str:
    """``mean ± half`` with as many decimals as the half-width's second significant digit;
    ``mean ± n/a (n=1)`` without an interval, ``n/a`` without a value."""
    if math.isnan(mean):
        return "n/a"
    if math.isnan(half):
        return f"{mean:.4g} ± n/a (n={n})"
    if half == 0:
        return f"{mean:.4g} ± 0"
    decimals = min(6, max(0, 1 - math.floor(math.log10(abs(half)))))
    return f"{mean:.{decimals}f} ± {half:.{decimals}f}"


def top_fraction_count(n: int, fraction: float = 0.01) -> int:
    """How many of ``n`` values form the top ``fraction``: ``ceil(fraction * n)``, at least 1
    (computed on a value rounded to 9 decimals, so 0.07 * 100 is 7, not 8)."""
    return max(1, math.ceil(round(fraction * n, 9)))


def top_fraction(scores: np.ndarray, fraction: float = 0.01) -> np.ndarray:
    """The highest ``fraction`` of ``scores`` (see :func:`top_fraction_count`), descending."""
    s = np.sort(np.asarray(scores, np.float64).ravel())[::-1]
    if len(s) == 0:
        raise UserError("top-fraction of an empty score array")
    return s[: top_fraction_count(len(s), fraction)]


def top_fraction_mean(scores: np.ndarray, fraction: float = 0.01) -> float:
    """Mean of the highest ``fraction`` of scores: the paper's top-1% RMD (section 5)."""
    return float(top_fraction(scores, fraction).mean())


def shrink_covariance(cov: np.ndarray, shrinkage: float) -> np.ndarray:
    """``(1 - s) Sigma + s * trace(Sigma) / d * I`` (shrinkage towards the scaled identity,
    Ledoit & Wolf 2004, with a fixed coefficient ``s`` in [0, 1])."""
    if not 0.0 <= shrinkage <= 1.0:
        raise UserError(f"shrinkage must lie in [0, 1], got {shrinkage}")
    cov = np.asarray(cov, np.float64)
    if not shrinkage:
        return cov
    d = cov.shape[0]
    return (1 - shrinkage) * cov + shrinkage * np.trace(cov) / d * np.eye(d)


def _sqrt_psd(a: np.ndarray) -> np.ndarray:
    lam, u = np.linalg.eigh(a)
    return (u * np.sqrt(np.clip(lam, 0.0, None))) @ u.T


def gaussian_w2_squared(
    mean1: np.ndarray, cov1: np.ndarray, mean2: np.ndarray, cov2: np.ndarray
) -> float:
    """Squared 2-Wasserstein distance between two Gaussians (= the Fréchet distance of FID,
    Heusel et al. 2017): ``||m1 - m2||^2 + tr C1 + tr C2 - 2 tr (C1^1/2 C2 C1^1/2)^1/2``,
    through symmetric eigendecompositions (covariances may be singular), clipped at 0."""
    mean1, mean2 = np.atleast_1d(np.asarray(mean1, np.float64)), np.atleast_1d(np.asarray(mean2, np.float64))
    cov1, cov2 = np.atleast_2d(np.asarray(cov1, np.float64)), np.atleast_2d(np.asarray(cov2, np.float64))
    if mean1.shape != mean2.shape or cov1.shape != cov2.shape or cov1.shape != mean1.shape * 2:
        raise UserError(f"Gaussian statistics shapes differ: means {mean1.shape} vs {mean2.shape}, "
                        f"covariances {cov1.shape} vs {cov2.shape}")
    r1 = _sqrt_psd(cov1)
    inner = r1 @ cov2 @ r1
    cross = np.linalg.eigvalsh((inner + inner.T) / 2)
    trace_sqrt = float(np.sqrt(np.clip(cross, 0.0, None)).sum())
    diff = mean1 - mean2
    return max(float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2 * trace_sqrt), 0.0)
