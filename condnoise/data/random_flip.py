"""Random data corruption (paper appendix E.4): each read re-draws the label with
probability ``ratio``, symmetric (from the class prior, never the true class).

Every draw is a pure function of ``(seed, step, sample index)`` through a counter-based
hash (SplitMix64), so it is reproducible and independent of batch composition, worker
count and device. ``step`` is whatever the caller counts (epoch for map-style reading,
optimiser step for the trainer).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from condnoise.errors import UserError

_MASKS = {s: (1 << (64 - s)) - 1 for s in (11, 27, 30, 31)}


def _signed(c: int) -> int:
    return c - (1 << 64) if c >= 1 << 63 else c


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_M1 = _signed(0xBF58476D1CE4E5B9)
_M2 = _signed(0x94D049BB133111EB)


def _srl(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> s) & _MASKS[s]


def splitmix64(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64 finaliser on int64 tensors (two's-complement wrap-around arithmetic)."""
    z = x + _GOLDEN
    z = (z ^ _srl(z, 30)) * _M1
    z = (z ^ _srl(z, 27)) * _M2
    return z ^ _srl(z, 31)


def uniforms(seed: int, step: int | torch.Tensor, index: torch.Tensor, stream: int) -> torch.Tensor:
    """float64 uniforms in [0, 1), one per ``index``, keyed by (seed, step, index, stream)."""
    index = index.to(torch.int64)
    step = torch.as_tensor(step, dtype=torch.int64, device=index.device)
    h = splitmix64(torch.full_like(index, int(seed) & ((1 << 63) - 1)) ^ stream)
    h = splitmix64(h ^ step)
    h = splitmix64(h ^ index)
    return _srl(h, 11).to(torch.float64) * (2.0**-53)


def draw_other_class(labels: torch.Tensor, prior: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw from ``prior`` restricted to classes != label (renormalised)."""
    w = prior.to(torch.float64).expand(labels.shape[0], -1).clone()
    w.scatter_(1, labels[:, None], 0.0)
    cdf = w.cumsum(1)
    target = (u * cdf[:, -1])[:, None]
    out = (cdf <= target).sum(1)
    # Guard against u * total landing on the last edge by rounding: step back to a valid class.
    out = out.clamp_(max=prior.numel() - 1)
    bad = w.gather(1, out[:, None])[:, 0] == 0
    if bad.any():
        alt = torch.where(w[bad] > 0, torch.arange(w.shape[1], device=w.device), -1).max(1).values
        out[bad] = alt
    return out


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
        labels = torch.as_tensor(labels)
        index = torch.as_tensor(sample_index, device=labels.device)
        if self.ratio == 0 or labels.numel() == 0:
            return labels.clone()
        flip = uniforms(self.seed, step, index, stream=1) < self.ratio
        new = draw_other_class(
            labels.to(torch.int64), self.prior.to(labels.device), uniforms(self.seed, step, index, 2)
        )
        return torch.where(flip, new.to(labels.dtype), labels)


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
