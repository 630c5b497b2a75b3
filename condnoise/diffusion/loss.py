"""Diffusion training loss (paper Sec. 3: ``E||eps - eps_theta(x_t, t, c + delta)||^2``).

The regression target follows the schedule's prediction type (``eps``, the paper's, or
``v``; :meth:`~condnoise.diffusion.schedule.NoiseSchedule.target`). Optional min-SNR
weighting (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting
Strategy", Eq. 5 ff.): per-sample weight ``min(SNR_t, gamma) / SNR_t`` for eps and
``min(SNR_t, gamma) / (SNR_t + 1)`` for v, which puts both on the min-SNR-weighted x0 loss.

Input perturbation (IP, Ning et al. 2023; a baseline of the paper's Sec. 3): the network
sees ``x_t`` built from ``eps + xi * eps'`` while the regression target is built from ``eps``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from condnoise.diffusion.schedule import NoiseSchedule
from condnoise.errors import UserError

LOSS_WEIGHTINGS = ("none", "min-snr")


class DiffusionLoss(NamedTuple):
    loss: torch.Tensor  #: scalar: weighted mean over the batch (what to backpropagate)
    per_sample: torch.Tensor  #: float32 [B], detached, unweighted MSE per sample (pixel mean)
    t: torch.Tensor  #: int64 [B], the timesteps used


def loss_weights(schedule: NoiseSchedule, t: torch.Tensor, weighting: str = "none",
                 gamma: float = 5.0) -> torch.Tensor | None:  # fmt: skip
    """Per-sample loss weights float32 [B] (None for ``none``), min-SNR-gamma of Hang et al."""
    if weighting == "none":
        return None
    if weighting != "min-snr":
        raise UserError(f"unknown loss weighting {weighting!r}; choose one of {', '.join(LOSS_WEIGHTINGS)}")
    snr = schedule.snr(t)
    clipped = torch.clamp(snr, max=float(gamma))
    return clipped / (snr + 1.0) if schedule.prediction == "v" else clipped / snr


def diffusion_loss(
    model: Callable[..., torch.Tensor],
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    cond: torch.Tensor,
    *,
    t: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    ip_xi: float | None = None,
    generator: torch.Generator | None = None,
    weighting: str = "none",
    min_snr_gamma: float = 5.0,
    **model_kwargs,
) -> DiffusionLoss:
    """Sample ``t`` and ``eps``, build ``x_t`` and return the (weighted) MSE to the target.

    ``model(x_t, t, cond, **model_kwargs) -> eps or v`` (``cond``: labels ``[B]`` or token
    ids ``[B, L]``; e.g. a ``ConditionalDiffusionModel``; pass ``sample_index=...`` through ``model_kwargs``).
    ``ip_xi`` defaults to the model's ``input_perturbation`` attribute (0 when absent); IP
    is applied in training mode only. Random draws use ``generator`` or the global RNG of
    ``x0``'s device (checkpointable).
    """
    b = x0.shape[0]
    if cond.shape[0] != b:
        raise UserError(f"diffusion_loss: {b} images but {cond.shape[0]} conditions")
    if t is None:
        t = schedule.sample_timesteps(b, x0.device, generator)
    if noise is None:
        noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
    xi = float(getattr(model, "input_perturbation", 0.0) if ip_xi is None else ip_xi)
    training = getattr(model, "training", True)
    if xi > 0 and training:
        extra = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        x_t = schedule.q_sample(x0, t, noise + xi * extra)
    else:
        x_t = schedule.q_sample(x0, t, noise)
    pred = model(x_t, t, cond, **model_kwargs)
    target = schedule.target(x0, noise, t)
    per_sample = (pred.float() - target.float()).pow(2).flatten(1).mean(1)
    w = loss_weights(schedule, t, weighting, min_snr_gamma)
    loss = per_sample.mean() if w is None else (w.to(per_sample.dtype) * per_sample).mean()
    return DiffusionLoss(loss, per_sample.detach(), t)


def bin_losses(
    per_sample: torch.Tensor, t: torch.Tensor, num_steps: int, num_bins: int = 10
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum and count of per-sample losses in ``num_bins`` equal timestep bins (float64, int64).

    Accumulate these over steps and divide for the loss-by-timestep log.
    """
    bins = (t.long() * num_bins // num_steps).clamp_(0, num_bins - 1)
    sums = torch.zeros(num_bins, dtype=torch.float64, device=t.device)
    sums.index_add_(0, bins, per_sample.detach().double())
    counts = torch.bincount(bins, minlength=num_bins)
    return sums.cpu(), counts.cpu()
