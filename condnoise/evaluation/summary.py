"""One table and one figure for the folders of an ``evaluate`` call (a guidance sweep, §5).

Rows are sample folders ordered by guidance scale; columns are ``metric@extractor`` so
the extractor that produced every number stays visible (FID on the Fashion-MNIST
classifier and on Inception are different quantities).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from condnoise.plotting import png_bytes, pyplot

# display order; any other metric follows alphabetically
ORDER = ("fid", "sfid", "is", "precision", "recall", "density", "coverage", "top_precision",
         "top_recall", "top_f1", "condition_accuracy", "rmd_top1", "avg_top5_l2",
         "memorization_ratio")
HIDDEN = ("is_std", "is_real")  # shown in metrics.json, not in the sweep table
NOTES = {"fid": "lower is better", "sfid": "lower is better",
         "memorization_ratio": "lower: less copying", "avg_top5_l2": "higher: farther from train",
         "rmd_top1": "higher: more complex samples"}  # paper §5


def guidance_of(result: dict) -> float | None:
    """The guidance scale of a metrics record: meta.json's value, else the s{scale} folder name."""
    meta = result.get("sample_meta") or {}
    for key in ("guidance", "guidance_scale"):
        if isinstance(meta.get(key), int | float):
            return float(meta[key])
    m = re.fullmatch(r"s(\d+(?:\.\d+)?)", Path(result.get("samples", "")).name)
    return float(m.group(1)) if m else None


def _columns(results: list[dict]) -> list[tuple[str, str]]:
    seen = {(m, e) for r in results for m, d in r["metrics"].items() for e in d if m not in HIDDEN}
    rank = {m: i for i, m in enumerate(ORDER)}
    return sorted(seen, key=lambda c: (rank.get(c[0], len(ORDER)), c[0], c[1]))


def _sorted(results: list[dict]) -> list[dict]:
    return sorted(results, key=lambda r: (guidance_of(r) is None, guidance_of(r) or 0.0,
                                          r.get("samples", "")))


def markdown_table(results: list[dict]) -> str:
    """Markdown table: one row per folder (with its guidance scale and sample count)."""
    cols = _columns(results)
    head = ["folder", "s", "n", *(f"{m}@{e}" for m, e in cols)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in _sorted(results):
        s = guidance_of(r)
        cells = [Path(r.get("samples", "?")).name, "" if s is None else f"{s:g}",
                 str(r.get("num_samples", ""))]
        for m, e in cols:
            v = r["metrics"].get(m, {}).get(e)
            cells.append("" if v is None else f"{v:.4g}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def sweep_figure(results: list[dict]) -> bytes | None:
    """PNG: every metric against guidance scale, one line per extractor; None if fewer
    than two folders carry a guidance scale."""
    pts = [r for r in _sorted(results) if guidance_of(r) is not None]
    if len({guidance_of(r) for r in pts}) < 2:
        return None
    plt = pyplot()
    metrics = list(dict.fromkeys(m for m, _ in _columns(pts)))
    ncol = min(4, len(metrics))
    nrow = math.ceil(len(metrics) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.2 * ncol, 2.6 * nrow), squeeze=False)
    for ax, metric in zip(axes.flat, metrics, strict=False):
        extractors = sorted({e for r in pts for e in r["metrics"].get(metric, {})})
        for e in extractors:
            xy = [(guidance_of(r), r["metrics"][metric][e]) for r in pts
                  if e in r["metrics"].get(metric, {})]
            ax.plot(*zip(*xy, strict=True), marker="o", ms=3, label=e)
        note = f" ({NOTES[metric]})" if metric in NOTES else ""
        ax.set_title(metric + note, fontsize=9)
        ax.set_xlabel("guidance scale s", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    fig.tight_layout()
    return png_bytes(fig)
