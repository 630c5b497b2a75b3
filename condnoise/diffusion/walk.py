"""Circular walk in the initial-noise space (paper Fig. 5).

For two independent Gaussian noises z1, z2 and theta in [0, 2 pi)::

    x(theta) = cos(theta) z1 + sin(theta) z2

is again N(0, I) for every theta (cos^2 + sin^2 = 1), so every frame is a typical
starting point, and x(2 pi) = x(0): the walk is a closed loop. Decoding each x(theta) with
a deterministic sampler (DDIM / DPM-Solver++) shows how the generated image changes along
the loop; the paper uses it to show that models trained with slight condition corruption
cover more varied images for the same class.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from condnoise.diffusion.grids import to_uint8
from condnoise.diffusion.samplers import DETERMINISTIC_SAMPLERS, sample
from condnoise.diffusion.seeding import initial_noise, sample_generators
from condnoise.errors import UserError


def circle_thetas(frames: int) -> np.ndarray:
    """``frames`` angles 2 pi k / frames, k = 0..frames-1 (frame ``frames`` would be frame 0)."""
    if frames < 2:
        raise UserError(f"--frames must be >= 2 for a walk, got {frames}")
    return 2 * math.pi * np.arange(frames, dtype=np.float64) / frames


def circle_noise(z1: torch.Tensor, z2: torch.Tensor, thetas: np.ndarray) -> torch.Tensor:
    """``cos(theta) z1 + sin(theta) z2`` for each theta: ``[len(thetas), *z1.shape]``."""
    th = torch.as_tensor(thetas, dtype=torch.float64)
    c = torch.cos(th).to(z1.dtype).view(-1, *([1] * z1.dim()))
    s = torch.sin(th).to(z1.dtype).view(-1, *([1] * z1.dim()))
    return c * z1.unsqueeze(0) + s * z2.unsqueeze(0)


@torch.inference_mode()
def noise_walk(
    model: torch.nn.Module,
    schedule: Any,
    autoencoder: Any,
    class_index: int,
    *,
    shape: tuple[int, ...],
    frames: int = 16,
    rows: int = 1,
    seed: int = 0,
    guidance: float = 2.0,
    sampler: str = "ddim",
    steps: int = 50,
    clip_x0: bool = False,
    batch_size: int = 64,
) -> tuple[np.ndarray, np.ndarray]:
    """Images along ``rows`` closed noise circles of class ``class_index``.

    Row r uses the pair (z1, z2) drawn from the per-sample seeds of indices 2r and 2r+1 of
    ``seed`` (see :mod:`.seeding`). Returns (uint8 ``[rows*frames,H,W,C]``, thetas ``[frames]``).
    """
    if sampler not in DETERMINISTIC_SAMPLERS:
        raise UserError(
            f"--sampler {sampler!r}: a noise walk needs a deterministic sampler "
            f"({', '.join(DETERMINISTIC_SAMPLERS)}), otherwise frames differ by sampler noise"
        )
    if rows < 1:
        raise UserError(f"--rows must be >= 1, got {rows}")
    thetas = circle_thetas(frames)
    z = initial_noise(sample_generators(seed, range(2 * rows)), shape)
    xs = torch.cat([circle_noise(z[2 * r], z[2 * r + 1], thetas) for r in range(rows)])
    device = next(model.parameters()).device
    out = []
    for start in range(0, xs.shape[0], batch_size):
        noise = xs[start : start + batch_size].to(device)
        labels = torch.full((noise.shape[0],), int(class_index), dtype=torch.long, device=device)
        x0 = sample(
            model, schedule, labels, noise, guidance=guidance, sampler=sampler, steps=steps,
            clip_x0=clip_x0,
        )  # fmt: skip
        out.append(to_uint8(autoencoder.decode(x0)))
    return np.concatenate(out), thetas
