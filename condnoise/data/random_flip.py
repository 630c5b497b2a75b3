"""Random data corruption (paper appendix E.4): each read re-draws the label with
probability ``ratio``, symmetric (from the class prior, never the true class).

Every draw is :func:`condnoise.rng.relabel`, a pure function of ``(seed, step, sample
index)``, so it is reproducible and independent of batch composition, worker count and
device. ``step`` is whatever the caller counts (epoch for map-style reading, optimiser
step for the trainer).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from condnoise import rng
from condnoise.errors import UserError


class RandomRelabeler:
    """``relabel(labels, sample_index, step)``: with probability ``ratio`` per sample, a new
    label drawn from ``class_prior`` restricted to the other classes; else the label."""

    def __init__(self, class_prior: Sequence[float], ratio: float, seed: int) -> None:
        if not 0.0 <= float(ratio) <= 1.0:
            raise UserError(f"ratio must lie in [0, 1], got {ratio}")
        prior = torch.as_tensor(np.asarray(class_prior, dtype=np.float64))
        if ratio > 0 and int((prior > 0).sum()) < 2:
            raise UserError("random relabelling needs at least 2 classes with samples")
        self.prior = prior
        self.ratio = float(ratio)
        self.seed = int(seed)

    def __call__(
        self, labels: torch.Tensor, sample_index: torch.Tensor, step: int | torch.Tensor
    ) -> torch.Tensor:
        return rng.relabel(labels, sample_index, step, prior=self.prior, ratio=self.ratio,
                           seed=self.seed)  # fmt: skip


def relabel(
    labels: torch.Tensor,
    sample_index: torch.Tensor,
    step: int | torch.Tensor,
    *,
    class_prior: Sequence[float],
    ratio: float,
    seed: int,
) -> torch.Tensor:
    """Functional form of ``RandomRelabeler(class_prior, ratio, seed)(labels, index, step)``."""
    return RandomRelabeler(class_prior, ratio, seed)(labels, sample_index, step)
