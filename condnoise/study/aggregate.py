"""Aggregation over seeds: mean +- 95% confidence interval, and comparisons.

Every number in the report is a mean over the study's seeds with the two-sided 95%
Student-t interval of :func:`condnoise.stats.t_interval`; with one seed the interval is
undefined (NaN, rendered ``n/a``). Two models are compared by the Welch interval of
:func:`condnoise.stats.welch_interval`, or, when each seed of one model was made from the
same seed of the other (a distilled student and its teacher), by the t-interval of the
per-seed differences (:func:`compare_paired`). Best guidance scales are chosen on the mean over
seeds, never per seed, so no seed or scale is cherry-picked.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import numpy as np

from condnoise import stats


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
        """``mean ± ci``, ``mean ± n/a (n=1)`` for one seed, ``n/a`` for none."""
        return stats.format_interval(self.mean, self.ci, self.n)


def estimate(values: Iterable[float]) -> Estimate:
    """Mean and 95% t-interval half-width of the finite ``values``."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=np.float64)
    if len(v) == 0:
        return Estimate(math.nan, math.nan, 0, ())
    mean, half = stats.t_interval(v)
    return Estimate(float(mean), float(half), len(v), tuple(v.tolist()))


class Verdict(StrEnum):
    """How a model compares with another on one metric (a Welch 95% interval)."""

    BETTER = "better"
    WORSE = "worse"
    INDISTINGUISHABLE = "indistinguishable"
    NO_INTERVAL = "no interval (fewer than 2 seeds)"


@dataclass(frozen=True)
class Difference:
    """A 95% interval (Welch or paired) for mean(a) - mean(b) and what it says for the metric."""

    diff: float
    low: float
    high: float
    verdict: Verdict

    def fmt(self, spec: str = ".3g") -> str:
        """``+diff [+low, +high]``; without an interval ``+diff``; ``n/a`` without a value."""
        if math.isnan(self.diff):
            return "n/a"
        ci = "" if math.isnan(self.low) else f" [{self.low:+{spec}}, {self.high:+{spec}}]"
        return f"{self.diff:+{spec}}{ci}"


def compare(a: Estimate, b: Estimate, *, lower_is_better: bool) -> Difference:
    """Welch t-interval on the difference of two seed means (a - b); ``better`` / ``worse``
    only when the whole interval lies on one side of zero."""
    if a.n < 2 or b.n < 2:
        return Difference(a.mean - b.mean, math.nan, math.nan, Verdict.NO_INTERVAL)
    d, low, high = stats.welch_interval(np.array(a.values), np.array(b.values))
    return _difference(d, low, high, lower_is_better)


def compare_paired(a: dict[int, float], b: dict[int, float], *, lower_is_better: bool) -> Difference:
    """Paired 95% t-interval of ``a[seed] - b[seed]`` over the seeds both have (Student 1908;
    for models made seed by seed from each other, e.g. a student from its teacher)."""
    seeds = sorted(set(a) & set(b))
    if len(seeds) < 2:
        d = a[seeds[0]] - b[seeds[0]] if seeds else math.nan
        return Difference(d, math.nan, math.nan, Verdict.NO_INTERVAL)
    mean, half = stats.t_interval(np.array([a[s] - b[s] for s in seeds]))
    d, half = float(mean), float(half)
    return _difference(d, d - half, d + half, lower_is_better)


def _difference(d: float, low: float, high: float, lower_is_better: bool) -> Difference:
    """The verdict of an interval ``[low, high]`` on a difference ``d``."""
    if low > 0:
        verdict = Verdict.WORSE if lower_is_better else Verdict.BETTER
    elif high < 0:
        verdict = Verdict.BETTER if lower_is_better else Verdict.WORSE
    else:
        verdict = Verdict.INDISTINGUISHABLE
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
