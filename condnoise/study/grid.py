"""The study's cell graph: [autoencoder] -> corrupt -> train -> [distill | finetune] ->
sample -> evaluate (+ walk, theory) -> report.

Every cell carries its fully resolved config; its cache key hashes that config, which
includes the keys of the cells it depends on. A derived variant's model cell (``distill``,
:mod:`condnoise.study.derived`) depends on its parent's model cell; few-step models and their
parents are sampled over the study's step sweep (ids ``sample/ARCH/VARIANT/seedS/n{steps}/
s{scale}``); controlled models (``finetune``) are sampled with the reference split's
controls, and their parents once more with those controls recorded only (ids ``sample/
ARCH/PARENT/seedS/{control}-recorded/s{scale}``, the "base without control" reference).
Cost estimates come from :mod:`condnoise.study.cost` and are replaced by
measured durations where the cell log has them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from condnoise import rng
from condnoise.errors import UserError
from condnoise.study.cache import config_key
from condnoise.study.cost import Cost, CostModel
from condnoise.study.derived import METHODS, controlled, few_step
from condnoise.study.spec import StudySpec, Variant, deep_merge

STAGES = ("autoencoder", "corrupt", "train", *METHODS, "sample", "evaluate", "walk", "theory",
          "report")  # fmt: skip
MODEL_STAGES = ("train", *METHODS)  # cells whose run/ folder holds a model


@dataclass
class Cell:
    """One unit of cached work."""

    id: str  # readable, unique within the study: "train/dit/cep-u/seed0"
    stage: str
    config: dict[str, Any]
    deps: list[str] = field(default_factory=list)
    est_seconds: float = 0.0  # on 2 CPU cores
    est_gpu_seconds: float = 0.0  # on one H100 (bf16), rough
    meta: dict[str, Any] = field(default_factory=dict)  # variant, arch, seed, scale

    @property
    def key(self) -> str:
        return config_key(self.config)

    def dir(self, study_dir: Path) -> Path:
        return Path(study_dir) / "cells" / self.stage / self.key


def _cell(id: str, config: dict[str, Any], cost: Cost, meta: dict[str, Any],
          deps: list[str] | None = None) -> Cell:  # fmt: skip
    return Cell(id=id, stage=config["stage"], config=config, deps=deps or [],
                est_seconds=cost.cpu, est_gpu_seconds=cost.gpu, meta=meta)  # fmt: skip


def image_shape(spec: StudySpec) -> tuple[int, int, int]:
    size = int(spec.data.get("image_size", 32))
    channels = 1 if spec.data.get("source", "fashion-mnist") in ("fashion-mnist", "digits") else 3
    return channels, size, size


def trainer_sections(spec: StudySpec, v: Variant, arch: str) -> dict[str, Any]:
    """Trainer sections (``diffusion``, ``train``): the architecture's preset, then the
    study's, then the variant's."""
    return deep_merge(deep_merge(spec.arch_train.get(arch, {}), spec.train), v.train)


class _Cells:
    """Cells by id; adding one twice is fine when the config is the same."""

    def __init__(self, study: str) -> None:
        self.study, self.by_id = study, {}

    def add(self, cell: Cell) -> Cell:
        old = self.by_id.setdefault(cell.id, cell)
        if old.key != cell.key:
            raise UserError(f"study {self.study}: two different cells named {cell.id}")
        return old

    def ordered(self) -> list[Cell]:
        """By stage, so a study fills its grid breadth-first (all models trained before
        sampling starts) and an interrupted study still has comparable partial results."""
        order = {s: i for i, s in enumerate(STAGES)}
        return sorted(self.by_id.values(), key=lambda c: order[c.stage])


def build_cells(spec: StudySpec) -> list[Cell]:
    """Expand the study into cells in a valid execution order (dependencies first)."""
    cost = CostModel(image_shape(spec), spec.cost, list(spec.evaluate["extractors"]),
                     ref_model=next(iter(spec.architectures.values())))  # fmt: skip
    cells = _Cells(spec.name)
    ae = None
    if spec.autoencoder is not None:
        config = {"stage": "autoencoder", "autoencoder": spec.autoencoder["config"],
                  "rng_version": rng.VERSION}  # fmt: skip
        t = spec.autoencoder["config"]["train"]
        ae = cells.add(_cell("autoencoder", config, cost.autoencoder(int(t["steps"]), int(t["batch_size"])),
                             {}))  # fmt: skip
    swept = {v.parent for v in spec.variants if few_step(v)} | {v.name for v in spec.variants if few_step(v)}
    models: dict[tuple[str, str, int], Cell] = {}  # (variant, arch, seed) -> its model cell
    for v in spec.variants:  # parents first (spec.derived.order)
        for arch in v.architectures or tuple(spec.architectures):
            for seed in spec.seeds:
                meta = {"variant": v.name, "arch": arch, "seed": seed}
                if v.method == "train":
                    model = _trained_cells(spec, cost, cells, v, arch, seed, ae)
                elif v.parent is None:  # a model from outside the study
                    model = cells.add(_source_cell(v, meta))
                else:
                    model = cells.add(_derived_cell(spec, cost, v, models[(v.parent, arch, seed)], meta))
                models[(v.name, arch, seed)] = model
                if controlled(v):
                    _controlled_cells(spec, cost, cells, v, model, models[(v.parent, arch, seed)], arch, meta)
                elif not few_step(v):
                    _sweep_cells(spec, cost, cells, model, arch, meta)
                if v.name in swept:
                    _step_sweep_cells(spec, cost, cells, model, v, arch, meta)
    if spec.report.get("theory"):
        config = {"stage": "theory", "seed": spec.seeds[0], "lab": _theory_lab(spec)}
        cells.add(_cell("theory", config, cost.theory(), {}))
    return cells.ordered()


def _trained_cells(spec: StudySpec, cost: CostModel, cells: _Cells, v: Variant, arch: str,
                   seed: int, ae: Cell | None) -> Cell:  # fmt: skip
    """A trained model's corruption (if any) and training cell; returns the latter."""
    meta = {"variant": v.name, "arch": arch, "seed": seed}
    corrupt = None
    if v.corruption:
        config = {"stage": "corrupt", "data": spec.data, "corruption": v.corruption, "seed": seed}
        corrupt = cells.add(_cell(f"corrupt/{v.name}/seed{seed}", config, cost.corrupt(),
                                  dict(meta, arch=None)))  # fmt: skip
    return cells.add(_train_cell(spec, cost, v, arch, seed, meta, corrupt,
                                 ae if arch in spec.latent_archs else None))  # fmt: skip


