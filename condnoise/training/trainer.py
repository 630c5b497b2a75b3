"""The training loop shared by DiT and U-Net models (paper sections 3-4).

Per optimizer step: one global batch (``train.batch_size`` samples over all ranks and
``grad_accum`` micro-steps), loss ``E||eps - eps_theta(x_t, t, c + delta)||^2`` (or its
v-prediction / min-SNR-weighted form, ``diffusion.prediction`` / ``loss_weighting``; the
perturbation delta and CFG dropout happen inside the model in training mode), AdamW
with linear warm-up, global-norm gradient clipping, then an EMA update.

Determinism: the timesteps and noise of a step are drawn for the whole global batch from
a generator seeded by ``(seed, step)`` and sliced per rank, so the union over ranks does
not depend on the number of processes; the model's own draws (CFG dropout, CEP noise) use
each rank's global RNG, whose state every checkpoint saves. Resuming from a checkpoint
therefore reproduces the uninterrupted run's losses bitwise on CPU.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from condnoise import rng
from condnoise.errors import UserError
from condnoise.locks import Lock
from condnoise.training import checkpoint as ckpt
from condnoise.training.builders import build_autoencoder, build_model, build_schedule
from condnoise.training.config import Config
from condnoise.training.data import Position, TrainData, global_slice
from condnoise.training.ema import EMA
from condnoise.training.rundir import (
    MetricsLog,
    check_fresh,
    check_resumable,
    default_run_dir,
    is_started,
    truncate_metrics,
    write_run_files,
)
from condnoise.training.runtime import (
    DistInfo,
    all_gather_object,
    all_reduce_mean,
    barrier,
    init_distributed,
)

SampleHook = Callable[["Trainer", int], Path | None]


@dataclass
class TrainResult:
    """What ``train`` returns (on every rank; ``losses`` are the global-batch means)."""

    run_dir: Path
    step: int
    start_step: int
    losses: list[float] = field(default_factory=list)
    img_per_s: float = 0.0
    seconds: float = 0.0


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype: ``auto`` is bf16 on GPU and fp32 (no autocast) on CPU."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return torch.bfloat16 if precision == "bf16" else None


def lr_lambda(warmup: int, total: int, schedule: str) -> Callable[[int], float]:
    """LR multiplier after ``s`` scheduler steps: linear warm-up, then constant or cosine."""

    def f(s: int) -> float:
        if warmup and s < warmup:
            return (s + 1) / warmup
        if schedule == "cosine":
            progress = min(1.0, (s - warmup) / max(1, total - warmup))
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0

    return f


def step_generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    """The generator of step ``step``'s timesteps and noise (same on every rank)."""
    return rng.generator(seed, "train/step", step, device=device)


