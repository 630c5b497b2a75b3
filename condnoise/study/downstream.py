"""The report's downstream section: ControlNet / T2I-Adapter fine-tuning of each base model.

Paper Sec. 5 (downstream personalization): adapters fine-tuned on base models pre-trained
with slight corruption or CEP follow their controls better and give lower FID than those
on the clean base. For every ``finetune`` variant (base x adapter x control x fine-tuning
perturbation) the table gives, at the adapter's best guidance scale by mean FID over seeds,
FID, condition accuracy and the control fidelity (edge F1 for Canny controls, mask IoU for
masks) as mean ± 95% t-interval over seeds; each base sampled with the same controls
recorded but not applied ("without control", the middle guidance scale) is the reference
row of the fidelity metric. Each adapter on a corrupted / CEP base is compared with the
same adapter on the clean base, and each CEP fine-tuning with its fine-tuning without CEP,
by the Welch 95% interval on the difference of seed means
(:func:`condnoise.study.aggregate.compare`).
"""

from __future__ import annotations

from condnoise.study.aggregate import Estimate, compare, estimate
from condnoise.study.blocks import Section, Status
from condnoise.study.derived import controlled
from condnoise.study.results import METRICS, StudyResults, metric_key
from condnoise.study.spec import Variant

SECTION_ID = "downstream"
TITLE = "Downstream: ControlNet / T2I-Adapter fine-tuning of each base model"
FIDELITY = {"canny": "edge_f1", "mask": "mask_iou"}  # control kind -> its fidelity metric


def _base_kind(v: Variant) -> str:
    """``clean``, the corruption (``symmetric 5%``) or the perturbation of a base."""
    if v.method != "train":
        return v.method
    if v.corruption:
        return f"{v.corruption['kind']} {100 * v.eta:g}%"
    return str(v.perturbation["name"]) if v.perturbation["name"] != "none" else "clean"


def _pert(v: Variant) -> str:
    return str(v.settings["perturbation"]["name"])


def _key(v: Variant) -> tuple[str, str, str]:
    return str(v.settings["adapter"]["kind"]), str(v.settings["control"]), _pert(v)


def _at(ps: dict[float, Estimate], s: float) -> Estimate:
    return ps.get(s, estimate([]))


