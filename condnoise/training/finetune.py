"""ControlNet / T2I-Adapter fine-tuning of a frozen base run (``condnoise finetune``; paper
Sec. 5, "Downstream personalization": ControlNet and T2I-Adapter on Canny edges and
segmentation masks, 10 epochs on ImageNet-100, of clean, corrupted and CEP bases).

An adapter run is a training run: ``config.yaml`` (the base's config with ``model.adapter``,
``model.perturbation``, fine-tuning ``train`` settings and a ``finetune`` section: base run,
step, control), ``run.json``, ``metrics.jsonl``, ``checkpoints/step_*/{model,ema}.safetensors``
(base + adapter; the base's weights stay those of its checkpoint) and ``samples/step_*.png``
(control | samples grids). :class:`Finetuner` is the :class:`Trainer` with another model
set-up: the base's weights, the adapter's trainable copy, the base frozen and only the
adapter in the optimizer; data order, DDP, checkpoints, bitwise resume on CPU, logging,
progress and the run-folder lock are the trainer's, and each batch carries its control
(``TrainData.attach_control``) into the ordinary diffusion loss.

CEP in fine-tuning (``--perturb cep-u|cep-g``): the perturbation of the run's model acts
on the condition embedding that feeds both the frozen base and the adapter, in training
mode only (as in pre-training, paper Sec. 3); the base's own pre-training perturbation is
replaced (none by default).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from condnoise.errors import UserError
from condnoise.training.config import Config, apply_overrides
from condnoise.training.ema import EMA
from condnoise.training.trainer import SampleHook, Trainer, TrainResult, run_locked

#: the base's ``train`` settings a fine-tuning run replaces (diffusers' train_controlnet.py:
#: constant LR without warm-up; 1e-4 rather than its 1e-5 because our adapters are small
#: and trained for few steps); batch, seed, precision, EMA and cadence stay the base's
FINETUNE_TRAIN: dict[str, Any] = {"steps": 1000, "lr": 1e-4, "warmup": 0, "lr_schedule": "constant"}
#: model fields a fine-tuning run may change: everything else is the base's architecture
FINETUNE_FIELDS = ("perturbation", "cfg_dropout", "adapter", "checkpointing")
PERTURBATIONS = ("none", "cep-u", "cep-g")


def finetune_config(
    base_dir: str | Path,
    *,
    adapter: dict[str, Any],
    control: str = "canny",
    perturbation: dict[str, Any] | None = None,
    finetune: dict[str, Any] | None = None,
    epochs: float | None = None,
    overrides: list[str] | None = None,
    run_dir: str | Path | None = None,
) -> Config:
    """The config of an adapter on the run in ``base_dir``: the base's data, model and
    diffusion sections; ``model.adapter`` (``adapter``: ``kind`` controlnet / t2i-adapter,
    ``t2i_type``, ``num_res_blocks``; the control's channels and the image-to-denoiser
    downscale are filled in); ``model.perturbation`` (default none); the base's ``train``
    section with :data:`FINETUNE_TRAIN` (``epochs``: ``train.steps`` = ceil(epochs x samples
    / batch)); ``finetune`` (base step, default its latest; canny thresholds); then the
    dotted ``overrides``."""
    from condnoise.data.controls import Control
    from condnoise.data.sources import open_source
    from condnoise.models.adapters import check_family
    from condnoise.training.checkpoint import list_checkpoints
    from condnoise.training.rundir import read_run_config, read_run_info

    base_dir = Path(base_dir).resolve()
    if not base_dir.is_dir():
        raise UserError(f"base run not found: {base_dir}")
    base = read_run_config(base_dir)
    if base.distill is not None or base.finetune is not None:
        kind = "a distilled student" if base.distill is not None else "an adapter's run"
        raise UserError(f"{base_dir} is {kind}; fine-tune a diffusion model's run")
    check_family(base.model.family, f"base run {base_dir}")
    pert = dict(perturbation or {"name": "none"})
    if pert.get("name") not in PERTURBATIONS:
        raise UserError(f"fine-tuning perturbation {pert.get('name')!r}: choose one of "
                        f"{', '.join(PERTURBATIONS)}")
    info = read_run_info(base_dir)
    try:
        downscale = int(info["image_shape"][-1]) // int(info["latent_shape"][-1])
    except (KeyError, TypeError, ValueError, IndexError, ZeroDivisionError):
        raise UserError(f"{base_dir / 'run.json'}: missing or invalid image_shape / "
                        "latent_shape") from None
    steps = list_checkpoints(base_dir)
    if not steps:
        raise UserError(f"base run {base_dir} has no checkpoint yet (train it longer)")
    raw = apply_overrides(base.to_dict(), [o for o in overrides or [] if o.startswith("data.")])
    d = raw["data"]
    source = open_source(d["source"], d["split"], data_dir=d["data_dir"], image_size=d["image_size"])
    f = {"base": str(base_dir), "control": control, **(finetune or {})}
    ctl = Control.for_source(control, source, low=f.get("canny_low", 100.0), high=f.get("canny_high", 200.0))
    f["base_step"] = steps[-1] if f.get("base_step") is None else f["base_step"]
    if f["base_step"] not in steps:
        raise UserError(f"base run {base_dir} has no checkpoint for step {f['base_step']}; "
                        f"kept steps: {steps}")
    raw["model"].update(perturbation=pert, adapter={**adapter, "control_channels": ctl.channels,
                                                    "downscale": downscale})  # fmt: skip
    raw["train"].update(FINETUNE_TRAIN)
    if epochs is not None:
        n = min(len(source), d["max_samples"] or len(source))
        raw["train"]["steps"] = max(1, math.ceil(epochs * n / raw["train"]["batch_size"]))
    raw["finetune"] = f
    kind = adapter.get("kind", "controlnet")
    raw["run"].update(name=f"{base.run.name or base_dir.name}-{kind}-{control}",
                      dir=None if run_dir is None else str(run_dir))  # fmt: skip
    raw = apply_overrides(raw, overrides)
    cfg = Config.from_dict(raw, origin=f"fine-tuning config of {base_dir}")
    _check_like_base(cfg, base, base_dir)
    return cfg.validate(f"fine-tuning config of {base_dir}")


def _check_like_base(cfg: Config, base: Config, base_dir: Path) -> None:
    """The adapter run keeps the base's architecture and diffusion process."""
    for mine, theirs in ((cfg.model.to_dict(), base.model.to_dict()),  # what was set, then
                         (cfg.model.resolved(), base.model.resolved())):  # what follows  # fmt: skip
        for key in sorted(set(mine) | set(theirs)):
            if key not in FINETUNE_FIELDS and mine.get(key) != theirs.get(key):
                raise UserError(f"fine-tuning model.{key} is {mine.get(key)!r} but the base's ({base_dir}) "
                                f"is {theirs.get(key)!r}: the base is frozen as trained")  # fmt: skip
    a, b = cfg.diffusion.__dict__, base.diffusion.__dict__
    for key in ("schedule", "num_steps", "beta_start", "beta_end", "prediction"):
        if a[key] != b[key]:
            raise UserError(f"fine-tuning diffusion.{key} is {a[key]!r} but the base's is {b[key]!r}")


