"""The study report: one self-contained HTML page, Markdown and CSV.

Written to ``STUDY_DIR/report/``: ``report.html`` (figures embedded as base64 PNG),
``report.md`` (figures beside it in ``figures/``), ``results.csv`` (every seed and scale,
every metric; ``results_steps.csv`` the same for the step sweep of few-step students and
their teachers, ``results_downstream.csv`` for the adapters and their bases sampled with
controls), ``summary.csv`` (mean, 95% CI half-width and n per model and scale),
``report.json`` (each section's status). A section whose inputs the preset does not
produce says so (``not in this preset's grid`` / ``not applicable``); a section whose
cells are not finished yet is marked ``incomplete``.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from condnoise import stats
from condnoise.io import write_json, write_text
from condnoise.study import accuracy, downstream, fewstep, figures
from condnoise.study.aggregate import Estimate, Verdict, compare, estimate
from condnoise.study.blocks import (
    HtmlRenderer,
    MarkdownRenderer,
    Section,
    Status,
    Table,
    render_document,
)
from condnoise.study.grid import trainer_sections
from condnoise.study.results import CEP_NAMES, METRICS, StudyResults, collect, load_rmd_scores
from condnoise.study.spec import StudySpec, Variant

SLIGHT_ETA = 0.075  # paper: "slight" corruption is eta <= 7.5%
VERDICT_WORDS = {Verdict.BETTER: "helped", Verdict.WORSE: "hurt",
                 Verdict.INDISTINGUISHABLE: "was indistinguishable",
                 Verdict.NO_INTERVAL: "could not be judged (one seed: no CI)"}  # fmt: skip


def _absent(sid: str, title: str, status: Status, note: str) -> Section:
    return Section(sid, title, status=status, note=note)


def _label(res: StudyResults, arch: str, variant: str) -> str:
    return variant if len(res.spec.architectures) == 1 else f"{arch}/{variant}"


def _incomplete(res: StudyResults, sec: Section, stage: str = "evaluate") -> Section:
    todo = [m for m in res.missing if m.startswith(stage + "/")]
    if todo and sec.status == Status.POPULATED:
        sec.note = (f"{len(todo)} {stage} cell(s) not finished yet; the numbers below cover "
                    "the finished ones")  # fmt: skip
    return sec


# --------------------------------------------------------------------------- verdict


def _best(res: StudyResults, arch: str, variant: str, name: str = "fid") -> tuple[float, Estimate]:
    s = res.best_scale(arch, variant, "fid")
    if s is None:
        return math.nan, estimate([])
    return s, res.per_scale(arch, variant, name).get(s, estimate([]))


def _group(v: Variant) -> str:
    if v.corruption:
        return "slight corruption" if v.eta <= SLIGHT_ETA else "heavier corruption"
    if v.perturbation["name"] in CEP_NAMES:
        return "CEP"
    return "other baselines"


VERDICT_COLUMNS = ["arch", "variant", "group", "best s", "FID", "clean best s", "clean FID",
                   "diff (95% CI)", "verdict", "per guidance scale", "accuracy",
                   "clean accuracy", "accuracy diff (95% CI)", "accuracy verdict"]  # fmt: skip


def verdict_section(res: StudyResults) -> Section:
    sec = Section("verdict", "Verdict: did slight corruption / CEP help at this scale?")
    if not res.has("fid"):
        return _absent(sec.id, sec.title, Status.INCOMPLETE, "no FID values yet")
    tally: dict[str, dict[str, int]] = {}
    rows = [_verdict_row(res, arch, v, tally) for arch in res.spec.architectures
            if res.per_scale(arch, "clean", "fid") for v in res.spec.variants
            if v.name != "clean" and res.per_scale(arch, v.name, "fid")]  # fmt: skip
    if not rows:
        return _absent(sec.id, sec.title, Status.NOT_IN_GRID,
                       "needs a clean model and at least one other variant")  # fmt: skip
    for line in _verdict_text(res, tally):
        sec.text(line)
    sec.table(VERDICT_COLUMNS, rows)
    return _incomplete(res, sec)


def _verdict_row(res: StudyResults, arch: str, v: Variant, tally: dict[str, dict[str, int]]
                 ) -> list[str]:  # fmt: skip
    """One variant vs the clean model, each at its best guidance scale (FID, Welch 95%)."""
    s0, clean = _best(res, arch, "clean")
    s1, est = _best(res, arch, v.name)
    d = compare(est, clean, lower_is_better=True)
    word = VERDICT_WORDS[d.verdict]
    t = tally.setdefault(_group(v), {"helped": 0, "hurt": 0, "indistinguishable": 0})
    t[word if word in t else "indistinguishable"] += 1
    clean_scales = res.per_scale(arch, "clean", "fid")
    per_scale = [compare(e, clean_scales[s], lower_is_better=True).verdict
                 for s, e in res.per_scale(arch, v.name, "fid").items() if s in clean_scales]
    better, worse = per_scale.count(Verdict.BETTER), per_scale.count(Verdict.WORSE)
    return [arch, v.name, _group(v), f"{s1:g}", est.fmt(), f"{s0:g}", clean.fmt(),
            d.fmt(), word,
            f"{better} better / {worse} worse / {len(per_scale) - better - worse} indistinguishable",
            *accuracy.accuracy_difference(res, arch, v.name, s1, s0)]


def _verdict_text(res: StudyResults, tally: dict[str, dict[str, int]]) -> list[str]:
    """The scale of the study, how the comparison is made, and the tally per group."""
    spec, n_seeds = res.spec, len(res.spec.seeds)
    tr = trainer_sections(spec, spec.variants[0], next(iter(spec.architectures))).get("train", {})
    lines = [
        f"Scale of this study: {tr.get('steps', '?')} training steps x batch "
        f"{tr.get('batch_size', '?')} per model, {spec.sample['num_samples']} samples per "
        f"guidance scale, {n_seeds} seed(s); conclusions hold at this scale only.",
        f"FID of each model at its best guidance scale (chosen on the mean over the "
        f"{n_seeds} seed(s), never per seed), compared with the clean model at its own best "
        "scale by a Welch 95% interval on the difference of seed means (negative = lower "
        "FID than clean). 'helped' / 'hurt' only when the whole interval lies on one side "
        "of zero; otherwise the difference is indistinguishable from seed noise at this scale.",
    ]
    for g, t in tally.items():
        lines.append(f"**{g}**: helped in {t['helped']}, hurt in {t['hurt']}, "
                     f"indistinguishable in {t['indistinguishable']} of {sum(t.values())} "
                     "comparison(s).")  # fmt: skip
    if tally and not any(t["helped"] or t["hurt"] for t in tally.values()):
        lines.append("**Not resolved at this scale**: no FID difference from the clean model "
                     f"is larger than the seed noise of {n_seeds} seed(s); more seeds or "
                     "samples would be needed to tell whether the effect exists here.")  # fmt: skip
    if res.has("accuracy"):
        lines.append("Condition accuracy (last columns) is compared at the same guidance scales, "
                     "higher is better, with the same Welch 95% rule.")  # fmt: skip
    return lines


# --------------------------------------------------------------------------- figures


def _series(res: StudyResults, models: list[tuple[str, str]], name: str) -> figures.Series:
    out = {}
    for arch, v in models:
        ps = res.per_scale(arch, v, name)
        if ps:
            out[_label(res, arch, v)] = list(ps.items())
    return out


def fid_vs_guidance_eta(res: StudyResults) -> Section:
    sec = Section("fid-guidance-eta", "FID vs guidance per corruption ratio (paper Fig. 2)")
    kinds = sorted({v.kind for v in res.spec.variants if v.corruption})
    if not kinds:
        return _absent(sec.id, sec.title, Status.NOT_IN_GRID, "no data-corruption variants in this preset's grid")
    for arch in res.spec.architectures:
        for kind in kinds:
            vs = ["clean"] + [v.name for v in sorted(res.spec.variants, key=lambda v: v.eta)
                              if v.kind == kind]  # fmt: skip
            series = _series(res, [(arch, v) for v in vs], "fid")
            if series:
                sec.figure(figures.metric_vs_guidance(series, "FID", f"{arch}: {kind} corruption"),
                           f"{arch}, {kind} label corruption: FID (lower is better) vs guidance, "
                           "mean ± 95% CI over seeds")  # fmt: skip
    return _fill(res, sec)


def _pert_variants(res: StudyResults) -> list[str]:
    return [v.name for v in res.spec.variants if not v.corruption and v.name != "clean"]


def fid_vs_guidance_pert(res: StudyResults) -> Section:
    sec = Section("fid-guidance-perturbation", "FID vs guidance per training perturbation (paper Fig. 6)")
    names = _pert_variants(res)
    if not names:
        return _absent(sec.id, sec.title, Status.NOT_IN_GRID, "no training-perturbation variants in this preset's grid")
    for arch in res.spec.architectures:
        series = _series(res, [(arch, v) for v in ["clean", *names]], "fid")
        if series:
            sec.figure(figures.metric_vs_guidance(series, "FID", f"{arch}: perturbations"),
                       f"{arch}: FID vs guidance for each perturbation, mean ± 95% CI")  # fmt: skip
    return _fill(res, sec)


def _fill(res: StudyResults, sec: Section) -> Section:
    if not sec.blocks:
        sec.status, sec.note = Status.INCOMPLETE, "no evaluated cells yet"
    return _incomplete(res, sec)


def trade_off_section(res: StudyResults, sid: str, title: str, x: str, y: str) -> Section:
    sec = Section(sid, title)
    for m in (x, y):
        if not res.has(m):
            return _absent(sid, title, Status.NOT_APPLICABLE if res.records else Status.INCOMPLETE,
                           f"the evaluation gave no {METRICS[m][1]} for this preset's extractors "
                           f"({', '.join(res.extractors)})")  # fmt: skip
    for arch in res.spec.architectures:
        curves = {}
        for a, v in res.models():
            if a != arch:
                continue
            px, py = res.per_scale(a, v, x), res.per_scale(a, v, y)
            curves[_label(res, a, v)] = [(s, px[s], py[s]) for s in px if s in py]
        if curves:
            sec.figure(figures.trade_off(curves, METRICS[x][1], METRICS[y][1], f"{arch}"),
                       f"{arch}: {METRICS[y][1]} vs {METRICS[x][1]} over the guidance sweep "
                       "(numbers: guidance scale), mean ± 95% CI")  # fmt: skip
    return _fill(res, sec)


def metric_section(res: StudyResults, sid: str, title: str, names: list[str], why: str) -> Section:
    sec = Section(sid, title)
    present = [n for n in names if res.has(n)]
    if not present:
        return _absent(sid, title, Status.NOT_APPLICABLE if res.records else Status.INCOMPLETE, why)
    for arch in res.spec.architectures:
        for n in present:
            series = _series(res, [(a, v) for a, v in res.models() if a == arch], n)
            if series:
                better = "lower" if METRICS[n][2] else "higher"
                sec.figure(figures.metric_vs_guidance(series, METRICS[n][1], f"{arch}: {METRICS[n][1]}"),
                           f"{arch}: {METRICS[n][1]} ({better} is better) vs guidance, "
                           "mean ± 95% CI")  # fmt: skip
    return _fill(res, sec)


def rmd_section(res: StudyResults) -> Section:
    sec = Section("rmd", "Top-1% RMD densities (paper Fig. 5)")
    for arch in res.spec.architectures:
        scores = {}
        for a, v in res.models():
            if a != arch:
                continue
            s = res.best_scale(a, v, "fid")
            per_seed = [load_rmd_scores(d, res.extractors[0]) for (a2, v2, _, s2), d in res.eval_dirs.items()
                        if a2 == a and v2 == v and s2 == s]  # fmt: skip
            per_seed = [p for p in per_seed if p is not None and len(p)]
            if per_seed:
                import numpy as np

                top = [stats.top_fraction(p, 0.01) for p in per_seed]
                scores[f"{_label(res, a, v)} (s={s:g})"] = np.concatenate(top)
        if scores:
            sec.figure(figures.densities(scores, "RMD score of the top 1% samples", arch),
                       f"{arch}: densities of the top-1% RMD scores (higher = more complex / "
                       "diverse samples), each model at its best guidance, all seeds pooled")  # fmt: skip
    if not sec.blocks and res.has("rmd_top1"):
        sec.text("Per-sample RMD scores were not saved by the evaluation; the seed means of "
                 "the top-1% RMD are plotted against guidance instead.")  # fmt: skip
        return metric_section(res, sec.id, sec.title, ["rmd_top1"], "")
    if not sec.blocks:
        return _absent(sec.id, sec.title, Status.NOT_APPLICABLE if res.records else Status.INCOMPLETE,
                       "the evaluation gave no RMD scores for this preset's extractors")  # fmt: skip
    return _incomplete(res, sec)


# --------------------------------------------------------------------------- tables


def _table_rows(res: StudyResults, models: list[tuple[str, str]], cols: list[str]) -> list[list[str]]:
    rows = []
    for arch, v in models:
        s, _ = _best(res, arch, v)
        if math.isnan(s):
            continue
        row = [arch, v, f"{s:g}"]
        for c in cols:
            e = res.per_scale(arch, v, c).get(s)
            row.append(e.fmt() if e else "n/a")
        rows.append(row)
    return rows


def _table_section(res: StudyResults, sid: str, title: str, names: list[str], note: str,
                   absent: str) -> Section:  # fmt: skip
    sec = Section(sid, title)
    models = [(a, v) for a in res.spec.architectures for v in names if (a, v) in res.models()]
    if not names:
        return _absent(sid, title, Status.NOT_IN_GRID, absent)
    cols = [c for c in ("fid", "is", "precision", "recall", "accuracy") if res.has(c)]
    rows = _table_rows(res, models, cols)
    if not rows:
        return _absent(sid, title, Status.INCOMPLETE, "no evaluated cells yet")
    for arch in dict.fromkeys(r[0] for r in rows):
        rows += accuracy.reference_rows(res, arch, cols, lead=3)
    sec.text(note)
    sec.table(["arch", "model", "best s"] + [METRICS[c][1] for c in cols], rows)
    return _incomplete(res, sec)


BEST_NOTE = ("Each model at its best guidance scale by mean FID over seeds; every cell is "
             "mean ± 95% t-interval half-width over seeds (± n/a (n=1) with a single seed).")  # fmt: skip


def table1(res: StudyResults) -> Section:
    return _table_section(res, "table1", "Table 1: best guidance per model (FID / IS / P / R)",
                          [v.name for v in res.spec.variants], BEST_NOTE, "no variants")  # fmt: skip


def table6(res: StudyResults) -> Section:
    names = [v.name for v in res.spec.variants
             if v.perturbation["name"] in ("dropout", "label-smoothing")]  # fmt: skip
    if names:
        names = ["clean"] + [v.name for v in res.spec.variants
                             if v.perturbation["name"] in CEP_NAMES] + names  # fmt: skip
    return _table_section(res, "table6", "Table 6: CEP vs dropout vs label smoothing", names,
                          BEST_NOTE, "Table 6: not in this preset's grid (needs dropout or "
                          "label-smoothing variants)")  # fmt: skip


def table7(res: StudyResults) -> Section:
    vs = res.spec.variants
    extra = [v.name for v in vs if v.perturbation["name"] in ("cep-fixed", "random-flip")]
    names = []
    if extra:
        names = (["clean"] + [v.name for v in vs if v.perturbation["name"] in CEP_NAMES]
                 + extra + [v.name for v in vs if v.kind == "symmetric"])  # fmt: skip
    return _table_section(res, "table7", "Table 7: CEP vs fixed CEP vs fixed / random data corruption",
                          names, BEST_NOTE, "Table 7: not in this preset's grid (needs cep-fixed "
                          "or random-flip variants)")  # fmt: skip


def ablation_section(res: StudyResults) -> Section:
    sec = Section("ablation", "CEP ablation: FID vs mean embedding L2 shift (paper Fig. 8a)")
    points = []
    for arch in res.spec.architectures:
        for v in res.spec.variants:
            shift = res.shifts.get((arch, v.name))
            s, fid = _best(res, arch, v.name)
            if shift is None or not fid.n:
                continue
            group = ("clean" if v.name == "clean" else "CEP" if v.perturbation["name"] in CEP_NAMES
                     else "fixed data corruption" if v.corruption else "other")  # fmt: skip
            label = _label(res, arch, v.name)
            points.append((arch, label, group, shift, fid))
    has_cep = any(p[2] == "CEP" for p in points)
    if not any(v.perturbation["name"] in CEP_NAMES for v in res.spec.variants):
        return _absent(sec.id, sec.title, Status.NOT_IN_GRID, "no CEP variants in this preset's grid")
    if not has_cep:
        return _absent(sec.id, sec.title, Status.INCOMPLETE, "CEP models not trained / evaluated yet")
    for arch in res.spec.architectures:
        pts = [(p[1], p[2], p[3], p[4]) for p in points if p[0] == arch]
        if pts:
            sec.figure(figures.ablation(pts, arch),
                       f"{arch}: FID at each model's best guidance vs the mean L2 distance between "
                       "the embedding used in training and the clean one; CEP points beside fixed "
                       "corruption points, mean ± 95% CI")  # fmt: skip
    sec.table(["arch", "model", "group", "mean L2 shift", "FID (best s)"],
              [[p[0], p[1], p[2], p[3].fmt(), p[4].fmt()] for p in points])  # fmt: skip
    return _incomplete(res, sec, "train")


def samples_section(res: StudyResults) -> Section:
    sec = Section("samples", "Sample grids and circular walks per model")
    if not res.spec.report.get("walks"):
        return _absent(sec.id, sec.title, Status.NOT_IN_GRID, "walks disabled in this preset (report.walks)")
    for (arch, v), imgs in res.images.items():
        label = _label(res, arch, v)
        if "grid" in imgs:
            sec.image(imgs["grid"], f"{label}: one row per class")
        if "walk" in imgs:
            sec.image(imgs["walk"], f"{label}: circular walks in noise space "
                      "(one row per class, the last frame meets the first)")  # fmt: skip
    if not sec.blocks:
        return _absent(sec.id, sec.title, Status.INCOMPLETE, "walk cells not finished yet")
    return _incomplete(res, sec, "walk")


def theory_section(res: StudyResults) -> Section:
    sec = Section("theory", "Theory lab: Gaussian mixture (paper section 7)")
    if not res.spec.report.get("theory"):
        return _absent(sec.id, sec.title, Status.NOT_IN_GRID, "theory disabled in this preset (report.theory)")
    for p in res.theory:
        sec.image(p, p.stem.replace("_", " "))
    if not sec.blocks:
        return _absent(sec.id, sec.title, Status.INCOMPLETE, "theory cell not finished yet")
    return sec


def build_sections(res: StudyResults) -> list[Section]:
    latent = any((a.get("autoencoder") or {}).get("kind") == "vq"
                 for a in res.spec.architectures.values())  # fmt: skip
    builders: list[Callable[[], Section]] = [
        lambda: verdict_section(res),
        lambda: table1(res),
        lambda: fid_vs_guidance_eta(res),
        lambda: fid_vs_guidance_pert(res),
        lambda: fewstep.steps_section(res),
        lambda: downstream.downstream_section(res),
        lambda: trade_off_section(res, "fid-is", "FID vs IS-style score (paper Fig. 3)", "is", "fid"),
        lambda: trade_off_section(res, "precision-recall", "Precision vs recall (paper Fig. 3)",
                                  "recall", "precision"),
        lambda: rmd_section(res),
        lambda: accuracy.accuracy_table(res, metric_section(
            res, "accuracy", "Condition accuracy vs guidance", ["accuracy"],
            "no classifier extractor in this preset (condition accuracy needs e.g. "
            "fmnist-classifier)")),
        lambda: metric_section(res, "memorization", "Memorization: top-5 L2 and memorization "
                               "ratio vs guidance", ["top5_l2", "memorization"],
                               "the evaluation gave no nearest-neighbour metrics"),
        lambda: (metric_section(res, "entropy", "Sample entropy vs guidance", ["entropy"],
                                "no entropy values (VQ latents) in the evaluation") if latent
                 else _absent("entropy", "Sample entropy vs guidance", Status.NOT_APPLICABLE,
                              "pixel-space models: sample entropy needs VQ latents (paper "
                              "section 5), none in this preset")),
        lambda: table6(res),
        lambda: table7(res),
        lambda: ablation_section(res),
        lambda: samples_section(res),
        lambda: theory_section(res),
    ]  # fmt: skip
    sections = [b() for b in builders]
    from condnoise.study.text import is_text_study

    if is_text_study(res.spec):  # FID vs CLIP score, caption accuracy, prompted grids
        from condnoise.study.text_report import text_sections

        sections = text_sections(res, sections)
    return sections


# --------------------------------------------------------------------------- files


def _csv_text(headers: list[str], rows: list[list[Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(headers)
    w.writerows(rows)
    return buf.getvalue()


def write_csvs(res: StudyResults, out: Path) -> None:
    keys = sorted({k for r in res.records for k in r["metrics"]})
    rows = [[r["arch"], r["variant"], r["seed"], r["scale"]] + [r["metrics"].get(k, "") for k in keys]
            for r in sorted(res.records, key=lambda r: (r["arch"], r["variant"], r["scale"], r["seed"]))]  # fmt: skip
    write_text(out / "results.csv", _csv_text(["arch", "variant", "seed", "guidance"] + keys, rows))
    srows = []
    for arch, v in res.models():
        scales = sorted({r["scale"] for r in res.records if r["arch"] == arch and r["variant"] == v})
        for s in scales:
            recs = [r for r in res.records if r["arch"] == arch and r["variant"] == v and r["scale"] == s]
            for k in keys:
                e = estimate(r["metrics"].get(k, math.nan) for r in recs)
                if e.n:
                    srows.append([arch, v, s, k, e.mean, "" if math.isnan(e.ci) else e.ci, e.n])
    write_text(out / "summary.csv",
               _csv_text(["arch", "variant", "guidance", "metric", "mean", "ci95", "n"], srows))  # fmt: skip
    if res.step_records:  # the step sweep: every seed, step count and scale
        keys = sorted({k for r in res.step_records for k in r["metrics"]})
        rows = [[r["arch"], r["variant"], r["sampler"], r["steps"], r["seed"], r["scale"]]
                + [r["metrics"].get(k, "") for k in keys]
                for r in sorted(res.step_records, key=lambda r: (r["arch"], r["variant"], r["steps"],
                                                                 r["scale"], r["seed"]))]  # fmt: skip
        write_text(out / "results_steps.csv",
                   _csv_text(["arch", "variant", "sampler", "steps", "seed", "guidance"] + keys, rows))
    if res.downstream_records:  # adapters and their bases' without-control references
        keys = sorted({k for r in res.downstream_records for k in r["metrics"]})
        rows = [[r["arch"], r["variant"], r["control"], r["applied"], r["seed"], r["scale"]]
                + [r["metrics"].get(k, "") for k in keys]
                for r in sorted(res.downstream_records, key=lambda r: (r["arch"], r["variant"], r["control"],
                                                                       r["applied"], r["scale"], r["seed"]))]  # fmt: skip
        write_text(out / "results_downstream.csv",
                   _csv_text(["arch", "variant", "control", "control_applied", "seed", "guidance"] + keys, rows))


def write_report(spec: StudySpec, study_dir: Path, *, log_fn: Callable[[str], None] = print) -> Path:
    """Collect the study's finished cells and write the report; returns ``report.html``."""
    from condnoise import __version__

    res = collect(spec, Path(study_dir))
    out = Path(study_dir) / "report"
    sections = build_sections(res)
    done = len(res.cells) - len(res.missing)
    header = {
        "study": f"{spec.name} ({spec.source})",
        "grid": f"{len(spec.variants)} variant(s) x {len(spec.architectures)} architecture(s) "
                f"x seeds {spec.seeds}; guidance {spec.sample['guidance']}; "
                f"{spec.sample['num_samples']} samples per scale ({spec.sample['sampler']}, "
                f"{spec.sample['steps']} steps); extractors {', '.join(res.extractors)}",
        "cells": f"{done} of {len(res.cells)} finished",
        "statistics": "mean ± 95% t-interval half-width over seeds; all seeds and scales in "
                      "results.csv",
        "condnoise": __version__,
    }  # fmt: skip
    title = f"condnoise study: {spec.name}"
    for name, renderer in (("report.html", HtmlRenderer()),
                           ("report.md", MarkdownRenderer(out / "figures"))):  # fmt: skip
        write_text(out / name, render_document(title, spec.description, header, sections, renderer))
    write_csvs(res, out)
    for s in sections:
        tables = [b for b in s.blocks if isinstance(b, Table)]
        if tables:
            write_text(out / f"{s.id}.csv", _csv_text(tables[0].headers, tables[0].rows))
    write_json(out / "report.json", {
        "study": spec.name, "cells_done": done, "cells_total": len(res.cells),
        "sections": [{"id": s.id, "title": s.title, "status": s.status, "note": s.note,
                      "blocks": len(s.blocks)} for s in sections],
    })  # fmt: skip
    log_fn(f"report written to {out / 'report.html'}")
    return out / "report.html"
