"""The text-model sections of the study report (paper Sec. 5-6, LDM-4 on CC3M).

- ``text-fid-clip``: FID against CLIP score over the guidance sweep, one curve per
  variant (the paper's text-model figure: guidance raises CLIP score and, past a point,
  FID).
- ``caption-accuracy``: the scenes-recognizer's all-attributes caption accuracy against
  guidance, per-attribute values at each model's best-FID scale, and its ceiling (its
  own accuracy on real renders).
- ``swap-vs-rewrite``: the two caption corruptions at equal eta, each against the other
  (Welch 95% on seed means).
- ``text-table1``: Table 1's text rows: each model at its best guidance by FID.
- ``samples``: sample grids with their prompts (one row per caption, printed above it).

:func:`text_sections` puts them into the generic section list of :mod:`report`.
"""

from __future__ import annotations

from condnoise.study.aggregate import compare
from condnoise.study.blocks import Section, Status
from condnoise.study.results import METRICS, StudyResults

ATTRIBUTES = ("class", "colour", "size", "position", "background", "count")
TABLE_METRICS = ("fid", "clip_score", "r_precision", "caption_all", "precision", "recall")
TRADE_OFF_TITLE = "FID vs CLIP score over the guidance sweep (paper: LDM-4 on CC3M)"
WORDS = {"better": "rewrite better", "worse": "rewrite worse",
         "indistinguishable": "indistinguishable"}  # fmt: skip


def text_sections(res: StudyResults, sections: list[Section]) -> list[Section]:
    """``sections`` (the generic report) with the text sections after Table 1 and the
    per-class sample section replaced by the prompted grids."""
    from condnoise.study.report import trade_off_section

    text = [
        text_table1(res),
        trade_off_section(res, "text-fid-clip", TRADE_OFF_TITLE, "clip_score", "fid"),
        caption_accuracy_section(res),
        swap_vs_rewrite(res),
    ]
    out: list[Section] = []
    for s in sections:
        out.append(samples_section(res) if s.id == "samples" else s)
        if s.id == "table1":
            out += text
    return out


def _at_best_fid(res: StudyResults, arch: str, variant: str, names: tuple[str, ...]
                 ) -> tuple[float | None, list[str]]:  # fmt: skip
    s = res.best_scale(arch, variant, "fid")
    cells = []
    for n in names:
        e = res.per_scale(arch, variant, n).get(s) if s is not None else None
        cells.append(e.fmt() if e else "n/a")
    return s, cells


def text_table1(res: StudyResults) -> Section:
    title = "Table 1, text rows: best guidance per model (FID / CLIP score / R-precision / caption accuracy / P / R)"
    cols = [c for c in TABLE_METRICS if res.has(c)]
    if not cols:
        return Section("text-table1", title, status=Status.INCOMPLETE, note="no evaluated cells yet")
    rows = []
    for arch, v in res.models():
        s, cells = _at_best_fid(res, arch, v, tuple(cols))
        if s is not None:
            rows.append([arch, v, f"{s:g}", *cells])
    sec = Section("text-table1", title)
    sec.text("Each model at its best guidance scale by mean FID over seeds (FID in the "
             f"feature space of {', '.join(res.extractors)}; CLIP score = mean of max(100 cos, 0) "
             "between image and prompt embeddings); mean ± 95% t-interval over seeds.")  # fmt: skip
    sec.table(["arch", "model", "best s"] + [METRICS[c][1] for c in cols], rows)
    return sec


def _ceiling(res: StudyResults) -> dict[str, float] | None:
    """The scenes-recognizer's all-attributes accuracy on real renders (from any evaluate
    cell's ``details``)."""
    from condnoise.io import read_json

    for d in res.eval_dirs.values():
        details = read_json(d / "metrics.json").get("details", {})
        ceiling = (details.get("caption_ceiling") or {}).get("scenes-recognizer")
        if ceiling:
            return {k: float(v) for k, v in ceiling.items()}
    return None