def _sweep_cells(spec: StudySpec, cost: CostModel, cells: _Cells, model: Cell, arch: str,
                 meta: dict[str, Any], controls: dict[str, Any] | None = None) -> None:  # fmt: skip
    """The guidance sweep of one model (a sample and an evaluate cell per scale) and, for
    the first seed, its walk (not for a model sampled with ``controls``)."""
    for scale in spec.sample["guidance"]:
        sample = cells.add(_sample_cell(spec, cost, model, arch, scale, meta, controls=controls))
        _evaluate_cell(spec, cost, cells, sample, arch, dict(meta, scale=scale))
    if spec.report.get("walks") and meta["seed"] == spec.seeds[0] and controls is None:
        cells.add(_walk_cell(spec, cost, model, arch, meta))


def control_settings(spec: StudySpec, kind: str) -> dict[str, Any]:
    """Where a controlled sample cell's controls come from: the evaluation's reference split
    (``condnoise sample --controls-from SPLIT``) and the control kind."""
    return {"split": str(spec.evaluate.get("reference_split", "test")), "kind": kind}


def _controlled_cells(spec: StudySpec, cost: CostModel, cells: _Cells, v: Variant, model: Cell,
                      parent: Cell, arch: str, meta: dict[str, Any]) -> None:  # fmt: skip
    """An adapter's guidance sweep with its controls, and its parent's reference: one scale
    (the middle of the sweep) sampled with the same controls recorded but not applied."""
    kind = str(v.settings["control"])
    controls = control_settings(spec, kind)
    _sweep_cells(spec, cost, cells, model, arch, dict(meta, control=kind, applied=True), controls)
    scale = _walk_scale(spec)
    ref = dict(meta, variant=v.parent, control=kind, applied=False)
    sample = cells.add(_sample_cell(spec, cost, parent, arch, scale, ref, controls=controls,
                                    tag=f"/{kind}-recorded"))  # fmt: skip
    _evaluate_cell(spec, cost, cells, sample, arch, dict(ref, scale=scale))


