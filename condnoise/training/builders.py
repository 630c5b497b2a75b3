"""Build the run's components from a :class:`~condnoise.training.config.Config`.

Shared by the trainer and :func:`~condnoise.training.checkpoint.load_run`, so that a run
directory's ``config.yaml`` alone rebuilds exactly the trained architecture.
"""

from __future__ import annotations

from typing import Any

import torch

from condnoise.errors import UserError


def build_schedule(cfg: Any) -> Any:
    """The training noise schedule and prediction target (paper section 4: linear betas,
    1000 steps, eps; ``diffusion.prediction``, missing in older runs' config.yaml, is eps)."""
    from condnoise.diffusion.schedule import NoiseSchedule

    d = cfg.diffusion
    return NoiseSchedule(d.schedule, d.num_steps, beta_start=d.beta_start, beta_end=d.beta_end,
                         prediction=getattr(d, "prediction", "eps"))  # fmt: skip


def build_autoencoder(cfg: Any, device: torch.device | str = "cpu") -> torch.nn.Module:
    """Frozen autoencoder (identity for pixel-space models) in eval mode on ``device``."""
    from condnoise.models.autoencoder import build_autoencoder as _build

    return _build(cfg.model.autoencoder).to(device).eval()


def latent_shape(cfg: Any, image_shape: tuple[int, int, int]) -> tuple[int, int, int]:
    """What the denoiser sees for data images of ``image_shape`` (C, H, W)."""
    ae = cfg.model.autoencoder
    if ae is None or ae.kind == "identity":
        return tuple(image_shape)  # type: ignore[return-value]
    if cfg.model.latent_shape:  # declared (lets configs validate without the weights)
        return tuple(cfg.model.latent_shape)  # type: ignore[return-value]
    return tuple(build_autoencoder(cfg).latent_shape(image_shape))  # type: ignore[return-value]


def build_model(cfg: Any, latent: tuple[int, int, int], num_classes: int) -> torch.nn.Module:
    """The ``ConditionalDiffusionModel`` (encoder + perturbation + denoiser) of ``cfg.model``."""
    from condnoise.models import build_model as _build

    c, h, w = latent
    if h != w:
        raise UserError(f"the denoiser needs square inputs, got {h}x{w} (data.image_size)")
    return _build(cfg.model, in_channels=c, image_size=h, num_classes=num_classes)
