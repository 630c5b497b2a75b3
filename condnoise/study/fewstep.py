"""The report's few-step section: FID vs sampler steps, teachers vs their distilled students.

Paper Sec. 4 / Table 1 distils Stable Diffusion 1.5 into latent consistency models (Luo et
al. 2023) with and without CEP; the point of a student is to beat its teacher at the same
few steps. For every step count and scale of the study's ``step_sweep``, each teacher (the
study's sampler, DPM-Solver++ in the presets) and each student (LCM) is the mean FID over
seeds with its 95% t-interval; each student is compared with its teacher at the same step
count, and every student with a CEP placement (on the student, a CEP-pretrained teacher,
or both) with the clean student (clean teacher, no CEP). Both comparisons are paired by
seed: the student of seed s is distilled from the teacher of seed s and every model is
sampled with the same seeds, so the verdict comes from the t-interval of the per-seed
differences (:func:`condnoise.study.aggregate.compare_paired`); the Welch interval on the
seed means (:func:`condnoise.study.aggregate.compare`), which ignores the pairing, is shown
beside it.
"""

from __future__ import annotations

from condnoise.study import figures
from condnoise.study.aggregate import Estimate, compare, compare_paired
from condnoise.study.blocks import Section, Status
from condnoise.study.derived import METHODS, few_step
from condnoise.study.results import CEP_NAMES, StudyResults
from condnoise.study.spec import Variant

SECTION_ID = "fid-steps"
TITLE = "FID vs sampler steps: teacher (DPM-Solver++) vs students"


def placement(res: StudyResults, student: Variant) -> str:
    """Where CEP acts for a student: ``none``, ``student``, ``teacher`` or ``both``."""
    on_student = student.settings["perturbation"]["name"] != "none"
    teacher = res.variant(student.parent or "")
    on_teacher = teacher.perturbation["name"] in CEP_NAMES
    return {(False, False): "none", (True, False): "student", (False, True): "teacher",
            (True, True): "both"}[(on_student, on_teacher)]  # fmt: skip


def _clean_student(res: StudyResults, arch: str) -> Variant | None:
    """The reference: a student without CEP of a teacher trained on clean data without any
    perturbation (the first one listed)."""
    for v in res.spec.variants:
        if few_step(v) and arch in (v.architectures or ()) and placement(res, v) == "none":
            t = res.variant(v.parent or "")
            if t.corruption is None and t.perturbation["name"] == "none" and t.parent is None:
                return v
    return None


def _fmt_diff(a: Estimate, b: Estimate, a_seeds: dict[int, float],
              b_seeds: dict[int, float]) -> tuple[str, str, str]:  # fmt: skip
    """Welch interval, paired interval, and the paired verdict of FID ``a - b``."""
    welch, paired = compare(a, b, lower_is_better=True), compare_paired(a_seeds, b_seeds, lower_is_better=True)
    return welch.fmt(), paired.fmt(), str(paired.verdict)