def _step_sweep_cells(spec: StudySpec, cost: CostModel, cells: _Cells, model: Cell, v: Variant,
                      arch: str, meta: dict[str, Any]) -> None:  # fmt: skip
    """One sample + evaluate cell per (sampler steps, scale) of ``spec.step_sweep``: a
    few-step model with its method's sampler, a parent with the study's."""
    sampler = METHODS[v.method].sampler if few_step(v) else spec.sample["sampler"]
    assert spec.step_sweep is not None  # validated: few-step variants need one
    for steps in spec.step_sweep["steps"]:
        for scale in spec.step_sweep["guidance"]:
            m = dict(meta, scale=scale, steps=steps, sampler=sampler)
            sample = cells.add(_sample_cell(spec, cost, model, arch, scale, m, sampler=sampler, steps=steps))
            _evaluate_cell(spec, cost, cells, sample, arch, m)


def _evaluate_cell(spec: StudySpec, cost: CostModel, cells: _Cells, sample: Cell, arch: str,
                   meta: dict[str, Any]) -> Cell:  # fmt: skip
    control = (sample.config.get("controls") or {}).get("kind")
    config = {"stage": "evaluate", "sample_key": sample.key, "data": spec.data,
              "evaluate": evaluate_settings(spec, arch, control)}  # fmt: skip
    return cells.add(_cell(sample.id.replace("sample/", "evaluate/", 1), config,
                           cost.evaluate(int(spec.sample["num_samples"])), meta, [sample.id]))  # fmt: skip


def evaluate_settings(spec: StudySpec, arch: str, control: str | None = None) -> dict[str, Any]:
    """The study's ``evaluate`` section; models on a VQ autoencoder add sample entropy over
    its codebook (paper Sec. 5) to the default metrics, samples made with ``control``
    (canny / mask) its fidelity metric (edge F1 / mask IoU)."""
    from condnoise.evaluation.control_metrics import CONTROL_METRICS
    from condnoise.study.stages import STUDY_METRICS

    e = dict(spec.evaluate)
    ae = spec.architectures[arch].get("autoencoder") or {}
    if ae.get("kind") == "vq" and not e.get("metrics"):
        e["metrics"] = [*STUDY_METRICS, "entropy"]
    if control is not None:
        metric = next(m for m, k in CONTROL_METRICS.items() if k == control)
        e["metrics"] = [*(e.get("metrics") or STUDY_METRICS), metric]
    return e


def _train_cell(spec: StudySpec, cost: CostModel, v: Variant, arch: str, seed: int,
                meta: dict[str, Any], corrupt: Cell | None, ae: Cell | None) -> Cell:  # fmt: skip
    sections = trainer_sections(spec, v, arch)
    t = sections.get("train", {})
    config = {
        "stage": "train", "data": spec.data, "corrupt_key": corrupt.key if corrupt else None,
        "corruption": v.corruption, "model": spec.architectures[arch],
        "perturbation": v.perturbation, "train": sections, "seed": seed,
        "rng_version": rng.VERSION,
    }  # fmt: skip
    if ae is not None:  # the study's autoencoder: its key, not its folder, enters the key
        config["autoencoder_key"] = ae.key
    estimate = cost.train(spec.architectures[arch], int(t.get("steps", 2000)),
                          int(t.get("batch_size", 128)), encode=ae is not None)  # fmt: skip
    deps = ([corrupt.id] if corrupt else []) + ([ae.id] if ae else [])
    return _cell(f"train/{arch}/{v.name}/seed{seed}", config, estimate, meta, deps)


