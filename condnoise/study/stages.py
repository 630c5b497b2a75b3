"""What each cell does, through the other stages' Python APIs (no subprocesses).

Each function takes ``(cell, cell_dir, dep_dirs, ctx)``, writes its outputs under
``cell_dir`` and returns a small dict stored in the cell's ``done.json``. Folder layout::

    cells/autoencoder/KEY/run/           the study's autoencoder run (condnoise.study.latent)
    cells/corrupt/KEY/manifest/          condnoise.data Manifest (paper section 2)
    cells/train/KEY/run/                 a training run directory (config.yaml, checkpoints/)
    cells/train/KEY/shift.json           mean L2 embedding shift (paper Fig. 8a x-axis)
    cells/distill/KEY/run/               an LCM student's run (condnoise distill lcm's trainer)
    cells/finetune/KEY/run/              an adapter's run (condnoise finetune's trainer)
    cells/sample/KEY/s{scale}/samples.npz  images uint8 [N,H,W,C], labels int64 [N]
    cells/evaluate/KEY/metrics.json      the evaluation stage's metrics for that sample set
    cells/evaluate/KEY/per_sample.npz    its per-sample scores (RMD, training-set distances)
    cells/walk/KEY/grid.png, walk.png    per-class sample grid and circular walk (text
                                         models: grid.png, one row per caption, prompts.json)
    cells/theory/KEY/*.png               the theory lab's figures
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from condnoise.errors import UserError
from condnoise.study.latent import run_autoencoder
from condnoise.study.spec import deep_merge

if TYPE_CHECKING:
    from condnoise.study.grid import Cell
    from condnoise.study.runner import RunContext


def cell_device(ctx: RunContext) -> str:
    """The cell's device (``--device``, else cuda:LOCAL_RANK when present), all cores."""
    import os

    from condnoise.training.runtime import pick_device, use_all_cores

    use_all_cores()
    return str(pick_device(int(os.environ.get("LOCAL_RANK", "0")), ctx.device))


# --------------------------------------------------------------------------- corrupt


def run_corrupt(cell: Cell, cell_dir: Path, deps: dict[str, Path], ctx: RunContext) -> dict:
    """Fixed condition corruption of the training split (section 2), saved as a manifest."""
    from condnoise.data import corrupt, open_source

    data, corr = cell.config["data"], dict(cell.config["corruption"])
    source = open_source(
        data["source"], "train", data_dir=data.get("data_dir"), image_size=data.get("image_size")
    )
    kind, eta = corr.pop("kind"), float(corr.pop("eta"))
    manifest = corrupt(source, kind, eta, int(cell.config["seed"]), **corr)
    summary = manifest.save(cell_dir / "manifest", source.conditions(), force=True,
                            config=cell.config)  # fmt: skip
    return {"kind": kind, "eta": eta, "n_corrupted": summary.get("n_corrupted")}


# --------------------------------------------------------------------------- train


def trainer_config(cell: Cell, cell_dir: Path, deps: dict[str, Path]) -> dict[str, Any]:
    """The trainer's config mapping (``condnoise.training.config.Config``) for a train cell:
    the cell's trainer sections, its seed, no sample grids (the walk cell draws them)."""
    c = cell.config
    data = {k: v for k, v in c["data"].items() if k in ("source", "image_size", "data_dir",
                                                          "max_samples")}  # fmt: skip
    if c.get("corrupt_key"):
        data["corruption"] = str(deps["corrupt"] / "manifest")
    model = {**c["model"], "perturbation": dict(c["perturbation"])}
    if c.get("autoencoder_key"):  # the study's autoencoder cell (condnoise.study.latent)
        from condnoise.study.latent import folder

        model["autoencoder"] = {**model["autoencoder"], "path": str(folder(deps["autoencoder"]))}
    raw = deep_merge(c["train"], {
        "data": data, "model": model, "train": {"seed": int(c["seed"]), "sample_every": 0},
    })  # fmt: skip
    raw["run"] = {"name": cell.id.replace("/", "-"), "dir": str(cell_dir / "run"),
                  "tensorboard": False}  # fmt: skip
    return raw


