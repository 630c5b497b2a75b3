"""Aggregation over seeds: mean +- 95% confidence interval (Student t), and comparisons.

Every number in the report is a mean over the study's seeds with a two-sided 95%
t-interval, ``mean +- t_{0.975, n-1} * sd / sqrt(n)``; with one seed the interval is
undefined (NaN) and the report says so. Best guidance scales are chosen on the mean
over seeds, never per seed, so no seed or scale is cherry-picked.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Estimate:
    """Mean of ``n`` per-seed values with a 95% half-width ``ci`` (NaN when n < 2)."""

    mean: float
    ci: float
    n: int
    values: tuple[float, ...]

    @property
    def low(self) -> float:
        return self.mean - self.ci

    @property
    def high(self) -> float:
        return self.mean + self.ci

    def fmt(self) -> str:
        """``mean ± ci`` with as many decimals as the interval's second significant digit."""
        if math.isnan(self.mean):
            return "n/a"
        if math.isnan(self.ci):
            return f"{self.mean:.4g} (n={self.n})"
        if self.ci == 0:
            return f"{self.mean:.4g} ± 0"
        decimals = min(6, max(0, 1 - math.floor(math.log10(abs(self.ci)))))
        return f"{self.mean:.{decimals}f} ± {self.ci:.{decimals}f}"


def estimate(values: Iterable[float]) -> Estimate:
    """Mean and 95% t-interval half-width of finite ``values``."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=np.float64)
    n = len(v)
    if n == 0:
        return Estimate(math.nan, math.nan, 0, ())
    mean = float(v.mean())
    if n < 2:
        return Estimate(mean, math.nan, 1, tuple(v.tolist()))
    sem = float(v.std(ddof=1)) / math.sqrt(n)
    half = float(stats.t.ppf(0.5 + CONFIDENCE / 2, df=n - 1)) * sem
    return Estimate(mean, half, n, tuple(v.tolist()))


@dataclass(frozen=True)
class Difference:
    """Welch 95% interval for mean(a) - mean(b); ``verdict`` reads it for a lower-is-better
    (or higher-is-better) metric: ``better``, ``worse`` or ``indistinguishable``."""

    diff: float
    low: float
    high: float
    verdict: str


def compare(a: Estimate, b: Estimate, *, lower_is_better: bool) -> Difference:
    """Welch t-interval on the difference of two seed means (a - b)."""
    if a.n < 2 or b.n < 2:
        d = a.mean - b.mean
        return Difference(d, math.nan, math.nan, "indistinguishable (too few seeds for a CI)")
    va, vb = np.var(a.values, ddof=1) / a.n, np.var(b.values, ddof=1) / b.n
    se = math.sqrt(va + vb)
    d = a.mean - b.mean
    if se == 0:
        low = high = d
    else:
        dof = (va + vb) ** 2 / ((va**2) / (a.n - 1) + (vb**2) / (b.n - 1))
        half = float(stats.t.ppf(0.5 + CONFIDENCE / 2, df=dof)) * se
        low, high = d - half, d + half
    if low > 0:
        verdict = "worse" if lower_is_better else "better"
    elif high < 0:
        verdict = "better" if lower_is_better else "worse"
    else:
        verdict = "indistinguishable"
    return Difference(d, low, high, verdict)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a nested metrics dict as ``{"a/b/c": value}``."""
    out: dict[str, float] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "/"))
        elif isinstance(v, bool):
            continue
        elif isinstance(v, int | float) and v is not None:
            out[key] = float(v)
    return out


def group_seeds(
    records: list[dict[str, Any]], by: tuple[str, ...] = ("arch", "variant", "scale")
) -> dict[tuple, dict[str, Estimate]]:
    """Group per-seed records (``metrics`` = flat dict) and estimate every metric."""
    groups: dict[tuple, list[dict[str, float]]] = defaultdict(list)
    for r in records:
        groups[tuple(r[k] for k in by)].append(r["metrics"])
    out: dict[tuple, dict[str, Estimate]] = {}
    for key, ms in groups.items():
        names = sorted({m for d in ms for m in d})
        out[key] = {m: estimate(d.get(m, math.nan) for d in ms) for m in names}
    return out


def best_scale(
    per_scale: dict[float, dict[str, Estimate]], metric: str, *, lower_is_better: bool = True
) -> float | None:
    """Guidance scale whose seed-mean of ``metric`` is best (None if the metric is absent)."""
    scored = [
        (e[metric].mean, s)
        for s, e in per_scale.items()
        if metric in e and not math.isnan(e[metric].mean)
    ]
    if not scored:
        return None
    return (min if lower_is_better else max)(scored)[1]