def downstream_section(res: StudyResults) -> Section:
    sec = Section(SECTION_ID, TITLE)
    adapters = [v for v in res.spec.variants if controlled(v)]
    if not adapters:
        return Section(sec.id, sec.title, status=Status.NOT_IN_GRID,
                       note="no finetune (adapter) variants in this preset's grid")  # fmt: skip
    if not res.downstream_records:
        return Section(sec.id, sec.title, status=Status.INCOMPLETE, note="no evaluated adapter cells yet")
    cols = [c for c in ("accuracy",)
            if any(metric_key(r["metrics"], c, res.extractors) for r in res.downstream_records)]
    rows, best = [], {}
    for arch in res.spec.architectures:
        for v in adapters:
            if arch not in (v.architectures or res.spec.architectures):
                continue
            adapter, control, pert = _key(v)
            fid = res.per_scale_downstream(arch, v.name, "fid", applied=True, control=control)
            if not fid:
                continue
            s = min(fid, key=lambda k: fid[k].mean)  # on seed means: no seed picking
            fidelity = res.per_scale_downstream(arch, v.name, FIDELITY[control], applied=True, control=control)
            extra = [_at(res.per_scale_downstream(arch, v.name, c, applied=True, control=control), s) for c in cols]
            best[(arch, v.name)] = (fid[s], _at(fidelity, s))
            rows.append([arch, v.parent or "", _base_kind(res.variant(v.parent or "")), adapter, control, pert,
                         v.name, f"{s:g}", fid[s].fmt(), _at(fidelity, s).fmt(), *[e.fmt() for e in extra]])  # fmt: skip
        rows += _reference_rows(res, arch, adapters, cols)
    if not rows:
        return Section(sec.id, sec.title, status=Status.INCOMPLETE, note="no evaluated adapter cells yet")
    kinds = sorted({str(v.settings["control"]) for v in adapters})
    fidelity_label = " / ".join(f"{METRICS[FIDELITY[k]][1]} ({k})" for k in kinds)
    n = res.spec.sample["num_samples"]
    sec.text(f"Each adapter sampled with the controls and conditions of the first {n} "
             f"{res.spec.evaluate.get('reference_split', 'test')} images, at its best guidance scale "
             f"by mean FID; mean ± 95% t-interval over {len(res.spec.seeds)} seed(s). Control "
             f"fidelity: {fidelity_label} (higher is better). 'without control' rows: the base "
             "sampled with the same conditions, the controls recorded only (the fidelity a model "
             "reaches by chance).")  # fmt: skip
    sec.table(["arch", "base", "base model", "adapter", "control", "fine-tuning CEP", "model", "best s",
               "FID", "control fidelity", *[METRICS[c][1] for c in cols]], rows)  # fmt: skip
    versus = _versus(res, adapters, best)
    if versus:
        sec.text("Each adapter on a corrupted / CEP base against the same adapter on the clean base, and "
                 "each CEP fine-tuning against the same base's fine-tuning without CEP (Welch 95% "
                 "intervals on seed means; 'better' / 'worse' only when the whole interval lies on one "
                 "side of zero):")  # fmt: skip
        sec.table(["arch", "model", "against", "FID diff (95% CI)", "FID verdict", "fidelity diff (95% CI)",
                   "fidelity verdict"], versus)  # fmt: skip
    todo = [m for m in res.missing if m.startswith("evaluate/") and any(f"/{v.name}/" in m for v in adapters)]
    if todo:
        sec.note = f"{len(todo)} adapter evaluate cell(s) not finished yet; the numbers cover the finished ones"
    return sec


def _reference_rows(res: StudyResults, arch: str, adapters: list[Variant], cols: list[str]) -> list[list[str]]:
    """One 'without control' row per (base, control) of ``arch``'s adapters."""
    rows = []
    for base, control in dict.fromkeys((v.parent or "", str(v.settings["control"])) for v in adapters):
        fid = res.per_scale_downstream(arch, base, "fid", applied=False, control=control)
        for s, e in fid.items():
            fidelity = res.per_scale_downstream(arch, base, FIDELITY[control], applied=False, control=control)
            extra = [_at(res.per_scale_downstream(arch, base, c, applied=False, control=control), s) for c in cols]
            rows.append([arch, base, _base_kind(res.variant(base)), "without control", control, "-", base,
                         f"{s:g}", e.fmt(), _at(fidelity, s).fmt(), *[x.fmt() for x in extra]])  # fmt: skip
    return rows


def _clean(res: StudyResults, v: Variant) -> bool:
    b = res.variant(v.parent or "")
    return b.method == "train" and b.corruption is None and b.perturbation["name"] == "none"


def _versus(res: StudyResults, adapters: list[Variant],
            best: dict[tuple[str, str], tuple[Estimate, Estimate]]) -> list[list[str]]:  # fmt: skip
    out = []
    for arch, name in best:
        v = res.variant(name)
        against = [w for w in adapters if (arch, w.name) in best and w.name != v.name and (
            (_clean(res, w) and not _clean(res, v) and _key(w) == _key(v))
            or (w.parent == v.parent and _pert(v) != "none" and _pert(w) == "none" and _key(w)[:2] == _key(v)[:2]))]
        for w in against:
            (f1, q1), (f2, q2) = best[(arch, v.name)], best[(arch, w.name)]
            d_fid, d_q = compare(f1, f2, lower_is_better=True), compare(q1, q2, lower_is_better=False)
            out.append([arch, v.name, w.name, d_fid.fmt(), str(d_fid.verdict), d_q.fmt(), str(d_q.verdict)])  # fmt: skip
    return out