def _has_checkpoint(run_dir: Path) -> bool:
    from condnoise.training.checkpoint import list_checkpoints

    return (run_dir / "config.yaml").is_file() and bool(list_checkpoints(run_dir))


def fit_in_cell(cell_dir: Path, ctx: RunContext, build: Callable[[], Any],
                fit: Callable[..., Any]) -> bool:  # fmt: skip
    """Run a trainer (``fit``: ``training.train`` or ``training.distill``) on the config
    ``build()`` makes, in ``cell_dir/run``; whether this process is rank 0.

    Resumes from the run's last checkpoint when there is one (a cell taken over from a
    stopped worker, or rerun after a kill). Inside a multi-task cluster job (the torchrun
    variables set, :mod:`condnoise.study.submit`) every task trains in one process group
    and rank 0 alone writes the cell's files."""
    from condnoise.training.runtime import barrier, init_distributed

    run_dir = cell_dir / "run"
    device = cell_device(ctx)
    dist = init_distributed(device)  # a no-op outside multi-task jobs
    resume = _has_checkpoint(run_dir)
    barrier(dist)  # every rank decided before rank 0 may clear the folder
    if dist.is_main and run_dir.exists() and not resume:
        shutil.rmtree(run_dir)  # started but no checkpoint yet: start over
    barrier(dist)
    cfg = build()
    cfg.run.progress = ctx.progress
    # a cell just taken over from a stopped worker: that worker's run lock goes stale a
    # moment after its cell lock did, so wait for it rather than fail
    fit(cfg, run_dir=run_dir, resume=resume, device=device, lock_timeout=ctx.lock_timeout,
        lock_wait=ctx.lock_timeout)
    return bool(dist.is_main)


def run_train(cell: Cell, cell_dir: Path, deps: dict[str, Path], ctx: RunContext) -> dict:
    """Train one model (section 4 recipe at the study's scale), then measure its shift
    (resumable and multi-task: :func:`fit_in_cell`)."""
    from condnoise.training import train
    from condnoise.training.config import Config

    def build() -> Config:
        return Config.from_dict(trainer_config(cell, cell_dir, deps), origin=f"study cell {cell.id}")

    if not fit_in_cell(cell_dir, ctx, build, train):
        return {}
    from condnoise.study.shift import embedding_shift

    shift = embedding_shift(cell_dir / "run", manifest_dir=deps.get("corrupt"),
                            seed=int(cell.config["seed"]))
    from condnoise.io import write_json

    write_json(cell_dir / "shift.json", shift)
    return {"mean_l2_shift": shift["mean_l2_shift"]}


# --------------------------------------------------------------------------- distill


def student_overrides(cell: Cell) -> list[str]:
    """Dotted overrides of a derived model's config (``training.distill.student_config``,
    ``training.finetune.finetune_config``): the variant's ``train`` settings, the cell's
    seed, no sample grids, no TensorBoard."""
    import json

    s = cell.config["settings"]
    train = {**s.get("train", {}), "seed": int(cell.config["seed"]), "sample_every": 0}
    return ([f"train.{k}={json.dumps(v)}" for k, v in train.items()]
            + ["run.tensorboard=false", f"run.name={json.dumps(cell.id.replace('/', '-'))}"])  # fmt: skip


def run_distill(cell: Cell, cell_dir: Path, deps: dict[str, Path], ctx: RunContext) -> dict:
    """Latent consistency distillation of the parent's model into a few-step student (Luo et
    al. 2023; paper Sec. 4, Table 1), through ``condnoise distill lcm``'s trainer; the
    student's CEP (``settings.perturbation``) acts on its condition only, never on the
    target network. Resumable and multi-task like :func:`run_train`."""
    from condnoise.training.distill import distill, student_config

    s, teacher = cell.config["settings"], model_run_dir(deps)

    def build() -> Any:
        return student_config(teacher, perturbation=s["perturbation"], lcm=s["lcm"],
                              distill=s["distill"], overrides=student_overrides(cell),
                              run_dir=cell_dir / "run")  # fmt: skip

    fit_in_cell(cell_dir, ctx, build, distill)
    return {}