def copy_base_weights(model: torch.nn.Module, base: torch.nn.Module) -> None:
    """Load the base's weights into the controlled model; only ``adapter.*`` may be missing."""
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
    rest = sorted(k for k in missing if not k.startswith("adapter.")) + sorted(unexpected)
    if rest:
        raise UserError(f"the adapter's model does not fit its base's weights (first mismatch: "
                        f"{rest[0]})")


class Finetuner(Trainer):
    """The trainer with an adapter on a frozen base (module docstring).

    Extra attributes: ``control`` (the :class:`~condnoise.data.controls.Control` of the data),
    ``base_step`` (the base checkpoint). The EMA covers the whole model; the frozen base's
    weights are left exactly unchanged by it (``lerp(a, a, w) = a``).
    """

    progress_desc = "finetune"

    def _build_data(self, data: Any) -> None:
        from condnoise.data.controls import Control

        super()._build_data(data)
        f, a = self.cfg.finetune, self.cfg.model.adapter
        if f is None or a is None:
            raise UserError("Finetuner needs a config with finetune and model.adapter sections "
                            "(finetune_config)")
        if self.data.streaming:
            raise UserError(f"data.source {self.cfg.data.source!r} streams; fine-tuning needs an "
                            "indexable source (its grids show the first training images' controls)")
        self.control = Control.for_source(f.control, self.data.dataset, low=f.canny_low, high=f.canny_high)
        if self.control.channels != a.control_channels:
            raise UserError(f"control {f.control} of {self.cfg.data.source!r} has {self.control.channels} "
                            f"channel(s), model.adapter.control_channels is {a.control_channels}")  # fmt: skip
        self.data.attach_control(self.control)

    def _build_model(self) -> None:
        from condnoise.training.runtime import load_run

        f = self.cfg.finetune
        super()._build_model()  # autoencoder, schedule, base + adapter (their weights below)
        assert f is not None  # _build_data
        run = load_run(f.base, ema=f.base_weights == "ema", device=self.device, step=f.base_step)
        if tuple(run.latent_shape) != tuple(self.latent_shape):
            raise UserError(f"base {f.base} works on {list(run.latent_shape)} inputs, the "
                            f"fine-tuning data gives {list(self.latent_shape)} (data.image_size)")
        copy_base_weights(self.model, run.model)
        self.model.adapter.copy_base(self.model.denoiser)  # ControlNet's trainable copy
        self.model.freeze_base()  # type: ignore[operator]
        self.base_step = run.step
        self.ema = EMA(self.model, self.cfg.train.ema_decay, warmup=self.cfg.train.ema_warmup)

    def _trainable_parameters(self) -> list[torch.nn.Parameter]:
        return list(self.model.adapter.parameters())  # type: ignore[union-attr]

    def _run_info(self) -> dict[str, Any]:
        f, a = self.cfg.finetune, self.cfg.model.adapter
        assert f is not None and a is not None  # _build_data
        return {**super()._run_info(), "finetuned_from": {
            "base": f.base, "base_step": self.base_step, "base_weights": f.base_weights,
            "adapter": a.kind, "control": self.control.settings()}}  # fmt: skip


