"""Collect a study's finished cells into per-seed records (the report's only input).

A record is one evaluated sample set: ``{arch, variant, seed, scale, metrics}`` with
``metrics`` the flattened ``metrics.json`` (``"extractor/metric": value``); records of the
step sweep (few-step students and their teachers) are kept apart in ``step_records``, with
``steps`` and ``sampler`` too, and so are those of samples made with spatial controls
(adapters and their bases' without-control references) in ``downstream_records``, with
``control`` and ``applied``. Metric names are looked up through :data:`METRICS` (canonical name -> accepted keys), preferring
the study's first feature extractor, so the report follows the evaluation stage's schema
(``docs/architecture.md``, evaluation/).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from condnoise.io import read_json, read_npz
from condnoise.study.aggregate import Estimate, estimate, flatten
from condnoise.study.cache import is_done
from condnoise.study.grid import Cell, build_cells
from condnoise.study.spec import StudySpec, Variant

CEP_NAMES = ("cep-u", "cep-g")  # the paper's condition-embedding perturbations (Sec. 3)
# canonical name -> (keys accepted in metrics.json, label, lower is better)
METRICS: dict[str, tuple[tuple[str, ...], str, bool]] = {
    "fid": (("fid",), "FID", True),
    "is": (("is", "inception_score", "is_mean", "classifier_score", "is_style"),
           "IS-style score", False),
    "precision": (("precision",), "precision", False),
    "recall": (("recall",), "recall", False),
    "accuracy": (("accuracy", "condition_accuracy", "cond_accuracy"), "condition accuracy",
                 False),
    "real_accuracy": (("real_accuracy",), "classifier accuracy on real test images "
                      "(through the samples' resolution pipeline)", False),
    "real_accuracy_native": (("real_accuracy_native",), "classifier accuracy on real test "
                             "images (as they are)", False),
    "rmd_top1": (("rmd_top1", "top1_rmd", "rmd_top1pct", "rmd_top_1"), "top-1% RMD", False),
    "top5_l2": (("top5_l2", "avg_top5_l2", "avg_topk_l2"), "average top-5 L2", False),
    "memorization": (("memorization_ratio", "memorization"), "memorization ratio", True),
    "entropy": (("entropy", "sample_entropy"), "sample entropy", False),
    "topp_f1": (("top_f1", "topp_f1", "top_pr_f1"), "TopP&R F1", False),
    "sfid": (("sfid",), "sFID", True),
    # text models (study/text_report.py): scenes-clip or CLIP space, the scenes-recognizer
    "clip_score": (("clip_score",), "CLIP score", False),
    "r_precision": (("r_precision",), "R-precision", False),
    **{f"caption_{a}": ((f"caption_{a}",), f"caption accuracy ({a})", False)
       for a in ("all", "class", "colour", "size", "position", "background", "count",
                 "all_seen", "all_novel")},
    "edge_f1": (("edge_f1",), "edge F1", False),  # control fidelity (control_metrics.py)
    "mask_iou": (("mask_iou",), "mask IoU", False),
}  # fmt: skip


def metric_key(flat: dict[str, float], name: str, extractors: list[str]) -> str | None:
    """The key in ``flat`` holding canonical metric ``name`` (first extractor wins)."""
    aliases = METRICS[name][0]
    for ex in [*extractors, ""]:
        for a in aliases:
            for key in flat:
                parts = key.split("/")
                if a in parts and (not ex or ex in parts):
                    return key
    return None


@dataclass
class StudyResults:
    spec: StudySpec
    study_dir: Path
    records: list[dict[str, Any]] = field(default_factory=list)
    shifts: dict[tuple[str, str], Estimate] = field(default_factory=dict)
    images: dict[tuple[str, str], dict[str, Path]] = field(default_factory=dict)
    eval_dirs: dict[tuple[str, str, int, float], Path] = field(default_factory=dict)
    theory: list[Path] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    cells: list[Cell] = field(default_factory=list)
    #: the step sweep's records (``steps``, ``sampler`` besides the record's fields)
    step_records: list[dict[str, Any]] = field(default_factory=list)
    #: controlled samples' records (``control``: canny / mask, ``applied``: False for a base
    #: sampled with the controls recorded only)
    downstream_records: list[dict[str, Any]] = field(default_factory=list)

    def variant(self, name: str) -> Variant:
        return next(v for v in self.spec.variants if v.name == name)

    @property
    def extractors(self) -> list[str]:
        return list(self.spec.evaluate["extractors"])

    def value(self, rec: dict[str, Any], name: str) -> float:
        key = metric_key(rec["metrics"], name, self.extractors)
        return rec["metrics"][key] if key else float("nan")

    def has(self, name: str) -> bool:
        return any(metric_key(r["metrics"], name, self.extractors) for r in self.records)

    def models(self) -> list[tuple[str, str]]:
        """(arch, variant) pairs with at least one evaluated sample set, in study order."""
        seen = {(r["arch"], r["variant"]) for r in self.records}
        return [(a, v.name) for a in self.spec.architectures for v in self.spec.variants
                if (a, v.name) in seen]  # fmt: skip

    def per_scale(self, arch: str, variant: str, name: str) -> dict[float, Estimate]:
        """Seed estimate of metric ``name`` at each guidance scale of one model."""
        out: dict[float, list[float]] = {}
        for r in self.records:
            if r["arch"] == arch and r["variant"] == variant:
                out.setdefault(r["scale"], []).append(self.value(r, name))
        return {s: estimate(v) for s, v in sorted(out.items()) if estimate(v).n}

    def per_steps(self, arch: str, variant: str, scale: float, name: str = "fid") -> dict[int, Estimate]:
        """Seed estimate of metric ``name`` at each sampler step count of the step sweep."""
        by_seed = self.per_steps_by_seed(arch, variant, scale, name)
        return {n: e for n, v in sorted(by_seed.items()) if (e := estimate(v.values())).n}

    def per_scale_downstream(self, arch: str, variant: str, name: str, *, applied: bool,
                             control: str) -> dict[float, Estimate]:  # fmt: skip
        """Seed estimate of metric ``name`` at each scale of a model's controlled samples."""
        out: dict[float, list[float]] = {}
        for r in self.downstream_records:
            if (r["arch"], r["variant"], r["applied"], r["control"]) == (arch, variant, applied, control):
                out.setdefault(r["scale"], []).append(self.value(r, name))
        return {s: estimate(v) for s, v in sorted(out.items()) if estimate(v).n}

    def per_steps_by_seed(self, arch: str, variant: str, scale: float,
                          name: str = "fid") -> dict[int, dict[int, float]]:  # fmt: skip
        """``{steps: {seed: value}}`` of metric ``name`` over the step sweep (for paired
        comparisons)."""
        out: dict[int, dict[int, float]] = {}
        for r in self.step_records:
            v = self.value(r, name)
            if r["arch"] == arch and r["variant"] == variant and r["scale"] == scale and v == v:
                out.setdefault(r["steps"], {})[int(r["seed"])] = v
        return out

    def reference_accuracy(self, arch: str) -> tuple[float, float] | None:
        """The classifier's accuracy on the real reference images, (through the samples'
        resolution pipeline, as they are), from ``arch``'s evaluated records; None if absent."""
        for r in self.records:
            if r["arch"] == arch:
                a, b = self.value(r, "real_accuracy"), self.value(r, "real_accuracy_native")
                if a == a:  # not NaN
                    return a, (b if b == b else a)
        return None

    def best_scale(self, arch: str, variant: str, name: str = "fid") -> float | None:
        """Scale with the best seed-mean of ``name`` (chosen on means: no seed picking)."""
        ps = self.per_scale(arch, variant, name)
        if not ps:
            return None
        lower = METRICS[name][2]
        return (min if lower else max)(ps, key=lambda s: ps[s].mean)