def run_finetune(cell: Cell, cell_dir: Path, deps: dict[str, Path], ctx: RunContext) -> dict:
    """A ControlNet / T2I-Adapter on the parent's frozen model (paper Sec. 5, downstream
    personalization), through ``condnoise finetune``'s trainer, with the variant's CEP
    during fine-tuning (``settings.perturbation``). The adapter learns from the study's
    data section with its clean conditions (``data.corruption`` dropped: a corrupted base's
    corruption is its pre-training's, not the downstream data's; a ``pretrained`` base may
    come from other data, e.g. ImageNet-1K for ImageNet-100). Resumable and multi-task like
    :func:`run_train`."""
    import json

    from condnoise.training.finetune import finetune, finetune_config

    s, base = cell.config["settings"], model_run_dir(deps)
    data = {k: v for k, v in cell.config["data"].items() if k in ("source", "image_size", "data_dir",
                                                                   "max_samples")}  # fmt: skip
    overrides = [f"data.{k}={json.dumps(v)}" for k, v in data.items()] + ["data.corruption=null"]

    def build() -> Any:
        return finetune_config(base, adapter=s["adapter"], control=s["control"],
                               perturbation=s["perturbation"], finetune=s["finetune"],
                               epochs=s.get("epochs"), run_dir=cell_dir / "run",
                               overrides=[*overrides, *student_overrides(cell)])  # fmt: skip

    fit_in_cell(cell_dir, ctx, build, finetune)  # no sample grids: train.sample_every 0
    return {}


def run_pretrained(cell: Cell, cell_dir: Path, deps: dict[str, Path], ctx: RunContext) -> dict:
    """A model trained outside the study: check that ``settings.path`` is a condnoise run
    with a checkpoint; its cells use that folder (``run_dir`` of the done marker)."""
    from condnoise.training.checkpoint import list_checkpoints
    from condnoise.training.rundir import read_run_config

    path = Path(cell.config["settings"]["path"]).resolve()
    where = f"study cell {cell.id}: pretrained.path {path}"
    if (path / "model_index.json").is_file():
        raise UserError(f"{where} is a diffusers pipeline folder; a study's pretrained model must be "
                        "a condnoise run (config.yaml, checkpoints/): condnoise does not import "
                        "Stable Diffusion pipelines as runs")  # fmt: skip
    if not (path / "config.yaml").is_file():
        raise UserError(f"{where} is not a condnoise run folder (no config.yaml)")
    read_run_config(path)
    if not list_checkpoints(path):
        raise UserError(f"{where} has no checkpoint")
    return {"run_dir": str(path)}


def model_run_dir(deps: dict[str, Path]) -> Path:
    """The run folder of the model a cell depends on (a train or derived cell's ``run/``, a
    pretrained cell's given folder)."""
    from condnoise.study.cache import read_done
    from condnoise.study.grid import MODEL_STAGES

    found = [(s, deps[s]) for s in MODEL_STAGES if s in deps]
    if len(found) != 1:
        raise UserError(f"a sample / walk / derived cell depends on one model cell, got {sorted(deps)}")
    stage, folder = found[0]
    return Path(read_done(folder)["run_dir"]) if stage == "pretrained" else folder / "run"


# --------------------------------------------------------------------------- sample


