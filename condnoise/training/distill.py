"""Latent consistency distillation runs (``condnoise distill lcm``; Luo et al. 2023).

A student run is a training run: ``config.yaml`` (the teacher's config with the student's
``model.lcm`` guidance embedding, its ``model.perturbation``, LCD ``train`` settings and a
``distill`` section), ``run.json``, ``provenance.json``, ``metrics.jsonl``,
``checkpoints/step_*/{model,ema}.safetensors`` (``model`` = the online student, ``ema`` = the
target network, what ``load_run`` and ``condnoise sample`` use by default) and
``samples/step_*.png`` (LCM grids). :class:`Distiller` is the :class:`Trainer` with another
model set-up and loss, so data order, DDP, checkpoints, bitwise resume on CPU, logging,
progress and the run-folder lock are the trainer's.

The paper's CEP placements (Sec. 4, Table 1: an LCM of a CEP-U pre-trained SD1.5): CEP on the
student's condition during distillation (``model.perturbation`` of the student config,
``--perturb``), a teacher pre-trained with CEP (its perturbation is a training-time one:
the frozen teacher is used in eval mode, unperturbed), or both. The target network is never
perturbed: its perturbation's explicit ``enabled`` flag is off, whatever its mode.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from condnoise import rng
from condnoise.errors import UserError
from condnoise.training.config import Config, apply_overrides
from condnoise.training.ema import EMA
from condnoise.training.trainer import (
    SampleHook,
    Trainer,
    TrainResult,
    run_locked,
    write_sample_grid,
)

#: the teacher's ``train`` settings that an LCD run replaces (diffusers'
#: train_lcm_distill_sd_wds.py: lr 1e-4, constant, target EMA 0.95 without warm-up; LCM
#: grids at 4 steps); the others (batch, seed, precision, cadence, ...) stay the teacher's
LCD_TRAIN: dict[str, Any] = {
    "steps": 1000, "lr": 1e-4, "warmup": 0, "lr_schedule": "constant", "ema_decay": 0.95,
    "ema_warmup": False, "sample_sampler": "lcm", "sample_steps": 4,
}  # fmt: skip
#: model fields a student may change (checkpointing only trades memory for compute):
#: everything else must be the teacher's architecture
STUDENT_FIELDS = ("perturbation", "cfg_dropout", "lcm", "checkpointing")
PERTURBATIONS = ("none", "cep-u", "cep-g")


def student_config(
    teacher_dir: str | Path,
    *,
    perturbation: dict[str, Any] | None = None,
    lcm: dict[str, Any] | None = None,
    distill: dict[str, Any] | None = None,
    overrides: list[str] | None = None,
    run_dir: str | Path | None = None,
) -> Config:
    """The config of an LCM student of the run in ``teacher_dir``: the teacher's data, model
    and diffusion sections; ``model.lcm`` (``lcm``: ``w_embed_dim``, ``solver_steps``),
    ``model.perturbation`` (default none; cep-u / cep-g: CEP on the student's condition),
    ``model.cfg_dropout`` 0 (guidance comes from the guidance embedding); the teacher's
    ``train`` section with :data:`LCD_TRAIN`; ``distill`` (``distill``: guidance range, loss,
    teacher checkpoint; the teacher's latest step unless ``teacher_step`` is given); then the
    dotted ``overrides`` (``train.lr=5e-5``, ``data.max_samples=1000``)."""
    from condnoise.training.checkpoint import list_checkpoints
    from condnoise.training.rundir import read_run_config

    teacher_dir = Path(teacher_dir).resolve()
    if not teacher_dir.is_dir():
        raise UserError(f"teacher run not found: {teacher_dir}")
    teacher = read_run_config(teacher_dir)
    if teacher.distill is not None:
        raise UserError(f"{teacher_dir} is a distilled student; distill from a diffusion model's run")
    pert = dict(perturbation or {"name": "none"})
    if pert.get("name") not in PERTURBATIONS:
        raise UserError(f"student perturbation {pert.get('name')!r}: choose one of {', '.join(PERTURBATIONS)}")
    raw = teacher.to_dict()
    raw["model"].update(perturbation=pert, cfg_dropout=0.0, lcm=dict(lcm or {}))
    raw["train"].update(LCD_TRAIN)
    raw["train"]["sample_steps"] = min(LCD_TRAIN["sample_steps"], int(raw["model"]["lcm"].get("solver_steps", 50)))
    steps = list_checkpoints(teacher_dir)
    if not steps:
        raise UserError(f"teacher {teacher_dir} has no checkpoint yet (train it longer)")
    d = {"method": "lcm", "teacher": str(teacher_dir), **(distill or {})}
    d["teacher_step"] = steps[-1] if d.get("teacher_step") is None else d["teacher_step"]
    if d["teacher_step"] not in steps:
        raise UserError(f"teacher {teacher_dir} has no checkpoint for step {d['teacher_step']}; kept "
                        f"steps: {steps}")  # fmt: skip
    raw["distill"] = d
    raw["run"].update(name=f"{teacher.run.name or teacher_dir.name}-lcm",
                      dir=None if run_dir is None else str(run_dir))  # fmt: skip
    raw = apply_overrides(raw, overrides)
    cfg = Config.from_dict(raw, origin=f"student config of {teacher_dir}")
    _check_like_teacher(cfg, teacher, teacher_dir)
    return cfg.validate(f"student config of {teacher_dir}")


def _check_like_teacher(cfg: Config, teacher: Config, teacher_dir: Path) -> None:
    """The student keeps the teacher's architecture and diffusion process."""
    for mine, theirs in ((cfg.model.to_dict(), teacher.model.to_dict()),  # what was set, then
                         (cfg.model.resolved(), teacher.model.resolved())):  # what follows  # fmt: skip
        for key in sorted(set(mine) | set(theirs)):
            if key not in STUDENT_FIELDS and mine.get(key) != theirs.get(key):
                raise UserError(f"student model.{key} is {mine.get(key)!r} but the teacher's ({teacher_dir}) "
                                f"is {theirs.get(key)!r}: a student copies its teacher's architecture")  # fmt: skip
    a, b = cfg.diffusion.__dict__, teacher.diffusion.__dict__
    for key in ("schedule", "num_steps", "beta_start", "beta_end", "prediction"):
        if a[key] != b[key]:
            raise UserError(f"student diffusion.{key} is {a[key]!r} but the teacher's is {b[key]!r}: "
                            "distillation follows the teacher's diffusion process")  # fmt: skip


def copy_teacher_weights(student: torch.nn.Module, teacher: torch.nn.Module) -> list[str]:
    """Load the teacher's weights into the student; only the guidance-embedding projection
    (``cond_proj`` / ``w_proj``, zero-initialised) may be missing. Returns its names."""
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    new = [k for k in missing if k.endswith(("cond_proj.weight", "w_proj.weight"))]
    rest = sorted(set(missing) - set(new)) + sorted(unexpected)
    if rest or not new:
        raise UserError(f"the student does not fit its teacher's weights (first mismatch: "
                        f"{rest[0] if rest else 'no guidance embedding in the student'})")  # fmt: skip
    return new


class Distiller(Trainer):
    """The trainer with LCM distillation's models and loss (:mod:`condnoise.diffusion.consistency`).

    Extra attributes: ``teacher`` (the frozen teacher model, eval mode), ``teacher_step``;
    ``ema.module`` is the target network (EMA of the student with ``train.ema_decay``, its
    perturbation disabled). A step's draws (solver-grid index, noise, guidance scale) come
    from ``rng.generator(seed, "distill/step", step)`` for the whole global batch.
    """

    progress_desc = "distill"

    def _build_model(self) -> None:
        from condnoise.training.runtime import load_run

        d = self.cfg.distill
        if d is None:
            raise UserError("Distiller needs a config with a distill section (student_config)")
        super()._build_model()  # autoencoder, schedule, the student (its initial weights below)
        run = load_run(d.teacher, ema=d.teacher_weights == "ema", device=self.device, step=d.teacher_step)
        if tuple(run.latent_shape) != tuple(self.latent_shape):
            raise UserError(f"teacher {d.teacher} works on {list(run.latent_shape)} inputs, the "
                            f"student's data gives {list(self.latent_shape)} (data.image_size)")  # fmt: skip
        self.teacher, self.teacher_step = run.model, run.step
        copy_teacher_weights(self.model, self.teacher)
        self.ema = EMA(self.model, self.cfg.train.ema_decay, warmup=self.cfg.train.ema_warmup)
        self.ema.module.perturbation.enabled = False  # the target network: never perturbed

    @property
    def target(self) -> torch.nn.Module:
        """The target network (the EMA copy of the student)."""
        return self.ema.module

    def _step_draws(self, step: int) -> Any:
        from condnoise.diffusion.consistency import draw

        d, lcm = self.cfg.distill, self.cfg.model.lcm
        gen = rng.generator(self.cfg.train.seed, "distill/step", step, device=self.device)
        return draw(self.cfg.train.batch_size, tuple(self.latent_shape), lcm.solver_steps,  # type: ignore[union-attr]
                    (d.guidance_min, d.guidance_max), self.device, gen)  # type: ignore[union-attr]  # fmt: skip

    def _micro_loss(self, x0: torch.Tensor, cond: torch.Tensor, index: torch.Tensor, step: int,
                    draws: Any, rows: slice) -> torch.Tensor:  # fmt: skip
        from condnoise.diffusion.consistency import lcd_loss

        d, mine = self.cfg.distill, draws.rows(rows)
        return lcd_loss(
            self.forward_model, self.teacher, self.target, self.schedule, x0, cond, mine,
            solver_steps=self.cfg.model.lcm.solver_steps,  # type: ignore[union-attr]
            timestep_cond=self.model.guidance_cond(mine.guidance),  # type: ignore[operator]
            loss=d.loss, huber_c=d.huber_c, sample_index=index, step=step,  # type: ignore[union-attr]
        ).loss  # fmt: skip

    def _run_info(self) -> dict[str, Any]:
        d = self.cfg.distill
        return {**super()._run_info(), "distilled_from": {
            "teacher": d.teacher, "teacher_step": self.teacher_step,  # type: ignore[union-attr]
            "teacher_weights": d.teacher_weights, "method": d.method}}  # type: ignore[union-attr]  # fmt: skip


def distill(
    cfg: Config,
    *,
    run_dir: str | Path | None = None,
    resume: bool = False,
    device: str | None = None,
    sample_hook: SampleHook | None = write_sample_grid,
    force: bool = False,
    status: Callable[[str], None] | None = None,
    lock_timeout: float | None = None,
    lock_wait: float = 0.0,
) -> TrainResult:
    """Distil the teacher of ``cfg.distill`` into the student of ``cfg`` (:func:`student_config`)
    in ``run_dir``, under its lock (rank 0; stale after ``lock_timeout`` seconds of silence, a live holder waited for up to ``lock_wait``);
    resumable like :func:`~condnoise.training.train`."""
    if cfg.distill is None:
        raise UserError("distill: the config has no distill section (build it with student_config)")
    return run_locked(Distiller, "distill", copy.deepcopy(cfg), run_dir=run_dir, resume=resume,
                      device=device, sample_hook=sample_hook, force=force, status=status,
                      lock_timeout=lock_timeout, lock_wait=lock_wait)  # fmt: skip
