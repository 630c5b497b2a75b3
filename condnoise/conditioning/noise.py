"""The CEP noise (paper Sec. 3), shared by the model's perturbations and ``condnoise.cep.attach``.

For an embedding of width d (the token width D for token sequences):

- CEP-U: ``delta ~ U(-gamma/sqrt(d), gamma/sqrt(d))`` per coordinate, ``E||delta||^2 = gamma^2/3``;
- CEP-G: ``delta ~ N(0, sigma^2)`` with ``sigma = gamma/sqrt(d)`` (``scale="std"``, default,
  ``E||delta||^2 = gamma^2``) or the paper's literal ``N(0, gamma/sqrt(d) I)`` read as a
  variance (``scale="variance"``, ``sigma^2 = gamma/sqrt(d)``).

Draws come from ``generator`` when given, else from the global RNG of the tensor's device
(which a trainer checkpoints, so resumes are bitwise).
"""

from __future__ import annotations

import math

import torch

from condnoise.errors import UserError

NOISES = ("uniform", "gaussian")
SCALES = ("std", "variance")


def check_noise(noise: str, scale: str = "std") -> None:
    if noise not in NOISES:
        raise UserError(f"CEP noise must be one of {', '.join(NOISES)}, got {noise!r}")
    if scale not in SCALES:
        raise UserError(f"CEP scale must be one of {', '.join(SCALES)}, got {scale!r}")


def cep_sigma(gamma: float, d: int, scale: str = "std") -> float:
    """CEP-G's standard deviation for width ``d``."""
    s = gamma / math.sqrt(d)
    return s if scale == "std" else math.sqrt(s)


def cep_delta(
    like: torch.Tensor,
    gamma: float,
    noise: str = "uniform",
    *,
    scale: str = "std",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Fresh CEP noise of ``like``'s shape, dtype and device (width = its last dimension)."""
    d = like.shape[-1]
    if noise == "uniform":
        u = torch.rand(like.shape, device=like.device, dtype=like.dtype, generator=generator)
        return (2 * u - 1) * (gamma / math.sqrt(d))
    z = torch.randn(like.shape, device=like.device, dtype=like.dtype, generator=generator)
    return z * cep_sigma(gamma, d, scale)


def perturb_tokens(
    tokens: torch.Tensor,
    mask: torch.Tensor | None,
    gamma: float,
    noise: str = "uniform",
    *,
    scale: str = "std",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``tokens + delta`` on the positions where ``mask`` (``[B, L]``, True / nonzero = real
    token) holds; padding keeps its value exactly. ``mask=None`` perturbs everything."""
    out = tokens + cep_delta(tokens, gamma, noise, scale=scale, generator=generator)
    if mask is None:
        return out
    return torch.where(mask.bool()[..., None], out, tokens)