def run_sample(cell: Cell, cell_dir: Path, deps: dict[str, Path], ctx: RunContext) -> dict:
    """One guidance scale of the sweep (section 5): ``s{scale}/samples.npz``; with
    ``controls`` (a controlled model or its reference), sample i gets the control and the
    condition of the split's item ``i % P`` (``condnoise sample --controls-from``); with
    ``prompts`` (a text model), caption ``i % P`` of the split (``--captions-from``)."""
    from condnoise.diffusion.sampling import SweepConfig, run_sweep
    from condnoise.study.text import sample_prompts
    from condnoise.training.rundir import read_run_config
    from condnoise.training.runtime import load_run
    from condnoise.training.splits import split_controls

    s, c = cell.config["sample"], cell.config.get("controls")
    run_dir = model_run_dir(deps)
    ctl, classes, prompts = None, "balanced", None
    if c is not None:
        ctl, labels, prompts = split_controls(read_run_config(run_dir), c["split"], int(s["num_samples"]),
                                              kind=c["kind"])  # fmt: skip
        classes = labels if labels is not None else "balanced"
    else:  # text studies: paired captions (study/text.py)
        prompts = sample_prompts(cell, ctx)
    run = load_run(run_dir, device=cell_device(ctx))
    cfg = SweepConfig(
        guidances=[float(cell.config["scale"])],
        num=int(s["num_samples"]),
        sampler=str(s.get("sampler", "dpm++")),
        steps=int(s["steps"]),
        seed=int(cell.config["seed"]),
        batch_size=int(s.get("batch_size", 256)),
        shard_size=max(int(s.get("batch_size", 256)), 1000),
        grid_per_class=8,
        clip_x0=bool(s.get("clip_x0", False)),
        classes=classes,
        prompts=prompts,
        controls=ctl,
    )
    (folder,) = run_sweep(run, run_dir, cell_dir, cfg, progress=ctx.progress)
    return {"samples": str(folder.relative_to(cell_dir) / "samples.npz")}


def samples_path(sample_cell_dir: Path, scale: float) -> Path:
    return sample_cell_dir / f"s{scale:g}" / "samples.npz"


# --------------------------------------------------------------------------- evaluate


STUDY_METRICS = ("fid", "pr", "dc", "is", "condition-accuracy", "rmd", "knn-l2", "memorization")
PER_SAMPLE_FILE = "per_sample.npz"  # {"rmd@EXTRACTOR": float32 [N], ...}


def run_evaluate(cell: Cell, cell_dir: Path, deps: dict[str, Path], ctx: RunContext) -> dict:
    """Every metric that applies to the sample set (section 5) into ``metrics.json``, and
    the per-sample scores behind them (``per_sample.npz``: RMD for Fig. 5, nearest
    training-feature distances), as the evaluation computed them."""
    from condnoise.evaluation.evaluate import evaluate_samples, load_samples
    from condnoise.io import atomic_open, write_json

    scale = float(ctx.cells[cell.deps[0]].config["scale"])
    cell_device(ctx)
    samples, cfg = load_samples(samples_path(deps["sample"], scale).parent), eval_config(cell.config)
    autoencoder = None
    if "entropy" in cfg.metrics:  # over the run's VQ codebook (paper Sec. 5)
        from condnoise.training.runtime import load_vq_autoencoder

        autoencoder = load_vq_autoencoder(samples.meta.get("run_dir"))
    result = evaluate_samples(samples, cfg, progress=ctx.progress, autoencoder=autoencoder)
    write_json(cell_dir / "metrics.json", result.record)
    with atomic_open(cell_dir / PER_SAMPLE_FILE, "wb") as f:
        np.savez(f, **result.score_arrays())
    return {}


def eval_config(config: dict[str, Any]) -> Any:
    """The ``EvalConfig`` of an evaluate cell: reference = ``evaluate.reference``, else the
    data source's ``reference_split``."""
    from condnoise.evaluation.evaluate import EvalConfig

    e, source = config["evaluate"], config["data"]["source"]
    return EvalConfig(
        ref=e.get("reference") or f"{source}:{e.get('reference_split', 'test')}",
        train_ref=f"{source}:train",
        extractors=tuple(e["extractors"]),
        metrics=tuple(e.get("metrics") or STUDY_METRICS),
        max_ref=e.get("reference_samples"),
        max_train=e.get("train_samples"),
        shrinkage=float(e.get("shrinkage", 0.0)),
        entropy_tau=float(e.get("entropy_tau", 1.0)),  # sample entropy (VQ latents, Sec. 5)
        entropy_pool=int(e.get("entropy_pool", 32768)),
    )