def control_grid_rows(control: Any, natives: np.ndarray, samples: np.ndarray, per_row: int) -> np.ndarray:
    """uint8 ``[rows x (1 + per_row), H, W, C]``: each row's control picture, then its samples."""
    pics = control.to_rgb(natives, samples.shape[-1])
    rows = [np.concatenate([pics[r : r + 1], samples[r * per_row : (r + 1) * per_row]])
            for r in range(len(pics))]  # fmt: skip
    return np.concatenate(rows)


def write_control_grid(trainer: Finetuner, step: int) -> Path:
    """``samples/step_{step}.png``: one row per training item among the first 8 (its control,
    then ``sample_per_class`` EMA samples with that control and the item's condition, CFG
    ``train.sample_guidance``), labelled with the item's class name or caption."""
    from condnoise.diffusion.grids import save_labelled_grid
    from condnoise.diffusion.sampling import generate

    t = trainer.cfg.train
    images, conds = trainer.data.first_items(8)
    natives = trainer.control.native(images, torch.arange(len(images)))
    per = t.sample_per_class
    controls = trainer.control.encode(natives).repeat_interleave(per, dim=0)
    samples = generate(
        trainer.ema.module, trainer.schedule, trainer.autoencoder, range(len(controls)),
        conds.cpu().numpy().repeat(per, axis=0), shape=trainer.latent_shape, guidance=t.sample_guidance,
        sampler=t.sample_sampler, steps=min(t.sample_steps, trainer.schedule.num_steps), seed=t.seed,
        batch_size=len(controls), clip_x0=trainer.latent_shape == trainer.image_shape,
        precision="bf16" if trainer.autocast_dtype == torch.bfloat16 else "fp32", controls=controls,
    )  # fmt: skip
    if trainer.cfg.model.is_text:
        labels = [str(c) for c in trainer.data.dataset.conditions()[: len(images)]]
    else:
        names = trainer.data.meta.class_names
        labels = [str(names[int(c)]) if names else str(int(c)) for c in conds]
    path = trainer.run_dir / "samples" / f"step_{step:08d}.png"
    grid = control_grid_rows(trainer.control, natives, samples, per)
    save_labelled_grid(grid, labels, path, nrow=per + 1)
    return path


def finetune(
    cfg: Config,
    *,
    run_dir: str | Path | None = None,
    resume: bool = False,
    device: str | None = None,
    sample_hook: SampleHook | None = write_control_grid,  # type: ignore[assignment]
    force: bool = False,
    status: Callable[[str], None] | None = None,
    lock_timeout: float | None = None,
    lock_wait: float = 0.0,
) -> TrainResult:
    """Fine-tune the adapter of ``cfg`` (:func:`finetune_config`) in ``run_dir``, under its
    lock (rank 0; stale after ``lock_timeout`` seconds of silence, a live holder waited for up to ``lock_wait``); resumable like
    :func:`~condnoise.training.train`."""
    if cfg.finetune is None:
        raise UserError("finetune: the config has no finetune section (build it with finetune_config)")
    return run_locked(Finetuner, "finetune", copy.deepcopy(cfg), run_dir=run_dir, resume=resume,
                      device=device, sample_hook=sample_hook, force=force, status=status,
                      lock_timeout=lock_timeout, lock_wait=lock_wait)  # fmt: skip

