"""The guidance embedding of a latent consistency student (Luo et al. 2023, Sec. 4.2, "w-conditioned"
consistency model): the classifier-free guidance scale enters the denoiser as an input, so one
forward pass gives the guided output.

``w`` is the LCM paper's guidance weight, ``w = s - 1`` for the project's CFG scale s
(``out_u + s (out_c - out_u)``, :mod:`condnoise.diffusion.samplers`): diffusers'
``LatentConsistencyModelPipeline`` embeds ``guidance_scale - 1`` the same way. The embedding is
the sinusoidal one of VDM (Kingma et al. 2021, appendix) of ``1000 w``; the denoiser adds a
learned projection of it to its timestep features (diffusers' ``time_cond_proj_dim`` for the
U-Nets, :class:`~condnoise.models.dit.DiT`'s ``w_proj``), zero-initialised so that a student
copied from its teacher starts as the teacher.
"""

from __future__ import annotations

import math

import torch

from condnoise.errors import UserError


def guidance_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """``[B]`` guidance weights -> float32 ``[B, dim]``: ``[sin(1000 w f_k), cos(1000 w f_k)]``
    with ``f_k = 10000^(-k / (dim/2 - 1))`` (zero-padded for odd ``dim``)."""
    if w.dim() != 1:
        raise UserError(f"guidance embedding: expected one weight per row [B], got shape {list(w.shape)}")
    if dim < 4:
        raise UserError(f"guidance embedding width must be >= 4, got {dim}")
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=w.device, dtype=torch.float32) / (half - 1))
    args = 1000.0 * w.float()[:, None] * freqs[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return torch.nn.functional.pad(emb, (0, dim % 2))