class Trainer:
    """Builds data, model, EMA and optimizer for a config and runs the loop.

    ``sample_hook(trainer, step)`` writes a sample grid (default: :func:`write_sample_grid`
    with the EMA model); pass ``None`` to disable grids. ``data`` replaces the
    ``TrainData`` built from ``cfg.data`` (benchmarks feed synthetic latents this way).
    ``force`` lets a new run start in a non-empty folder that holds no run; ``status``
    receives one-line messages on what the trainer is doing (e.g. its final sample grid).
    Subclasses (the LCM distiller, the adapter fine-tuner) replace :meth:`_build_data`,
    :meth:`_build_model`, :meth:`_trainable_parameters`, :meth:`_step_draws`,
    :meth:`_micro_loss` and :meth:`_run_info`.
    """

    progress_desc = "train"

    def __init__(
        self,
        cfg: Config,
        *,
        run_dir: str | Path | None = None,
        resume: bool = False,
        device: str | None = None,
        dist: DistInfo | None = None,
        sample_hook: SampleHook | None = None,
        data: TrainData | None = None,
        force: bool = False,
        status: Callable[[str], None] | None = None,
    ) -> None:
        self.cfg, self.resume, self.sample_hook = cfg, resume, sample_hook
        self.force, self.status = force, status
        self.run_lock: Lock | None = None  # checked before each checkpoint when set
        self.dist = dist or init_distributed(device)
        self.device = self.dist.device
        self.run_dir = Path(run_dir or cfg.run.dir or default_run_dir(cfg))
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.micro = self._micro_batch()
        self.autocast_dtype = resolve_precision(cfg.train.precision, self.device)
        resume_from = self._check_run_dir()  # before any heavy work
        ckpt.seed_everything(cfg.train.seed, self.dist.rank)
        self._build_data(data)
        self._build_model()
        self._build_optimizer()
        self.step, self.position = 0, Position()
        if resume_from is not None:
            self._load(resume_from)
        if self.dist.is_main:
            self._write_run_files()
        barrier(self.dist)
        self.forward_model = self._forward_module()

    # ------------------------------------------------------------------ set-up

    def _micro_batch(self) -> int:
        """Samples per rank and micro-step: ``batch_size / (grad_accum x world size)``."""
        t, world = self.cfg.train, self.dist.world_size
        if t.batch_size % (t.grad_accum * world):
            raise UserError(
                f"train.batch_size={t.batch_size} must be divisible by grad_accum x world size "
                f"= {t.grad_accum} x {world}"
            )
        return t.batch_size // (t.grad_accum * world)

    def _build_data(self, data: TrainData | None) -> None:
        """The batch stream (``cfg.data`` unless given); labels must leave room for null,
        captions need a text model (and class labels a class model)."""
        self.data = data if data is not None else TrainData(self.cfg.data, self.cfg.train.seed)
        meta = self.data.meta
        self.num_classes = meta.num_classes
        self.image_shape = tuple(meta.image_shape)
        text = self.cfg.model.is_text
        if (meta.condition_kind == "caption") != text:
            model = f"a text model (encoder {self.cfg.model.encoder.name})" if text else "a class model"
            raise UserError(
                f"data.source {self.cfg.data.source!r} has {meta.condition_kind} conditions but the "
                f"config trains {model}; set model.encoder.name to "
                f"{'class' if not text else 'bert-embed, minilm or clip'} or use a "
                f"{'captioned' if not text else 'class-labelled'} source"
            )
        if text:
            return
        labels = np.asarray(self.data.dataset.conditions())
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise UserError(
                f"data.source {self.cfg.data.source!r}: labels must lie in [0, {self.num_classes}) "
                f"(class {self.num_classes} is the CFG null class)"
            )

    def _check_latent_cache(self) -> None:
        """``data.latents`` must hold this run's autoencoder's latents (fingerprint, shape)."""
        from condnoise.training.latent_cache import autoencoder_fingerprint

        cache = self.data.latents
        if self.autoencoder.kind == "identity":
            raise UserError(f"data.latents={self.cfg.data.latents}: the run is pixel-space "
                            "(model.autoencoder is identity); drop data.latents or set the autoencoder")
        cache.check(fingerprint=autoencoder_fingerprint(self.autoencoder))
        if tuple(cache.latent_shape) != tuple(self.latent_shape):
            raise UserError(f"latent cache {cache.root} holds latents of shape {cache.latent_shape}, "
                            f"the run's denoiser takes {list(self.latent_shape)}")

    def _build_model(self) -> None:
        """Autoencoder, noise schedule, the conditional model (training mode) and its EMA."""
        from condnoise.training.builders import latent_shape

        cfg = self.cfg
        self.autoencoder = build_autoencoder(cfg, self.device)
        self.latent_shape = latent_shape(cfg, self.image_shape)  # type: ignore[arg-type]
        if self.data.latents is not None:
            self._check_latent_cache()
        self.schedule = build_schedule(cfg)
        self.model = build_model(cfg, self.latent_shape, self.num_classes).to(self.device)
        self.model.train()
        table = self.data.attach_encoder(self.model.encoder)  # captions tokenized once
        if hasattr(self.model.perturbation, "bind_conditions"):  # random caption swaps
            self.model.perturbation.bind_conditions(table)
        self.ema = EMA(self.model, cfg.train.ema_decay, warmup=cfg.train.ema_warmup)

    def _build_optimizer(self) -> None:
        """AdamW (fused on CUDA) with linear warm-up, then a constant or cosine LR."""
        t = self.cfg.train
        self.optimizer = torch.optim.AdamW(
            self._trainable_parameters(), lr=t.lr, betas=tuple(t.betas),  # type: ignore[arg-type]
            weight_decay=t.weight_decay, fused=self.device.type == "cuda",
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(t.warmup, t.steps, t.lr_schedule)
        )

    def _trainable_parameters(self) -> list[nn.Parameter]:
        """What the optimizer updates: every model parameter (a fine-tuner: its adapter's)."""
        return list(self.model.parameters())

    def _forward_module(self) -> nn.Module:
        """The module the loss calls: the model, compiled and / or wrapped in DDP."""
        if self.cfg.train.compile:
            getattr(self.model, "denoiser", self.model).compile()
        if not self.dist.enabled:
            return self.model
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(
            self.model,
            device_ids=[self.device.index] if self.device.type == "cuda" else None,
            broadcast_buffers=False,
        )

    # ------------------------------------------------------------------ run directory

    def _check_run_dir(self) -> int | None:
        """Validate fresh/resume against the run directory; the step to resume from."""
        if not self.resume:
            check_fresh(self.run_dir, force=self.force)
            return None
        if not self.run_dir.is_dir() or not is_started(self.run_dir):
            raise UserError(
                f"--resume: run directory {self.run_dir} does not exist or holds no run; "
                "drop --resume to start a new run"
            )
        check_resumable(self.run_dir, self.cfg)
        steps = ckpt.list_checkpoints(self.run_dir)
        if not steps:  # killed before its first checkpoint: start over in place
            if self.dist.is_main:
                truncate_metrics(self.run_dir, 0)
            return None
        return steps[-1]

    def _write_run_files(self) -> None:
        write_run_files(self.run_dir, self.cfg, self._run_info())

    def _run_info(self) -> dict[str, Any]:
        """``run.json``: what ``load_run`` needs without the data, and the run's facts."""
        meta = self.data.meta
        return {
            "class_names": list(meta.class_names),
            "image_shape": list(self.image_shape),
            "latent_shape": list(self.latent_shape),
            "num_samples": self.data.num_samples,
            "dataset": meta.to_dict(),
            "world_size": self.dist.world_size,
            "rng_version": rng.VERSION,
            "model_config": getattr(self.model, "config", None),
            "parameters": sum(p.numel() for p in self.model.parameters()),
        }

    # ------------------------------------------------------------------ checkpoints

    def _load(self, step: int) -> None:
        folder = ckpt.step_dir(self.run_dir, step)
        state = ckpt.load_state(folder / "state.pt")
        made_with = state.get("rng_version", 1)
        if made_with != rng.VERSION:
            raise UserError(
                f"--resume: {folder} was written with random scheme {made_with}, this condnoise "
                f"draws with scheme {rng.VERSION} (condnoise.rng.VERSION): the resumed run would "
                "not reproduce the original; start a new --run-dir"
            )
        ckpt.load_weights(self.model, folder / "model.safetensors")
        ckpt.load_weights(self.ema.module, folder / "ema.safetensors")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        self.position = Position(**state["position"])
        self._check_stream_layout(state.get("stream_layout"))
        rngs = state["rng"]
        if len(rngs) == self.dist.world_size:
            ckpt.restore_rng(rngs[self.dist.rank])
        else:  # a different world size cannot replay per-rank streams: reseed per step
            ckpt.seed_everything(self.cfg.train.seed, self.dist.rank, step=self.step)
        if self.dist.is_main:
            truncate_metrics(self.run_dir, self.step)

    def _stream_layout(self) -> list[int] | None:
        """``[world size, data workers]`` of a streaming source (its shards' split)."""
        return [self.dist.world_size, self.cfg.train.num_workers] if self.data.streaming else None

    def _check_stream_layout(self, saved: list[int] | None) -> None:
        if self.data.streaming and saved is not None and list(saved) != self._stream_layout():
            raise UserError(
                f"--resume: this wds: run streamed with world size x train.num_workers = "
                f"{saved[0]} x {saved[1]}; resume it with the same (now {self.dist.world_size} x "
                f"{self.cfg.train.num_workers}), which split the shards"
            )

    def save(self) -> Path | None:
        """Checkpoint the current step (collective: every rank contributes its RNG state)."""
        rngs = all_gather_object(self.dist, ckpt.capture_rng())
        path = None
        if self.run_lock is not None:
            self.run_lock.check()  # another process took the run over: stop, write nothing
        if self.dist.is_main:
            state = {
                "step": self.step,
                "position": self.position.to_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "rng": rngs,
                "rng_version": rng.VERSION,
                "world_size": self.dist.world_size,
                "stream_layout": self._stream_layout(),
            }
            path = ckpt.save_checkpoint(
                self.run_dir, self.step, self.model, self.ema.module, state,
                self.cfg.train.keep_last,
            )
        barrier(self.dist)
        return path

    # ------------------------------------------------------------------ the loop

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def _step_draws(self, step: int) -> Any:
        """Step ``step``'s timesteps and noise of the whole global batch (same on every rank)."""
        gen = step_generator(self.cfg.train.seed, step, self.device)
        b = self.cfg.train.batch_size
        t_all = self.schedule.sample_timesteps(b, self.device, gen)
        noise_all = torch.randn((b, *self.latent_shape), device=self.device, generator=gen)
        return {"t": t_all, "noise": noise_all}

    def _micro_loss(self, x0: torch.Tensor, cond: torch.Tensor, index: torch.Tensor, step: int,
                    draws: Any, rows: slice, **extra: torch.Tensor) -> torch.Tensor:  # fmt: skip
        """The loss of one micro-batch (``rows`` of the global batch's ``draws``); ``extra``:
        the batch's extra fields (``TrainData.extra_fields``, e.g. an adapter's ``control``),
        passed to the model."""
        from condnoise.diffusion.loss import diffusion_loss

        return diffusion_loss(
            self.forward_model, self.schedule, x0, cond,
            t=draws["t"][rows], noise=draws["noise"][rows].to(x0.dtype),
            ip_xi=self.model.input_perturbation,  # type: ignore[arg-type]
            weighting=self.cfg.diffusion.loss_weighting,
            min_snr_gamma=self.cfg.diffusion.min_snr_gamma,
            sample_index=index, step=step, **extra,
        ).loss  # fmt: skip

    def train_step(self, micro_batches: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step on the next global batch; returns (local loss, grad norm)."""
        t_cfg = self.cfg.train
        step = self.step + 1
        draws = self._step_draws(step)
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device)
        for m in range(t_cfg.grad_accum):
            images, cond, index, *fields = next(micro_batches)
            rows = global_slice(self.micro, m, self.dist.world_size, self.dist.rank)
            images = images.to(self.device, non_blocking=True)
            cond = cond.to(self.device, non_blocking=True)
            index = index.to(self.device, non_blocking=True)
            extra = {k: v.to(self.device, non_blocking=True) for k, v in zip(self.data.extra_fields, fields)}
            if self.data.latents is not None:  # pre-extracted (data.latents)
                x0 = images
            else:
                with torch.no_grad():
                    x0 = self.autoencoder.encode(images)
            sync = m == t_cfg.grad_accum - 1 or not self.dist.enabled
            ctx = contextlib.nullcontext() if sync else self.forward_model.no_sync()  # type: ignore[operator]
            with ctx:
                with self._autocast():
                    loss = self._micro_loss(x0, cond, index, step, draws, rows, **extra)
                (loss / t_cfg.grad_accum).backward()
            total += loss.detach()
        clip = t_cfg.grad_clip if t_cfg.grad_clip is not None else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        self.optimizer.step()
        self.scheduler.step()
        self.ema.update(self.step)
        self.step = step
        return total / t_cfg.grad_accum, grad_norm

    def run(self) -> TrainResult:
        """Train to ``train.steps``, checkpointing, logging and sampling on the way."""
        t_cfg = self.cfg.train
        result = TrainResult(self.run_dir, self.step, self.step)
        if self.step >= t_cfg.steps:
            return result
        stream = self.data.micro_batches(
            self.position, t_cfg.batch_size, t_cfg.grad_accum, self.dist.world_size,
            self.dist.rank, t_cfg.num_workers,
        )
        log = MetricsLog(self.run_dir, tensorboard=self.cfg.run.tensorboard) if self.dist.is_main else None
        bar = self._progress_bar()
        t0 = time.perf_counter()
        self._last_log = (t0, self.step)
        try:
            while self.step < t_cfg.steps:
                loss, grad_norm = self.train_step(stream)
                self.position = self.data.order.take(self.position, t_cfg.batch_size)[1]
                if self._due(t_cfg.log_every):
                    result.losses.append(self._log(loss, grad_norm, log, bar))
                if bar is not None:
                    bar.update(self.step - bar.n)
                if self._due(t_cfg.ckpt_every):
                    self.save()
                if self.sample_hook is not None and self.dist.is_main and t_cfg.sample_every \
                        and self._due(t_cfg.sample_every):  # fmt: skip
                    self._sample(bar)
        finally:
            for closing in (bar, log):
                if closing is not None:
                    closing.close()
        result.step, result.seconds = self.step, time.perf_counter() - t0
        result.img_per_s = (self.step - result.start_step) * t_cfg.batch_size / max(result.seconds, 1e-9)
        return result

    def _sample(self, bar: Any) -> None:
        """Call the sample hook (outside the training RNG streams); say so for the final grid,
        which can take a while after the progress bar reached its end."""
        if self.status is not None and self.step == self.cfg.train.steps:
            t = self.cfg.train
            self.status(f"drawing the final sample grid (step {self.step}: up to 10 classes x "
                        f"{t.sample_per_class}, {t.sample_sampler} {t.sample_steps} steps)")
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            self.sample_hook(self, self.step)  # type: ignore[misc]

    def _due(self, every: int) -> bool:
        """Whether the current step is a multiple of ``every`` or the last one."""
        return self.step % every == 0 or self.step == self.cfg.train.steps

    def _progress_bar(self) -> Any:
        if not (self.dist.is_main and self.cfg.run.progress):
            return None
        from tqdm.auto import tqdm

        return tqdm(total=self.cfg.train.steps, initial=self.step, desc=self.progress_desc, unit="step",
                    dynamic_ncols=True)  # fmt: skip

    def _log(self, loss: torch.Tensor, grad_norm: torch.Tensor, log: MetricsLog | None,
             bar: Any) -> float:  # fmt: skip
        """The global-batch mean loss of this step, logged (rank 0) with the throughput since
        the last log, LR, gradient norm, EMA decay and the perturbation's statistics."""
        step, now = self.step, time.perf_counter()
        ips = self.cfg.train.batch_size * (step - self._last_log[1]) / max(now - self._last_log[0], 1e-9)
        self._last_log = (now, step)
        loss_value = float(all_reduce_mean(self.dist, loss))
        if not math.isfinite(loss_value):
            raise UserError(f"loss is {loss_value} at step {step}; lower train.lr or enable "
                            "train.grad_clip")  # fmt: skip
        if log is not None:
            record = {
                "step": step, "loss": loss_value, "lr": self.scheduler.get_last_lr()[0],
                "grad_norm": float(grad_norm), "img_per_s": round(ips, 2),
                "epoch": self.position.epoch, "ema_decay": self.ema.decay_at(step - 1),
            }  # fmt: skip
            stats = getattr(self.model.perturbation, "stats", None)
            if stats is not None:
                record.update(stats())
            log.log(record)
        if bar is not None:
            bar.set_postfix(loss=f"{loss_value:.4f}", img_s=f"{ips:.0f}", refresh=False)
        return loss_value


def write_sample_grid(trainer: Trainer, step: int) -> Path:
    """``samples/step_{step}.png``: ``sample_per_class`` EMA samples per row with
    classifier-free guidance ``train.sample_guidance``; rows are up to 10 classes (evenly
    spaced) or, for text models, the first 8 training captions, each row labelled with its
    class name or caption (:func:`condnoise.diffusion.sampling.sample_grid` with the
    trainer's settings)."""
    from condnoise.diffusion.sampling import sample_grid

    t = trainer.cfg.train
    if trainer.cfg.model.is_text:
        table = trainer.data.cond_table
        rows: Any = table[: min(8, len(table))]
        labels = list(trainer.data.dataset.conditions()[: len(rows)])
    else:
        k = trainer.num_classes
        rows = torch.linspace(0, k - 1, steps=min(k, 10)).round().long().unique().tolist()
        names = trainer.data.meta.class_names
        labels = [str(names[c]) for c in rows] if names else None
    path = trainer.run_dir / "samples" / f"step_{step:08d}.png"
    sample_grid(
        trainer.ema.module, trainer.schedule, rows, t.sample_per_class, path,
        shape=trainer.latent_shape, guidance=t.sample_guidance,
        steps=min(t.sample_steps, trainer.schedule.num_steps), seed=t.seed,
        sampler=t.sample_sampler, autoencoder=trainer.autoencoder,
        clip_x0=trainer.latent_shape == trainer.image_shape,
        precision="bf16" if trainer.autocast_dtype == torch.bfloat16 else "fp32", row_labels=labels,
    )  # fmt: skip
    return path


def train(
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
    """Validate ``cfg`` and train (joins a torchrun process group when one is set up).

    Rank 0 holds the run folder's lock (:func:`condnoise.locks.folder_lock`) for the whole
    run, taken over from a holder silent for ``lock_timeout`` seconds (default: the locks'
    10 minutes); a live holder makes it fail at once, or after ``lock_wait`` seconds of
    waiting for the holder to finish or go silent. Before each checkpoint it checks the lock is still its own (else
    :class:`condnoise.locks.LockLost`). A run that fails before its first step leaves no
    run files behind.
    """
    if cfg.distill is not None:
        raise UserError(f"config of run {cfg.run.name or '(unnamed)'} has a distill section: it is a "
                        "distilled student's; continue it with `condnoise distill`")  # fmt: skip
    if cfg.finetune is not None:
        raise UserError(f"config of run {cfg.run.name or '(unnamed)'} has a finetune section: it is an "
                        "adapter's run; continue it with `condnoise finetune`")  # fmt: skip
    return run_locked(Trainer, "train", cfg, run_dir=run_dir, resume=resume, device=device,
                      sample_hook=sample_hook, force=force, status=status,
                      lock_timeout=lock_timeout, lock_wait=lock_wait)  # fmt: skip


def run_locked(
    cls: type[Trainer], what: str, cfg: Config, *, run_dir: str | Path | None, resume: bool,
    device: str | None, sample_hook: SampleHook | None, force: bool,
    status: Callable[[str], None] | None, lock_timeout: float | None = None,
    lock_wait: float = 0.0,
) -> TrainResult:  # fmt: skip
    """Validate ``cfg``, build ``cls`` (the trainer or a subclass) and run it under the run
    folder's heartbeat lock (rank 0, ``what`` names the holder; stale after ``lock_timeout``
    seconds of silence, default the locks' 10 minutes; a live holder waited for up to
    ``lock_wait`` seconds); a fresh run that fails before step 1
    leaves no run files."""
    from condnoise.locks import DEFAULT_STALE_AFTER, folder_lock, heartbeat_for
    from condnoise.training.rundir import discard_unstarted

    cfg.validate(f"config of run {cfg.run.name or '(unnamed)'}")
    dist = init_distributed(device)
    path = Path(run_dir or cfg.run.dir or default_run_dir(cfg))
    timeout = lock_timeout or DEFAULT_STALE_AFTER
    lock = (folder_lock(path, what, heartbeat=heartbeat_for(timeout), stale_after=timeout,
                        wait=lock_wait)
            if dist.is_main else contextlib.nullcontext())  # fmt: skip
    with lock as held:
        trainer = cls(cfg, run_dir=path, resume=resume, dist=dist, sample_hook=sample_hook,
                      force=force, status=status)  # fmt: skip
        trainer.run_lock = held
        try:
            return trainer.run()
        except BaseException:
            if dist.is_main and not resume:  # only files this call wrote
                discard_unstarted(path)
            raise