def _derived_cell(spec: StudySpec, cost: CostModel, v: Variant, parent: Cell,
                  meta: dict[str, Any]) -> Cell:  # fmt: skip
    """The model cell of a derived variant (stage = its method), after its parent's."""
    config = {"stage": v.method, "parent_key": parent.key, "settings": v.settings,
              "seed": meta["seed"], "rng_version": rng.VERSION}  # fmt: skip
    if v.method == "finetune":  # the adapter learns from the study's data (clean conditions)
        config["data"] = spec.data
    arch, teacher = meta["arch"], next(p for p in spec.variants if p.name == v.parent)
    model = spec.architectures[arch]
    # the student / adapter starts from its parent's train settings (training.distill.
    # student_config; training.finetune.finetune_config with FINETUNE_TRAIN)
    t = trainer_sections(spec, teacher, arch).get("train", {})
    if v.method == "finetune":
        from condnoise.training.finetune import FINETUNE_TRAIN

        t = deep_merge({**t, **FINETUNE_TRAIN}, v.settings.get("train", {}))
        batch = int(t.get("batch_size", 128))
        steps = (cost.epoch_steps(spec.data, v.settings["epochs"], batch) if v.settings.get("epochs")
                 else int(t["steps"]))  # fmt: skip
        estimate = cost.finetune(model, steps, batch, str(v.settings["adapter"]["kind"]))
    else:
        t = deep_merge(t, v.settings.get("train", {}))
        estimate = cost.distill(model, int(t.get("steps", 1000)), int(t.get("batch_size", 128)))
    return _cell(f"{v.method}/{arch}/{v.name}/seed{meta['seed']}", config, estimate, meta, [parent.id])


def _source_cell(v: Variant, meta: dict[str, Any]) -> Cell:
    """The model cell of a parentless derived variant (``pretrained``: a given run); one
    for every seed unless its method makes one per seed."""
    per_seed = METHODS[v.method].per_seed
    config = {"stage": v.method, "settings": v.settings, **({"seed": meta["seed"]} if per_seed else {})}
    seed = f"/seed{meta['seed']}" if per_seed else ""
    return _cell(f"{v.method}/{meta['arch']}/{v.name}{seed}", config, Cost(1.0, 1.0),
                 {k: meta[k] for k in ("variant", "arch")} | ({"seed": meta["seed"]} if per_seed else {}))


def _sample_cell(spec: StudySpec, cost: CostModel, model: Cell, arch: str, scale: float,
                 meta: dict[str, Any], *, sampler: str | None = None, steps: int | None = None,
                 controls: dict[str, Any] | None = None, tag: str = "") -> Cell:  # fmt: skip
    """One scale of a model's samples; ``sampler`` / ``steps`` (the step sweep) replace the
    study's, and the id gets ``/n{steps}``; ``controls`` (:func:`control_settings`) pair each
    sample with a split item's control and condition, ``tag`` marks the id. ``train_key`` is
    the model cell's key (a train or derived cell)."""
    settings = _sample_settings(spec)
    if sampler is not None:
        settings.update(sampler=sampler, steps=int(steps))  # type: ignore[arg-type]
    config = {"stage": "sample", "train_key": model.key, "sample": settings,
              "scale": scale, "seed": meta["seed"], "rng_version": rng.VERSION}  # fmt: skip
    if controls is not None:
        config["controls"] = dict(controls)
    estimate = cost.sample(spec.architectures[arch], int(spec.sample["num_samples"]),
                           int(settings["steps"]), scale, sampler=str(settings["sampler"]))  # fmt: skip
    n = tag + ("" if sampler is None else f"/n{steps}")
    return _cell(f"sample/{arch}/{meta['variant']}/seed{meta['seed']}{n}/s{scale:g}", config, estimate, dict(meta, scale=scale), [model.id])


def _walk_cell(spec: StudySpec, cost: CostModel, train: Cell, arch: str,
               meta: dict[str, Any]) -> Cell:  # fmt: skip
    settings = _sample_settings(spec)
    frames, per_class = int(spec.report["walk_frames"]), int(spec.report["grid_per_class"])
    config = {
        "stage": "walk", "train_key": train.key,
        "sample": {k: settings.get(k) for k in ("sampler", "steps")}
                  | ({"clip_x0": settings["clip_x0"]} if "clip_x0" in settings else {})
                  | {k: settings[k] for k in ("captions_from", "captions_data") if k in settings},
        "scale": _walk_scale(spec),
        "frames": frames, "grid_per_class": per_class, "seed": meta["seed"],
        "rng_version": rng.VERSION,
    }  # fmt: skip
    estimate = cost.walk(spec.architectures[arch], frames, per_class, int(spec.sample["steps"]))
    return _cell(f"walk/{arch}/{meta['variant']}", config, estimate,
                 dict(meta, scale=config["scale"]), [train.id])  # fmt: skip