def steps_section(res: StudyResults) -> Section:
    sec = Section(SECTION_ID, TITLE)
    students = [v for v in res.spec.variants if few_step(v)]
    if not students or res.spec.step_sweep is None:
        return Section(sec.id, sec.title, status=Status.NOT_IN_GRID,
                       note="no few-step (distill) variants in this preset's grid")  # fmt: skip
    if not res.step_records:
        return Section(sec.id, sec.title, status=Status.INCOMPLETE, note="no evaluated step-sweep cells yet")
    sweep, sampler = res.spec.step_sweep, res.spec.sample["sampler"]
    teachers = list(dict.fromkeys(v.parent for v in students))
    sec.text(f"Each teacher sampled with {sampler}, each student with {METHODS['distill'].sampler} "
             f"(guidance through its guidance embedding), at {', '.join(map(str, sweep['steps']))} "
             f"steps and guidance {', '.join(f'{s:g}' for s in sweep['guidance'])}; "
             f"{res.spec.sample['num_samples']} samples per point; mean ± 95% t-interval over "
             f"{len(res.spec.seeds)} seed(s). Differences (student - reference): negative = lower "
             "FID. The student of seed s is distilled from the teacher of seed s and all models "
             "are sampled with the same seeds, so the verdict comes from the paired 95% "
             "t-interval of the per-seed differences; the Welch 95% interval on the seed means "
             "(which ignores the pairing) is shown beside it. 'better' / 'worse' only when the "
             "whole paired interval lies on one side of zero.")  # fmt: skip
    rows, versus = [], []
    for arch in res.spec.architectures:
        ref = _clean_student(res, arch)
        for scale in sweep["guidance"]:
            series: figures.Series = {}
            for t in teachers:
                if t is not None and arch in (res.variant(t).architectures or res.spec.architectures):
                    series[f"{t} (teacher, {sampler})"] = list(res.per_steps(arch, t, scale).items())
            for v in students:
                series[f"{v.name} (student of {v.parent}, CEP: {placement(res, v)})"] = list(
                    res.per_steps(arch, v.name, scale).items())
            series = {k: pts for k, pts in series.items() if pts}
            if not series:
                continue
            sec.figure(figures.metric_vs_guidance(series, "FID", f"{arch}: s = {scale:g}",
                                                  xlabel="sampler steps", log2_x=True),
                       f"{arch}, guidance {scale:g}: FID (lower is better) vs sampler steps; teachers "
                       f"with {sampler}, students with LCM; mean ± 95% CI over seeds")  # fmt: skip
            rows += _rows(res, arch, scale, teachers, students, sweep["steps"], sampler)
            versus += _versus(res, arch, scale, students, ref, sweep["steps"])
    if not rows:
        return Section(sec.id, sec.title, status=Status.INCOMPLETE, note="no evaluated step-sweep cells yet")
    sec.table(["arch", "model", "role", "CEP", "sampler", "s", *[f"FID @ {n} steps" for n in sweep["steps"]]],
              rows)
    if versus:
        sec.text("Each student against its own teacher at the same step count (the point of "
                 "distillation), and each student with CEP against the clean student (clean teacher, "
                 "no CEP) of the same architecture:")  # fmt: skip
        sec.table(["arch", "student", "against", "s", "steps", "student FID", "their FID",
                   "diff, Welch 95%", "diff, paired by seed 95%", "verdict (paired)"], versus)  # fmt: skip
    todo = [m for m in res.missing if m.startswith("evaluate/") and "/n" in m]
    if todo:
        sec.note = f"{len(todo)} step-sweep evaluate cell(s) not finished yet; the numbers cover the finished ones"
    return sec


def _rows(res: StudyResults, arch: str, scale: float, teachers: list[str | None],
          students: list[Variant], steps: list[int], sampler: str) -> list[list[str]]:  # fmt: skip
    out = []
    models = [(t, "teacher", "-", sampler) for t in teachers if t is not None]
    models += [(v.name, f"student of {v.parent}", placement(res, v), "lcm") for v in students]
    for name, role, cep, smp in models:
        ps = res.per_steps(arch, name, scale)
        if ps:
            out.append([arch, name, role, cep, smp, f"{scale:g}",
                        *[ps[n].fmt() if n in ps else "n/a" for n in steps]])  # fmt: skip
    return out


def _versus(res: StudyResults, arch: str, scale: float, students: list[Variant],
            ref: Variant | None, steps: list[int]) -> list[list[str]]:  # fmt: skip
    out = []
    for v in students:
        mine, my_seeds = res.per_steps(arch, v.name, scale), res.per_steps_by_seed(arch, v.name, scale)
        against = [(f"{v.parent} (teacher, {res.spec.sample['sampler']})", v.parent or "")]
        if ref is not None and v.name != ref.name:
            against.append((f"{ref.name} (clean student)", ref.name))
        for label, other in against:
            theirs, their_seeds = res.per_steps(arch, other, scale), res.per_steps_by_seed(arch, other, scale)
            for n in steps:
                if n in mine and n in theirs:
                    welch, paired, verdict = _fmt_diff(mine[n], theirs[n], my_seeds[n], their_seeds[n])
                    out.append([arch, v.name, label, f"{scale:g}", str(n), mine[n].fmt(), theirs[n].fmt(),
                                welch, paired, verdict])  # fmt: skip
    return out
