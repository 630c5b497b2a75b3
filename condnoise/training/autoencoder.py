"""Train a first-stage autoencoder (VQ or KL) as in LDM (Rombach et al. 2022, Sec. 3 / App. G).

Per step: encode, quantise (VQ) or sample the posterior (KL), decode; the generator loss
``L1 + perceptual + lambda * L_gan + VQ / KL term`` (``autoencoder_losses``) updates the
autoencoder, then, from ``loss.disc_start`` on, the hinge loss updates the PatchGAN
discriminator on the same batch (taming-transformers' alternating scheme). The EMA
codebook (``codebook``) is updated after the autoencoder step.

Run directory (like the diffusion trainer's, ``rundir``)::

    RUN/config.yaml provenance.json run.json metrics.jsonl
    RUN/checkpoints/step_XXXXXXXX/{autoencoder,discriminator,codebook_ema}.safetensors + state.pt
    RUN/samples/step_XXXXXXXX.png     originals (top row) and reconstructions (bottom row)
    RUN/autoencoder/                  diffusers folder (config.json + weights), rewritten at
                                      every checkpoint; ``VQModel/AutoencoderKL.from_pretrained``

Determinism: the data order is a seeded permutation per epoch, KL posterior noise and
dead-code restarts come from ``rng.generator(seed, "autoencoder/step", step)``, and
checkpoints hold the optimizers, RNG states and ``rng_version``, so a resumed run
reproduces the uninterrupted one bitwise on CPU. ``scaling_factor`` (stored in the diffusers
config, as LDM / SD do) is ``1 / std`` of the latents ``encode(x)`` of the first
``train.scaling_samples`` images.
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from condnoise import rng
from condnoise.errors import UserError
from condnoise.training import checkpoint as ckpt
from condnoise.training.autoencoder_config import AutoencoderTrainConfig
from condnoise.training.data import Position
from condnoise.training.rundir import MetricsLog, is_started, truncate_metrics, write_run_files
from condnoise.training.trainer import lr_lambda

FOLDER = "autoencoder"
#: settings that may change on --resume (they do not change the trajectory)
RESUMABLE = ("train.steps", "train.ckpt_every", "train.keep_last", "train.sample_every",
             "train.sample_count", "train.log_every", "train.num_workers", "train.threads",
             "run.name", "run.dir", "run.tensorboard", "run.progress")  # fmt: skip


@dataclass
class AETrainResult:
    run_dir: Path
    step: int
    start_step: int
    folder: Path  # the diffusers folder
    last: dict[str, float] = field(default_factory=dict)  # last logged record
    cpu_seconds: float = 0.0  # time.process_time of this process during the run


def default_run_dir(cfg: AutoencoderTrainConfig) -> Path:
    return Path("runs") / f"ae-{cfg.run.name}-s{cfg.train.seed}"


def batch_psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR (dB) of images in [-1, 1], data range 1 after mapping to [0, 1]."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    a, b = (x.float().clamp(-1, 1) + 1) / 2, (y.float().clamp(-1, 1) + 1) / 2
    return peak_signal_noise_ratio(a, b, data_range=1.0, reduction="none", dim=(1, 2, 3))


class AutoencoderTrainer:
    """Builds data, autoencoder, discriminator, losses and optimizers; ``run()`` trains."""

    def __init__(self, cfg: AutoencoderTrainConfig, *, run_dir: str | Path | None = None,
                 resume: bool = False, device: str | None = None,
                 progress: Callable[[dict[str, Any]], None] | None = None,
                 classifier: nn.Module | Callable[[], nn.Module] | None = None) -> None:
        self.cfg, self.resume, self.progress = cfg, resume, progress
        self.classifier = classifier  # the perceptual stand-in's network (or its loader)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.run_dir = Path(run_dir or cfg.run.dir or default_run_dir(cfg))
        t = cfg.train
        if t.threads:
            torch.set_num_threads(t.threads)
        resume_from = self._check_run_dir()
        ckpt.seed_everything(t.seed)
        self._build_data()
        self._build_models()
        self.step, self.position = 0, Position()
        if resume_from is not None:
            self._load(resume_from)
        write_run_files(self.run_dir, cfg, self._run_info())

    # ------------------------------------------------------------------ setup

    def _check_run_dir(self) -> int | None:
        from condnoise.training.autoencoder_config import autoencoder_config_from_yaml
        from condnoise.training.rundir import check_fresh, config_differences

        if not self.resume:
            check_fresh(self.run_dir)
            return None
        saved_path = self.run_dir / "config.yaml"
        if not is_started(self.run_dir) or not saved_path.is_file():
            raise UserError(f"--resume: run directory {self.run_dir} does not exist or holds no run; "
                            "drop --resume to start a new run")
        saved = autoencoder_config_from_yaml(saved_path.read_text(encoding="utf-8"), str(saved_path))
        # a cosine schedule is shaped by train.steps: then the length is fixed too
        free = [k for k in RESUMABLE if k != "train.steps" or saved.train.lr_schedule == "constant"]
        diff = [k for k in config_differences(saved.to_dict(), self.cfg.to_dict()) if k not in free]
        if diff:
            raise UserError(f"--resume: the config differs from {saved_path} in {', '.join(diff[:5])}; "
                            "resume with the same settings (only train.steps with a constant LR, "
                            "and the checkpoint / sample / log cadence may change)")
        steps = ckpt.list_checkpoints(self.run_dir)
        if not steps:  # killed before its first checkpoint: start over in place
            truncate_metrics(self.run_dir, 0)
            return None
        return steps[-1]

    def _build_data(self) -> None:
        from condnoise.data.sources import open_source
        from condnoise.training.image_stream import ImageBatches

        d = self.cfg.data
        source = open_source(d.source, d.split, data_dir=d.data_dir, image_size=d.image_size)
        self.data = ImageBatches(source, self.cfg.train.seed, max_samples=d.max_samples,
                                 num_workers=self.cfg.train.num_workers)
        self.image_shape = tuple(source.meta.image_shape)
        c, h, w = self.image_shape
        f = self.cfg.model.downsample
        if h != w or h % f:
            raise UserError(f"data: images of {h}x{w} need to be square and divisible by "
                            f"model.downsample={f} (set data.image_size)")

    def _build_models(self) -> None:
        from condnoise.models.discriminator import NLayerDiscriminator
        from condnoise.models.first_stage import build_first_stage
        from condnoise.training.autoencoder_losses import build_perceptual
        from condnoise.training.codebook import EMACodebook

        m, lo, t = self.cfg.model, self.cfg.loss, self.cfg.train
        c, h, _ = self.image_shape
        fmt = torch.channels_last if t.channels_last else torch.contiguous_format
        self.model = build_first_stage(
            m.kind, in_channels=c, image_size=h, downsample=m.downsample, width=m.width,
            channel_mult=m.channel_mult, layers_per_block=m.layers_per_block,
            latent_channels=m.latent_channels, codebook_size=m.codebook_size,
            embed_dim=m.embed_dim, norm_groups=m.norm_groups, mid_attention=m.mid_attention,
        ).to(self.device, memory_format=fmt).train()  # fmt: skip
        self.ema_codebook = None
        if m.kind == "vq" and lo.codebook == "ema":
            book = self.model.quantize.embedding.weight
            book.requires_grad_(False)
            self.ema_codebook = EMACodebook(book.shape[0], book.shape[1], decay=lo.ema_decay,
                                            dead_threshold=lo.dead_threshold).to(self.device)
        self.disc = None
        if lo.disc_weight > 0:
            self.disc = NLayerDiscriminator(c, lo.disc_width, lo.disc_layers, lo.disc_norm)
            self.disc = self.disc.to(self.device, memory_format=fmt).train()
        self.perceptual = None
        if lo.perceptual != "none" and lo.perceptual_weight > 0:
            net = self.classifier
            if net is not None and not isinstance(net, nn.Module):
                net = net()  # loaded only now: after the run folder checks
            self.perceptual = build_perceptual(lo.perceptual, lpips_path=lo.lpips_path,
                                               classifier=net).to(self.device)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.Adam(params, lr=t.lr, betas=tuple(t.betas))  # type: ignore[arg-type]
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(t.warmup, t.steps, t.lr_schedule))
        self.opt_d = None
        if self.disc is not None:
            self.opt_d = torch.optim.Adam(self.disc.parameters(), lr=t.disc_lr or t.lr,
                                          betas=tuple(t.betas))  # type: ignore[arg-type]

    def _run_info(self) -> dict[str, Any]:
        from condnoise.models.first_stage import latent_channels_of

        c, h, w = self.image_shape
        f = self.cfg.model.downsample
        return {
            "kind": self.cfg.model.kind, "image_shape": list(self.image_shape),
            "latent_shape": [latent_channels_of(self.model), h // f, w // f],
            "num_samples": self.data.num_samples, "dataset": self.data.meta.to_dict(),
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "discriminator_parameters": sum(p.numel() for p in self.disc.parameters()) if self.disc else 0,
            "folder": FOLDER, "rng_version": rng.VERSION,
        }

    # ------------------------------------------------------------------ checkpoints

    def _weights(self) -> dict[str, nn.Module]:
        out: dict[str, nn.Module] = {"autoencoder.safetensors": self.model}
        if self.disc is not None:
            out["discriminator.safetensors"] = self.disc
        if self.ema_codebook is not None:
            out["codebook_ema.safetensors"] = self.ema_codebook
        return out

    def _load(self, step: int) -> None:
        folder = ckpt.step_dir(self.run_dir, step)
        state = ckpt.load_state(folder / "state.pt")
        made_with = state.get("rng_version", 1)
        if made_with != rng.VERSION:
            raise UserError(f"--resume: {folder} was written with random scheme {made_with}, this "
                            f"condnoise draws with scheme {rng.VERSION}; start a new --run-dir")
        for name, module in self._weights().items():
            ckpt.load_weights(module, folder / name)
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        if self.opt_d is not None:
            self.opt_d.load_state_dict(state["optimizer_disc"])
        self.step, self.position = int(state["step"]), Position(**state["position"])
        ckpt.restore_rng(state["rng"])
        truncate_metrics(self.run_dir, self.step)

    def save(self) -> Path:
        """Checkpoint the current step, then rewrite the diffusers folder."""
        state = {"step": self.step, "position": self.position.to_dict(),
                 "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                 "optimizer_disc": self.opt_d.state_dict() if self.opt_d else None,
                 "rng": ckpt.capture_rng(), "rng_version": rng.VERSION}  # fmt: skip
        path = ckpt.save_checkpoint_files(self.run_dir, self.step, self._weights(), state,
                                          self.cfg.train.keep_last)
        self.save_folder()
        return path

    @torch.no_grad()
    def scaling_factor(self) -> float:
        """``1 / std`` of ``encode(x)`` (VQ: pre-quantisation latents; KL: posterior mean)."""
        x = self.data.first(self.cfg.train.scaling_samples)
        zs = []
        for s in range(0, len(x), 64):
            enc = self.model.encode(x[s:s + 64].to(self.device))
            zs.append((enc.latents if self.cfg.model.kind == "vq" else enc.latent_dist.mean).float())
        std = float(torch.cat(zs).std())
        if not (math.isfinite(std) and std > 0):
            raise UserError(f"latent std is {std}; the autoencoder diverged (lower train.lr)")
        return 1.0 / std

    def save_folder(self) -> Path:
        """``RUN/autoencoder``: ``save_pretrained`` with ``scaling_factor`` (swapped in whole)."""
        self.model.register_to_config(scaling_factor=self.scaling_factor())
        final, tmp, old = (self.run_dir / FOLDER, self.run_dir / f".tmp-{FOLDER}",
                           self.run_dir / f".old-{FOLDER}")
        for stale in (tmp, old):
            shutil.rmtree(stale, ignore_errors=True)
        self.model.save_pretrained(str(tmp), safe_serialization=True)
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
        return final

    # ------------------------------------------------------------------ one step

    def _forward(self, x: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, dict, Any]:
        """Reconstruction, weighted regulariser, logs and (VQ) the ``Quantized`` batch."""
        from condnoise.training.autoencoder_losses import kl_divergence
        from condnoise.training.codebook import quantize, usage_stats

        lo = self.cfg.loss
        if self.cfg.model.kind == "vq":
            q = quantize(self.model, self.model.encode(x).latents)
            rec = self.model.decode(q.z_q, force_not_quantize=True).sample
            book = q.codebook_loss if self.ema_codebook is None else torch.zeros_like(q.commitment_loss)
            reg = lo.codebook_weight * (book + lo.beta * q.commitment_loss)
            logs = {"commitment": q.commitment_loss, **usage_stats(q.indices, self.cfg.model.codebook_size)}
            return rec, reg, logs, q
        posterior = self.model.encode(x).latent_dist
        rec = self.model.decode(posterior.sample(generator=gen)).sample
        kl = kl_divergence(posterior)
        # LDM weighs the KL against the per-image *sum* of the L1 term; ours is a mean
        reg = lo.kl_weight * kl / x[0].numel()
        return rec, reg, {"kl": kl}, None

    def _generator_loss(self, x: torch.Tensor, rec: torch.Tensor, disc_on: bool) -> tuple[torch.Tensor, dict]:
        lo = self.cfg.loss
        l1 = (x - rec).abs().mean()
        rec_loss = lo.l1_weight * l1
        logs: dict[str, Any] = {"l1": l1}
        if self.perceptual is not None:
            p = self.perceptual(x, rec).mean()
            rec_loss = rec_loss + lo.perceptual_weight * p
            logs["perceptual"] = p
        if not disc_on:
            return rec_loss, logs
        from condnoise.training.autoencoder_losses import adaptive_weight, hinge_g_loss

        self.disc.requires_grad_(False)  # type: ignore[union-attr]
        g_loss = hinge_g_loss(self.disc(rec))  # type: ignore[misc]
        self.disc.requires_grad_(True)  # type: ignore[union-attr]
        lam = adaptive_weight(rec_loss, g_loss, self.model.decoder.conv_out.weight,
                              max_weight=lo.adaptive_max)
        logs.update(g_loss=g_loss, adaptive_weight=lam)
        return rec_loss + lo.disc_weight * lam * g_loss, logs

    def train_step(self, x: torch.Tensor) -> dict[str, float]:
        """One autoencoder step and, once on, one discriminator step; returns the logs."""
        from condnoise.training.autoencoder_losses import hinge_d_loss

        step = self.step + 1
        gen = rng.generator(self.cfg.train.seed, "autoencoder/step", step, device=self.device)
        x = x.to(self.device, non_blocking=True)
        if self.cfg.train.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        disc_on = self.disc is not None and step > self.cfg.loss.disc_start
        rec, reg, logs, q = self._forward(x, gen)
        g_total, g_logs = self._generator_loss(x, rec, disc_on)
        loss = g_total + reg
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        clip = self.cfg.train.grad_clip or float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        self.opt.step()
        self.sched.step()
        if self.ema_codebook is not None:
            logs["restarted"] = self.ema_codebook.update(
                self.model.quantize.embedding.weight, q.flat, q.indices, gen)
        if disc_on:
            d_loss = hinge_d_loss(self.disc(x), self.disc(rec.detach()))  # type: ignore[misc]
            self.opt_d.zero_grad(set_to_none=True)  # type: ignore[union-attr]
            d_loss.backward()
            self.opt_d.step()  # type: ignore[union-attr]
            logs["d_loss"] = d_loss
        self.step = step
        out = {"step": step, "loss": loss, "reg": reg, "grad_norm": grad_norm,
               "psnr": batch_psnr(x.detach(), rec.detach()).mean(), **logs, **g_logs}
        return {k: (float(v.detach()) if isinstance(v, torch.Tensor) else v) for k, v in out.items()}

    # ------------------------------------------------------------------ the loop

    @torch.no_grad()
    def write_grid(self) -> Path:
        """``samples/step_{step}.png``: the first ``train.sample_count`` images and their
        reconstructions (``first_stage.reconstruct``: quantised for VQ, posterior mean for KL)."""
        from condnoise.training.image_stream import save_reconstruction_grid

        path = self.run_dir / "samples" / f"step_{self.step:08d}.png"
        save_reconstruction_grid(self.model, self.data, path, self.cfg.train.sample_count, self.device)
        return path

    def run(self, max_steps: int | None = None) -> AETrainResult:
        """Train to ``train.steps`` (or stop after step ``max_steps``), then save."""
        t = self.cfg.train
        end = min(t.steps, max_steps) if max_steps is not None else t.steps
        result = AETrainResult(self.run_dir, self.step, self.step, self.run_dir / FOLDER)
        cpu0 = time.process_time()
        log = MetricsLog(self.run_dir, tensorboard=self.cfg.run.tensorboard)
        try:
            stream = self.data.batches(self.position, t.batch_size)
            while self.step < end:
                images, next_pos = next(stream)
                record = self.train_step(images)
                self.position = next_pos
                step = self.step
                if not math.isfinite(record["loss"]):
                    raise UserError(f"loss is {record['loss']} at step {step}; lower train.lr")
                if step % t.log_every == 0 or step == end:
                    record["lr"] = self.sched.get_last_lr()[0]
                    log.log(record)
                    result.last = record
                    if self.progress is not None:
                        self.progress(record)
                if step % t.ckpt_every == 0 or step == end:
                    self.save()
                if t.sample_every and (step % t.sample_every == 0 or step == end):
                    self.write_grid()
        finally:
            log.close()
        if not (self.run_dir / FOLDER).is_dir():  # resumed at the end: nothing left to do
            self.save_folder()
        result.step, result.cpu_seconds = self.step, time.process_time() - cpu0
        return result


def train_autoencoder(cfg: AutoencoderTrainConfig, *, run_dir: str | Path | None = None,
                      resume: bool = False, device: str | None = None,
                      max_steps: int | None = None,
                      progress: Callable[[dict[str, Any]], None] | None = None,
                      classifier: nn.Module | Callable[[], nn.Module] | None = None) -> AETrainResult:
    """Validate ``cfg`` and train (resuming from the last checkpoint with ``resume``),
    holding the run folder's lock (:func:`condnoise.locks.folder_lock`).

    ``classifier``: the network of ``loss.perceptual: classifier`` (the fmnist-classifier,
    ``condnoise.evaluation.classifier.load_classifier(loss.classifier_dir)[0]``), or a
    function returning it, called once the run folder has been checked."""
    from condnoise.locks import folder_lock

    cfg.validate(f"config of autoencoder run {cfg.run.name or '(unnamed)'}")
    path = Path(run_dir or cfg.run.dir or default_run_dir(cfg))
    with folder_lock(path, "autoencoder train"):  # one process per run folder
        trainer = AutoencoderTrainer(cfg, run_dir=path, resume=resume, device=device,
                                     progress=progress, classifier=classifier)
        return trainer.run(max_steps)