def collect(spec: StudySpec, study_dir: Path) -> StudyResults:
    """Read every finished evaluate / train / walk / theory cell of the study."""
    study_dir = Path(study_dir)
    cells = build_cells(spec)
    res = StudyResults(spec, study_dir, cells=cells)
    shifts: dict[tuple[str, str], list[float]] = {}
    for c in cells:
        d = c.dir(study_dir)
        if not is_done(d):
            res.missing.append(c.id)
            continue
        m = c.meta
        if c.stage == "evaluate":
            raw = read_json(d / "metrics.json")
            if "schema" in raw:  # condnoise.metrics/1: {"metrics": {metric: {extractor: v}}}
                raw = raw["metrics"]
            rec = {"arch": m["arch"], "variant": m["variant"], "seed": m["seed"],
                   "scale": float(m["scale"]), "metrics": flatten(raw)}  # fmt: skip
            if "steps" in m:  # the step sweep (few-step students and their teachers)
                res.step_records.append({**rec, "steps": int(m["steps"]), "sampler": m["sampler"]})
                continue
            if "control" in m:  # adapters and their bases' references (downstream.py)
                res.downstream_records.append({**rec, "control": m["control"], "applied": bool(m["applied"])})
                continue
            res.records.append(rec)
            res.eval_dirs[(m["arch"], m["variant"], m["seed"], float(m["scale"]))] = d
        elif c.stage == "train" and (d / "shift.json").is_file():
            s = read_json(d / "shift.json").get("mean_l2_shift", float("nan"))
            shifts.setdefault((m["arch"], m["variant"]), []).append(float(s))
        elif c.stage == "walk":
            res.images[(m["arch"], m["variant"])] = {
                k: d / f"{k}.png" for k in ("grid", "walk") if (d / f"{k}.png").is_file()
            }
        elif c.stage == "theory":
            res.theory = sorted(d.rglob("*.png"))
    res.shifts = {k: estimate(v) for k, v in shifts.items()}
    return res


def load_rmd_scores(eval_dir: Path, extractor: str) -> np.ndarray | None:
    """Per-sample RMD scores of ``extractor`` saved by the evaluate cell, if any."""
    path = eval_dir / "per_sample.npz"
    if not path.is_file():
        return None
    data = read_npz(path)
    key = f"rmd@{extractor}"
    return np.asarray(data[key], dtype=np.float64) if key in data else None
