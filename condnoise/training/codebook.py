"""Vector quantisation for training a ``VQModel``: losses, EMA codebook, dead-code restarts.

The nearest code comes from diffusers' own ``VectorQuantizer`` (``model.quantize(h)``,
the rule ``decode`` applies at inference), so training and inference quantise alike.
Two codebook updates (``loss.codebook``):

- ``loss``: the VQ-VAE objective (van den Oord et al. 2017, Eq. 3), codebook term
  ``||sg(h) - e||^2`` plus ``beta * ||h - sg(e)||^2`` (commitment, beta = 0.25). diffusers'
  quantizer applies beta to the wrong term by default ("legacy"), so the loss is computed
  here from the indices.
- ``ema``: codebook as exponential moving averages of the assigned encoder outputs
  (van den Oord et al. 2017, App. A.1; Razavi et al. 2019), only the commitment term is a
  loss, and codes whose EMA count falls below ``dead_threshold`` are restarted at random
  encoder outputs of the current batch (Dhariwal et al. 2020, Jukebox Sec. 3.1). Restarts
  draw from a generator seeded per step, so a resumed run repeats them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Quantized:
    """``model.quantize`` output plus the training losses."""

    z_q: torch.Tensor  # [B, D, h, w], straight-through (gradients flow to the encoder)
    indices: torch.Tensor  # [B * h * w] int64, row-major over (b, i, j)
    codebook_loss: torch.Tensor  # ||sg(h) - e||^2 (0 for the EMA codebook)
    commitment_loss: torch.Tensor  # ||h - sg(e)||^2 (unweighted)
    flat: torch.Tensor  # [B * h * w, D] detached encoder outputs (EMA update, restarts)


def quantize(model: nn.Module, h: torch.Tensor) -> Quantized:
    """Nearest-code quantisation of ``h`` [B, D, h, w] with VQ-VAE losses (not weighted)."""
    _, _, (_, _, indices) = model.quantize(h)  # diffusers: (z_q, loss, (perplexity, one_hot, idx))
    indices = indices.reshape(-1)
    codebook = model.quantize.embedding.weight
    flat = h.permute(0, 2, 3, 1).reshape(-1, h.shape[1])
    e = codebook[indices]
    codebook_loss = (e - flat.detach()).pow(2).mean()
    commitment = (flat - e.detach()).pow(2).mean()
    z_q = flat + (e - flat).detach()  # straight-through estimator
    b, d, hh, ww = h.shape
    z_q = z_q.reshape(b, hh, ww, d).permute(0, 3, 1, 2).contiguous()
    return Quantized(z_q, indices, codebook_loss, commitment, flat.detach())


def usage_stats(indices: torch.Tensor, num_codes: int) -> dict[str, float]:
    """Fraction of codes used and perplexity ``exp(H)`` of the code histogram of a batch."""
    counts = torch.bincount(indices.reshape(-1), minlength=num_codes).double()
    p = counts / counts.sum().clamp_min(1)
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return {"usage": float((counts > 0).double().mean()), "perplexity": float(entropy.exp())}


class EMACodebook(nn.Module):
    """EMA statistics of a codebook (buffers ``count`` [K], ``sum`` [K, D]) and its updates.

    ``update(codebook, flat, indices, generator)`` moves ``codebook`` (a no-grad parameter)
    to the EMA means with Laplace smoothing (Sonnet's ``VectorQuantizerEMA``), then restarts
    dead codes; returns the number of codes restarted.
    """

    def __init__(self, num_codes: int, dim: int, *, decay: float = 0.99,
                 dead_threshold: float = 1.0, eps: float = 1e-5) -> None:
        super().__init__()
        self.decay, self.dead_threshold, self.eps = decay, dead_threshold, eps
        self.register_buffer("count", torch.zeros(num_codes))
        self.register_buffer("sum", torch.zeros(num_codes, dim))

    @torch.no_grad()
    def update(self, codebook: torch.Tensor, flat: torch.Tensor, indices: torch.Tensor,
               generator: torch.Generator) -> int:
        k = self.count.numel()
        onehot_counts = torch.bincount(indices, minlength=k).to(self.count.dtype)
        sums = torch.zeros_like(self.sum).index_add_(0, indices, flat.to(self.sum.dtype))
        self.count.mul_(self.decay).add_(onehot_counts, alpha=1 - self.decay)
        self.sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        n = self.count.sum()
        smoothed = (self.count + self.eps) / (n + k * self.eps) * n
        codebook.copy_(self.sum / smoothed.unsqueeze(1))
        dead = torch.nonzero(self.count < self.dead_threshold).reshape(-1)
        if len(dead):
            pick = torch.randint(len(flat), (len(dead),), generator=generator,
                                 device=generator.device).to(flat.device)
            codebook[dead] = flat[pick].to(codebook.dtype)
            self.sum[dead] = flat[pick].to(self.sum.dtype)
            self.count[dead] = 1.0
        return len(dead)
