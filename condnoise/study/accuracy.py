"""Condition accuracy in the report: per-model table at the best scale, the real-data
reference rows, and the clean model's share of the real-data accuracy.

Condition accuracy is the small-scale fidelity measure of this project (paper Sec. 5
adapted to Fashion-MNIST): the share of samples the fmnist-classifier assigns to the
class they were generated for. Its ceiling is the same classifier on real test images;
for models below the classifier's resolution (16 x 16 samples, upsampled to 28) the fair
ceiling is the real images passed through the same resolution pipeline (down to the
model's size as its training data was made, back up as the samples are), reported beside
the plain 28 x 28 accuracy.
"""

from __future__ import annotations

import math

from condnoise.study.aggregate import compare
from condnoise.study.blocks import Section
from condnoise.study.results import StudyResults

NOTE = ("Condition accuracy: share of samples the fmnist-classifier assigns to the class "
        "they were generated for (mean ± 95% t-interval over seeds). 'real data' rows: the "
        "same classifier on the real test images, through the samples' resolution pipeline "
        "(the fair ceiling when the model is smaller than the classifier's 28 px) and as "
        "they are.")  # fmt: skip


def reference_labels(res: StudyResults, arch: str) -> list[tuple[str, float]]:
    """``[(row label, accuracy)]`` of the real-data reference for ``arch`` (one row when the
    samples need no resolution change, else two)."""
    ref = res.reference_accuracy(arch)
    if ref is None:
        return []
    pipeline, native = ref
    size = res.spec.data.get("image_size")
    if math.isclose(pipeline, native):
        return [("real data (test images)", native)]
    return [(f"real data (test images down to {size} px and back up)", pipeline),
            ("real data (test images as they are, 28 px)", native)]  # fmt: skip


def reference_rows(res: StudyResults, arch: str, cols: list[str], lead: int) -> list[list[str]]:
    """Rows for a best-scale table: ``lead`` leading cells (arch, label, '-'...), then '-' in
    every metric column but accuracy."""
    if "accuracy" not in cols:
        return []
    return [[arch, label] + ["-"] * (lead - 2) + [f"{v:.3f}" if c == "accuracy" else "-" for c in cols]
            for label, v in reference_labels(res, arch)]  # fmt: skip


def accuracy_table(res: StudyResults, sec: Section) -> Section:
    """Add the per-model best-accuracy table, the reference rows and the clean model's
    share of the real-data accuracy to the accuracy section."""
    if not res.has("accuracy"):
        return sec
    rows = []
    for arch in res.spec.architectures:
        for a, v in res.models():
            if a == arch:
                rows.append(_model_row(res, arch, v))
        rows += [[arch, label, "-", f"{value:.3f}", "-", "-", "-"]
                 for label, value in reference_labels(res, arch)]  # fmt: skip
    sec.text(NOTE)
    for line in _clean_lines(res):
        sec.text(line)
    sec.table(["arch", "model", "best s (accuracy)", "condition accuracy", "FID at that s",
               "best-FID s", "accuracy at best-FID s"], rows)  # fmt: skip
    return sec


def _model_row(res: StudyResults, arch: str, variant: str) -> list[str]:
    s = res.best_scale(arch, variant, "accuracy")
    sf = res.best_scale(arch, variant, "fid")
    acc, fid = res.per_scale(arch, variant, "accuracy"), res.per_scale(arch, variant, "fid")
    return [arch, variant, f"{s:g}", acc[s].fmt(), fid[s].fmt() if s in fid else "n/a",
            "n/a" if sf is None else f"{sf:g}", acc[sf].fmt() if sf in acc else "n/a"]


def _clean_lines(res: StudyResults) -> list[str]:
    """The clean model's best accuracy against the real-data references."""
    out = []
    for arch in res.spec.architectures:
        s = res.best_scale(arch, "clean", "accuracy")
        refs = reference_labels(res, arch)
        if s is None or not refs:
            continue
        e = res.per_scale(arch, "clean", "accuracy")[s]
        shares = "; ".join(f"{e.mean / v:.0%} of {label} ({v:.3f})" for label, v in refs)
        out.append(f"**{arch} clean model**: best condition accuracy {e.fmt()} at s = {s:g} "
                   f"({e.n} seed(s)) = {shares}.")  # fmt: skip
    return out


def accuracy_difference(res: StudyResults, arch: str, variant: str, s: float, s0: float
                        ) -> tuple[str, str, str, str]:  # fmt: skip
    """(accuracy, clean accuracy, difference with Welch 95% CI, verdict word) of ``variant``
    at scale ``s`` against the clean model at ``s0`` (higher is better)."""
    a = res.per_scale(arch, variant, "accuracy").get(s)
    b = res.per_scale(arch, "clean", "accuracy").get(s0)
    if a is None or b is None:
        return "n/a", "n/a", "n/a", "n/a"
    d = compare(a, b, lower_is_better=False)
    return a.fmt(), b.fmt(), d.fmt(".3f"), str(d.verdict.value)
