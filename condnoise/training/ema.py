"""Exponential moving average of the weights (the EMA model is what sampling uses)."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """``ema = decay_t * ema + (1 - decay_t) * param`` after every optimizer step.

    With ``warmup`` the decay ramps up as ``decay_t = min(decay, (1 + t) / (10 + t))``
    (t = number of updates so far), so short runs are not dominated by the initial
    weights. Buffers are copied. The decay depends only on the step, so resuming is exact.
    """

    def __init__(self, model: nn.Module, decay: float, *, warmup: bool = True) -> None:
        self.decay = float(decay)
        self.warmup = warmup
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self._src = [p for p in model.parameters()]
        self._dst = [p for p in self.module.parameters()]
        self._src_buf = [b for b in model.buffers()]
        self._dst_buf = [b for b in self.module.buffers()]

    def decay_at(self, updates: int) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1.0 + updates) / (10.0 + updates))

    @torch.no_grad()
    def update(self, updates: int) -> float:
        """Blend in the current weights; ``updates`` = optimizer steps done before this one."""
        d = self.decay_at(updates)
        torch._foreach_lerp_(self._dst, [p.detach() for p in self._src], 1.0 - d)
        for dst, src in zip(self._dst_buf, self._src_buf):
            dst.copy_(src)
        return d