# --------------------------------------------------------------------------- walk / grids


WALK_CLASSES = 3  # one circular walk (row) for each of the first classes


def run_walk(cell: Cell, cell_dir: Path, deps: dict[str, Path], ctx: RunContext) -> dict:
    """A per-class sample grid and a circular walk in noise space for one model."""
    from condnoise.diffusion.sampling import sample_grid
    from condnoise.training.runtime import load_run

    c = cell.config
    run = load_run(model_run_dir(deps), device=cell_device(ctx))
    if c["sample"].get("captions_from"):  # a text model: one row per caption, no walks
        from condnoise.study.text import run_text_grid

        return run_text_grid(cell, cell_dir, run, ctx.cells[cell.deps[0]].config["data"])
    steps = int(c["sample"]["steps"])
    sampler = str(c["sample"].get("sampler", "dpm++"))
    sample_grid(
        run.model, run.schedule, run.num_classes, int(c["grid_per_class"]),
        cell_dir / "grid.png", shape=run.latent_shape, guidance=float(c["scale"]),
        steps=steps, seed=int(c["seed"]), sampler=sampler, autoencoder=run.autoencoder,
        clip_x0=bool(c["sample"].get("clip_x0", False)), row_labels=[str(n) for n in run.class_names] or None,
    )  # fmt: skip
    from condnoise.diffusion.grids import save_labelled_grid
    from condnoise.diffusion.walk import noise_walk

    frames = int(c["frames"])
    rows = []
    for k in range(min(WALK_CLASSES, run.num_classes)):
        images, _ = noise_walk(
            run.model, run.schedule, run.autoencoder, k, shape=run.latent_shape, frames=frames,
            seed=int(c["seed"]), guidance=float(c["scale"]), sampler=sampler, steps=steps,
            clip_x0=bool(c["sample"].get("clip_x0", False)),
        )  # fmt: skip
        rows.append(images)
    save_labelled_grid(np.concatenate(rows), [str(n) for n in run.class_names[:len(rows)]],
                       cell_dir / "walk.png", nrow=frames)  # fmt: skip
    return {}


# --------------------------------------------------------------------------- theory


def run_theory(cell: Cell, cell_dir: Path, deps: dict[str, Path], ctx: RunContext) -> dict:
    """The Gaussian-mixture theory lab (section 7): closed forms vs simulation, figures."""
    from condnoise.theory import GMMLabConfig, run_gmm_lab

    fields = dict(cell.config.get("lab") or {})
    fields.setdefault("seed", int(cell.config["seed"]))
    try:
        lab_cfg = GMMLabConfig(**fields)
    except TypeError as e:
        raise UserError(f"study report.theory: bad theory-lab field ({e})") from None
    result = run_gmm_lab(lab_cfg, cell_dir / "lab", progress=ctx.progress)
    return {
        "figures": [str(Path(p).relative_to(cell_dir)) for p in result.figures],
        "all_within_tolerance": bool(result.all_within_tolerance),
    }


def read_metrics(eval_dir: Path) -> dict[str, Any]:
    from condnoise.io import read_json

    return read_json(eval_dir / "metrics.json")


STAGE_FUNCTIONS = {
    "autoencoder": run_autoencoder,
    "corrupt": run_corrupt,
    "train": run_train,
    "pretrained": run_pretrained,
    "distill": run_distill,
    "finetune": run_finetune,
    "sample": run_sample,
    "evaluate": run_evaluate,
    "walk": run_walk,
    "theory": run_theory,
}
