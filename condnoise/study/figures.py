"""The report's figures (matplotlib, Agg backend), returned as PNG bytes.

Every curve point is a mean over seeds with a 95% t-interval error bar
(:mod:`condnoise.study.aggregate`). Figures follow the paper: metric vs guidance scale
(Figs. 2-4) or vs sampler steps (few-step students against their teachers), FID vs IS and precision vs recall traced over the guidance sweep (Fig. 3),
top-1% RMD densities (Fig. 5), FID vs mean embedding L2 shift (Fig. 8a).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from condnoise.plotting import png_bytes, pyplot
from condnoise.study.aggregate import Estimate

Series = dict[str, list[tuple[float, Estimate]]]  # label -> [(x, estimate of y)]


def _yerr(ests: Sequence[Estimate]) -> np.ndarray | None:
    ci = np.array([0.0 if math.isnan(e.ci) else e.ci for e in ests])
    return ci if ci.any() else None


def metric_vs_guidance(series: Series, ylabel: str, title: str, *, xlabel: str = "guidance scale s",
                       log2_x: bool = False) -> bytes:  # fmt: skip
    """One line per model: seed mean of a metric at each guidance scale (or another x, e.g.
    sampler steps on a log2 axis), 95% CI bars."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.6, 3.8))
    for label, pts in series.items():
        pts = sorted(pts)
        xs = [p[0] for p in pts]
        ests = [p[1] for p in pts]
        ax.errorbar(xs, [e.mean for e in ests], yerr=_yerr(ests), marker="o", ms=4,
                    capsize=3, label=label)  # fmt: skip
    if log2_x:
        ax.set_xscale("log", base=2)
        xs = sorted({p[0] for pts in series.values() for p in pts})
        ax.set_xticks(xs, [f"{x:g}" for x in xs])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.16))  # below: never on the data
    return png_bytes(fig)


def trade_off(
    curves: dict[str, list[tuple[float, Estimate, Estimate]]], xlabel: str, ylabel: str, title: str
) -> bytes:
    """One curve per model traced over the guidance sweep: (x, y) with 2-D CI bars;
    every point is annotated with its scale."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.6, 3.8))
    for label, pts in curves.items():
        pts = sorted(pts, key=lambda p: p[0])
        xs, ys = [p[1] for p in pts], [p[2] for p in pts]
        line = ax.errorbar([e.mean for e in xs], [e.mean for e in ys], xerr=_yerr(xs),
                           yerr=_yerr(ys), marker="o", ms=4, capsize=2, label=label)  # fmt: skip
        for s, x, y in pts:
            ax.annotate(f"{s:g}", (x.mean, y.mean), fontsize=6, xytext=(3, 3),
                        textcoords="offset points", color=line[0].get_color())  # fmt: skip
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return png_bytes(fig)


def densities(scores: dict[str, np.ndarray], xlabel: str, title: str) -> bytes:
    """Histogram densities (step lines) of per-sample scores, one per model."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.6, 3.8))
    finite = [s[np.isfinite(s)] for s in scores.values()]
    allv = np.concatenate([f for f in finite if len(f)]) if finite else np.zeros(1)
    bins = np.linspace(float(allv.min()), float(allv.max()) + 1e-9, 30)
    for (label, _), s in zip(scores.items(), finite):
        if len(s):
            ax.hist(s, bins=bins, density=True, histtype="step", lw=1.5,
                    label=f"{label} (mean {s.mean():.3g})")  # fmt: skip
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return png_bytes(fig)


def ablation(points: list[tuple[str, str, Estimate, Estimate]], title: str) -> bytes:
    """FID vs mean embedding L2 shift (Fig. 8a): ``(label, group, shift, fid)`` points;
    groups (CEP, fixed corruption, ...) get their own markers."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.6, 3.8))
    markers = {"clean": "*", "CEP": "o", "fixed data corruption": "s", "other": "^"}
    for group in dict.fromkeys(p[1] for p in points):
        pts = sorted((p for p in points if p[1] == group), key=lambda p: p[2].mean)
        xs, ys = [p[2] for p in pts], [p[3] for p in pts]
        line = ax.errorbar([e.mean for e in xs], [e.mean for e in ys], xerr=_yerr(xs),
                           yerr=_yerr(ys), marker=markers.get(group, "^"), ms=6, capsize=2,
                           ls="-" if group == "CEP" else "none", label=group)  # fmt: skip
        for label, _, x, y in pts:
            ax.annotate(label, (x.mean, y.mean), fontsize=6, xytext=(3, 3),
                        textcoords="offset points", color=line[0].get_color())  # fmt: skip
    ax.set_xlabel("mean L2 shift of the condition embedding in training")
    ax.set_ylabel("FID (best guidance)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return png_bytes(fig)