def _sample_settings(spec: StudySpec) -> dict[str, Any]:
    """The study's ``sample`` section without the guidance list (one scale per cell)."""
    return {k: spec.sample[k] for k in spec.sample if k != "guidance"}


def _theory_lab(spec: StudySpec) -> dict[str, Any]:
    """``report.theory``: true (the lab's defaults) or a mapping of GMMLabConfig fields."""
    t = spec.report.get("theory")
    return dict(t) if isinstance(t, dict) else {}


def _walk_scale(spec: StudySpec) -> float:
    """Guidance for sample grids and walks: the middle of the sweep."""
    g = sorted(spec.sample["guidance"])
    return g[len(g) // 2]


def select(cells: list[Cell], *, stages: list[str] | None, only: list[str] | None) -> list[Cell]:
    """Cells to run: ``stages`` keeps whole stages; ``only`` keeps cells whose id contains
    any of the given substrings (e.g. ``cep-u``, ``seed0``, ``s2``), plus their upstream
    dependencies, which are cached and therefore cheap when already done."""
    by_id = {c.id: c for c in cells}
    chosen = list(cells)
    if only:
        wanted = {c.id for c in cells if any(o in c.id for o in only)}
        if not wanted:
            raise UserError(f"--only {only}: no cell id matches (try `condnoise study --dry-run`)")
        stack = list(wanted)
        while stack:
            for d in by_id[stack.pop()].deps:
                if d not in wanted:
                    wanted.add(d)
                    stack.append(d)
        chosen = [c for c in chosen if c.id in wanted]
    if stages:
        bad = sorted(set(stages) - set(STAGES))
        if bad:
            raise UserError(f"--stage {bad}: unknown stage; choose from {', '.join(STAGES)}")
        chosen = [c for c in chosen if c.stage in stages]
    return chosen


def format_seconds(s: float) -> str:
    if s < 90:
        return f"{s:.0f}s"
    if s < 5400:
        return f"{s / 60:.1f}min"
    return f"{s / 3600:.1f}h"


def plan_table(
    cells: list[Cell], study_dir: Path, durations: dict[str, float], done: set[str]
) -> str:
    """The ``--dry-run`` text: one line per cell plus totals per stage (CPU and GPU)."""
    finished = [c for c in cells if c.key in durations and c.key in done]
    # Calibrate CPU estimates with the ratio measured / estimated over finished cells.
    calib: dict[str, float] = {}
    for stage in STAGES:
        pairs = [(durations[c.key], c.est_seconds) for c in finished if c.stage == stage]
        est = sum(p[1] for p in pairs)
        if pairs and est > 0:
            calib[stage] = sum(p[0] for p in pairs) / est
    lines = [f"{'cell':<46} {'status':<6} {'2 cores':>9} {'1 H100':>8}  key"]
    totals: dict[str, list[float]] = {}
    for c in cells:
        is_done = c.key in done
        secs = durations.get(c.key, 0.0) if is_done else c.est_seconds * calib.get(c.stage, 1.0)
        gpu = 0.0 if is_done else c.est_gpu_seconds
        lines.append(
            f"{c.id:<46} {'done' if is_done else 'todo':<6} {format_seconds(secs):>9} "
            f"{'-' if is_done else format_seconds(gpu):>8}  {c.key}"
        )
        t = totals.setdefault(c.stage, [0, 0, 0.0, 0.0])
        t[0] += 1
        t[1] += int(is_done)
        if not is_done:
            t[2] += secs
            t[3] += gpu
    lines.append("")
    cpu_left = gpu_left = 0.0
    for stage, (n, d, secs, gsecs) in totals.items():
        note = f" (x{calib[stage]:.2f} from measured cells)" if stage in calib else ""
        lines.append(
            f"{stage:<11} {n:>5} cells, {d:>5} done, to go: ~{format_seconds(secs)} on 2 CPU "
            f"cores, ~{format_seconds(gsecs)} on one H100{note}"
        )
        cpu_left += secs
        gpu_left += gsecs
    lines.append(
        f"total: {len(cells)} cells, ~{format_seconds(cpu_left)} of work left on 2 CPU cores, "
        f"~{format_seconds(gpu_left)} on one H100 (divide by the GPU count under torchrun); "
        "rough estimates (condnoise.study.cost)"
    )
    return "\n".join(lines)
