"""The study's cell graph: corrupt -> train -> sample -> evaluate (+ walk, theory) -> report.

Every cell carries its fully resolved config; its cache key hashes that config, which
includes the keys of the cells it depends on. Cost estimates use throughput constants
measured on 2 CPU cores (``/work/shared/anchors.md``; DiT hidden 128 / depth 6 / patch 4 on
32x32x1: 242 train img/s, 787 forward img/s), scaled by the model's compute, and are
replaced by measured durations where the cell log has them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from condnoise import rng
from condnoise.errors import UserError
from condnoise.study.cache import config_key
from condnoise.study.spec import StudySpec, Variant, deep_merge

STAGES = ("corrupt", "train", "sample", "evaluate", "walk", "theory", "report")

# One H100, bf16 autocast, DiT-XL/2 on 32x32x4 latents (anchors.md): 355 train img/s,
# 1,077 forward img/s; small models are capped by per-step overheads.
GPU_XL2 = {"family": "dit", "size": "XL/2", "latent_shape": [4, 32, 32]}
GPU_TRAIN_IMG_PER_S, GPU_FORWARD_IMG_PER_S = 355.0, 1077.0
GPU_CAP_TRAIN, GPU_CAP_FORWARD, GPU_EVAL_IMG_PER_S = 20000.0, 60000.0, 3000.0
# Measured on 2 CPU cores (anchors.md), reference DiT 128 / 6 / 4 on 32x32x1 images.
REF_TRAIN_IMG_PER_S = 242.0
REF_FORWARD_IMG_PER_S = 787.0
REF_COMPUTE = 128**2 * 6 * (32 // 4) ** 2
COMPUTE_EXPONENT = 0.9  # fitted to the anchors' 192/6/4, 256/8/4 and 192/6/2 rows
FMNIST_CLASSIFIER_IMG_PER_S = 4000.0  # small CNN feature extractor + metrics, 2 cores
INCEPTION_IMG_PER_S = 10.5  # anchors: ~95 ms per image on 2 CPU threads
CORRUPT_SECONDS = 2.0
THEORY_SECONDS = 20.0
OVERHEAD = {"train": 4.0, "sample": 1.5, "evaluate": 2.0, "walk": 1.5}  # load / build, s


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


def _model_compute(model: dict[str, Any], image_shape: tuple[int, int, int]) -> float:
    """Relative compute of one forward pass versus the reference DiT (1.0 = reference)."""
    from condnoise.models.conditional import resolve_model_config

    cfg = resolve_model_config(
        {k: v for k, v in model.items() if k not in ("autoencoder", "latent_shape")}
    )
    c, h, w = model.get("latent_shape") or image_shape
    if cfg["family"] == "dit":
        tokens = (h // cfg["patch"]) * (w // cfg["patch"])
        ratio = cfg["hidden"] ** 2 * cfg["depth"] * tokens / REF_COMPUTE
    else:  # U-Net: width^2 x resolution x blocks, relative to a DiT-sized budget; rough
        width = sum(ch**2 for ch in cfg["channels"]) / len(cfg["channels"])
        ratio = 6.0 * width * cfg["layers_per_block"] * h * w / (128**2 * 6 * 1024)
    return max(ratio, 1e-3) ** COMPUTE_EXPONENT * max(c, 1) ** 0.1


def image_shape(spec: StudySpec) -> tuple[int, int, int]:
    size = int(spec.data.get("image_size", 32))
    channels = 1 if spec.data.get("source", "fashion-mnist") in ("fashion-mnist", "digits") else 3
    return channels, size, size


def _train_cfg(spec: StudySpec, v: Variant) -> dict[str, Any]:
    """Trainer sections (``diffusion``, ``train``): the study's, then the variant's."""
    return deep_merge(spec.train, v.train)


def build_cells(spec: StudySpec) -> list[Cell]:
    """Expand the study into cells in a valid execution order (dependencies first)."""
    shape = image_shape(spec)
    cost = spec.cost
    cells: dict[str, Cell] = {}

    def add(cell: Cell) -> Cell:
        if cell.id in cells:
            if cells[cell.id].key != cell.key:
                raise UserError(f"study {spec.name}: two different cells named {cell.id}")
            return cells[cell.id]
        cells[cell.id] = cell
        return cell

    sample_cfg = {k: spec.sample[k] for k in spec.sample if k != "guidance"}
    for v in spec.variants:
        for arch in v.architectures or tuple(spec.architectures):
            model = spec.architectures[arch]
            compute = _model_compute(model, shape)
            train_rate = cost.get("train_img_per_s", REF_TRAIN_IMG_PER_S) / compute
            fwd_rate = cost.get("forward_img_per_s", REF_FORWARD_IMG_PER_S) / compute
            gpu_ratio = _model_compute(GPU_XL2, shape) / compute
            gpu_train = min(GPU_TRAIN_IMG_PER_S * gpu_ratio, GPU_CAP_TRAIN)
            gpu_fwd = min(GPU_FORWARD_IMG_PER_S * gpu_ratio, GPU_CAP_FORWARD)
            for seed in spec.seeds:
                meta = {"variant": v.name, "arch": arch, "seed": seed}
                deps: list[str] = []
                corrupt_key = None
                if v.corruption:
                    cc = add(
                        Cell(
                            id=f"corrupt/{v.name}/seed{seed}",
                            stage="corrupt",
                            config={
                                "stage": "corrupt",
                                "data": spec.data,
                                "corruption": v.corruption,
                                "seed": seed,
                            },
                            est_seconds=CORRUPT_SECONDS,
                            est_gpu_seconds=CORRUPT_SECONDS,
                            meta=dict(meta, arch=None),
                        )
                    )
                    deps.append(cc.id)
                    corrupt_key = cc.key
                tcfg = _train_cfg(spec, v)
                steps = int(tcfg.get("train", {}).get("steps", 2000))
                batch = int(tcfg.get("train", {}).get("batch_size", 128))
                train = add(
                    Cell(
                        id=f"train/{arch}/{v.name}/seed{seed}",
                        stage="train",
                        config={
                            "stage": "train",
                            "data": spec.data,
                            "corrupt_key": corrupt_key,
                            "corruption": v.corruption,
                            "model": model,
                            "perturbation": v.perturbation,
                            "train": tcfg,
                            "seed": seed,
                            "rng_version": rng.VERSION,
                        },
                        deps=deps,
                        est_seconds=steps * batch / train_rate + OVERHEAD["train"],
                        est_gpu_seconds=steps * batch / gpu_train + OVERHEAD["train"],
                        meta=meta,
                    )
                )
                n = int(spec.sample["num_samples"])
                for scale in spec.sample["guidance"]:
                    forwards = 1 if scale in (0.0, 1.0) else 2
                    sc = add(
                        Cell(
                            id=f"sample/{arch}/{v.name}/seed{seed}/s{scale:g}",
                            stage="sample",
                            config={
                                "stage": "sample",
                                "train_key": train.key,
                                "sample": sample_cfg,
                                "scale": scale,
                                "seed": seed,
                                "rng_version": rng.VERSION,
                            },
                            deps=[train.id],
                            est_seconds=n * int(spec.sample["steps"]) * forwards / fwd_rate
                            + OVERHEAD["sample"],
                            est_gpu_seconds=n * int(spec.sample["steps"]) * forwards / gpu_fwd
                            + OVERHEAD["sample"],
                            meta=dict(meta, scale=scale),
                        )
                    )
                    add(
                        Cell(
                            id=f"evaluate/{arch}/{v.name}/seed{seed}/s{scale:g}",
                            stage="evaluate",
                            config={
                                "stage": "evaluate",
                                "sample_key": sc.key,
                                "evaluate": spec.evaluate,
                                "data": spec.data,
                            },
                            deps=[sc.id],
                            est_seconds=_eval_seconds(spec, n) + OVERHEAD["evaluate"],
                            est_gpu_seconds=n * len(spec.evaluate["extractors"])
                            / GPU_EVAL_IMG_PER_S + OVERHEAD["evaluate"],
                            meta=dict(meta, scale=scale),
                        )
                    )
                if spec.report.get("walks") and seed == spec.seeds[0]:
                    frames = int(spec.report["walk_frames"])
                    scale = _walk_scale(spec)
                    steps_ = int(spec.sample["steps"])
                    add(
                        Cell(
                            id=f"walk/{arch}/{v.name}",
                            stage="walk",
                            config={
                                "stage": "walk",
                                "train_key": train.key,
                                "sample": {k: sample_cfg.get(k) for k in ("sampler", "steps")},
                                "scale": scale,
                                "frames": frames,
                                "grid_per_class": int(spec.report["grid_per_class"]),
                                "seed": seed,
                                "rng_version": rng.VERSION,
                            },
                            deps=[train.id],
                            est_seconds=(3 * frames + 10 * int(spec.report["grid_per_class"]))
                            * steps_ * 2 / fwd_rate + OVERHEAD["walk"],
                            est_gpu_seconds=OVERHEAD["walk"] + 2.0,
                            meta=dict(meta, scale=scale),
                        )
                    )
    if spec.report.get("theory"):
        add(
            Cell(
                id="theory",
                stage="theory",
                config={"stage": "theory", "seed": spec.seeds[0], "lab": _theory_lab(spec)},
                est_seconds=THEORY_SECONDS,
                est_gpu_seconds=THEORY_SECONDS,
                meta={},
            )
        )
    order = {s: i for i, s in enumerate(STAGES)}
    # Stable order: by stage, so a study fills its grid breadth-first (all models trained
    # before sampling starts) and an interrupted study still has comparable partial results.
    return sorted(cells.values(), key=lambda c: order[c.stage])


def _theory_lab(spec: StudySpec) -> dict[str, Any]:
    """``report.theory``: true (the lab's defaults) or a mapping of GMMLabConfig fields."""
    t = spec.report.get("theory")
    return dict(t) if isinstance(t, dict) else {}


def _walk_scale(spec: StudySpec) -> float:
    """Guidance for sample grids and walks: the middle of the sweep."""
    g = sorted(spec.sample["guidance"])
    return g[len(g) // 2]


def _eval_seconds(spec: StudySpec, n: int) -> float:
    rate = spec.cost.get("eval_img_per_s")
    if rate:
        return n / rate
    total = 0.0
    for ex in spec.evaluate["extractors"]:
        total += n / (INCEPTION_IMG_PER_S if ex == "inception" else FMNIST_CLASSIFIER_IMG_PER_S)
    return total


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
            f"{stage:<9} {n:>5} cells, {d:>5} done, to go: ~{format_seconds(secs)} on 2 CPU "
            f"cores, ~{format_seconds(gsecs)} on one H100{note}"
        )
        cpu_left += secs
        gpu_left += gsecs
    lines.append(
        f"total: {len(cells)} cells, ~{format_seconds(cpu_left)} of work left on 2 CPU cores, "
        f"~{format_seconds(gpu_left)} on one H100 (divide by the GPU count under torchrun); "
        "rough estimates from anchors.md throughputs"
    )
    return "\n".join(lines)