def caption_accuracy_section(res: StudyResults) -> Section:
    from condnoise.study import figures
    from condnoise.study.report import _series

    sid, title = "caption-accuracy", "Caption accuracy vs guidance (scenes-recognizer)"
    if not res.has("caption_all"):
        status = Status.NOT_APPLICABLE if res.records else Status.INCOMPLETE
        return Section(sid, title, status=status,
                       note="the evaluation gave no caption accuracy (metric caption-accuracy, "
                            "scenes prompts only)")  # fmt: skip
    sec = Section(sid, title)
    ceiling = _ceiling(res)
    sec.text("Caption accuracy: share of samples whose every attribute (item classes, colours, "
             "sizes, positions, background, count) the scenes-recognizer reads back as their "
             "prompt says; chance is near 0." + (
                 " Ceiling (the recognizer on real renders): "
                 + ", ".join(f"{k} {v:.3f}" for k, v in ceiling.items()) + "." if ceiling else ""))
    for arch in res.spec.architectures:
        series = _series(res, [(a, v) for a, v in res.models() if a == arch], "caption_all")
        if series:
            sec.figure(figures.metric_vs_guidance(series, "caption accuracy (all attributes)",
                                                  f"{arch}: caption accuracy"),
                       f"{arch}: all-attributes caption accuracy (higher is better) vs guidance, "
                       "mean ± 95% CI")  # fmt: skip
    names = tuple(f"caption_{a}" for a in ("all", *ATTRIBUTES, "all_seen", "all_novel"))
    cols = [n for n in names if res.has(n)]
    rows = []
    for arch, v in res.models():
        s, cells = _at_best_fid(res, arch, v, tuple(cols))
        if s is not None:
            rows.append([arch, v, f"{s:g}", *cells])
    sec.table(["arch", "model", "best-FID s"] + [n.removeprefix("caption_") for n in cols], rows)
    return sec


def swap_vs_rewrite(res: StudyResults) -> Section:
    sid, title = "swap-vs-rewrite", "Caption swap vs caption rewrite at equal corruption ratio"
    pairs = {}
    for v in res.spec.variants:
        if v.kind in ("swap", "rewrite"):
            pairs.setdefault(v.eta, {})[v.kind] = v.name
    pairs = {eta: p for eta, p in sorted(pairs.items()) if len(p) == 2}
    if not pairs:
        return Section(sid, title, status=Status.NOT_IN_GRID,
                       note="needs a swap and a rewrite variant at the same eta")  # fmt: skip
    cols = [c for c in ("fid", "clip_score", "caption_all") if res.has(c)]
    rows = []
    for arch in res.spec.architectures:
        for eta, p in pairs.items():
            for c in cols:
                rows.append(_pair_row(res, arch, eta, p["swap"], p["rewrite"], c))
    rows = [r for r in rows if r]
    if not rows:
        return Section(sid, title, status=Status.INCOMPLETE, note="no evaluated cells yet")
    sec = Section(sid, title)
    sec.text("Each model at its own best guidance scale by mean FID; diff = rewrite - swap "
             "with a Welch 95% interval over seeds. Swap gives a sample another sample's "
             "caption (unrelated text); rewrite edits a few attributes of its own caption "
             "(related text), so the two corrupt the condition by different amounts at the same eta.")  # fmt: skip
    sec.table(["arch", "eta", "metric", "swap", "rewrite", "diff (95% CI)", "verdict"], rows)
    return sec


def _pair_row(res: StudyResults, arch: str, eta: float, swap: str, rewrite: str, metric: str
              ) -> list[str] | None:  # fmt: skip
    ests = []
    for v in (swap, rewrite):
        s = res.best_scale(arch, v, "fid")
        e = res.per_scale(arch, v, metric).get(s) if s is not None else None
        if e is None:
            return None
        ests.append(e)
    d = compare(ests[1], ests[0], lower_is_better=METRICS[metric][2])
    return [arch, f"{eta * 100:g}%", METRICS[metric][1], ests[0].fmt(), ests[1].fmt(),
            d.fmt(), WORDS.get(d.verdict.value, "no CI (one seed)")]


def samples_section(res: StudyResults) -> Section:
    sid, title = "samples", "Sample grids with their prompts"
    if not res.spec.report.get("walks"):
        return Section(sid, title, status=Status.NOT_IN_GRID,
                       note="grids disabled in this preset (report.walks)")  # fmt: skip
    sec = Section(sid, title)
    from condnoise.study.grid import _walk_scale

    s = _walk_scale(res.spec)
    for (arch, v), imgs in res.images.items():
        if "grid" in imgs:
            label = v if len(res.spec.architectures) == 1 else f"{arch}/{v}"
            sec.image(imgs["grid"], f"{label}: one row per {res.spec.sample.get('captions_from')} "
                      f"caption (printed above its row), guidance s = {s:g}, first seed")  # fmt: skip
    if not sec.blocks:
        return Section(sid, title, status=Status.INCOMPLETE, note="grid cells not finished yet")
    return sec
