"""Autoencoder interface: the denoiser works on ``z = encode(x)``; samples are ``decode(z)``.

Pixel space (the embedded default) uses :class:`IdentityAutoencoder`. Latent models plug
in through :class:`DiffusersAutoencoder` (a local diffusers ``AutoencoderKL`` / ``VQModel``
folder, e.g. the SD VAE of DiT or the VQ-f4 of LDM-4, paper Sec. 4).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from condnoise.errors import UserError
from condnoise.models.config import AutoencoderConfig


class IdentityAutoencoder(nn.Module):
    """Pixel space: ``encode`` and ``decode`` are the identity; ``scale = 1``."""

    kind = "identity"
    downsample = 1

    def latent_shape(self, image_shape: tuple[int, int, int]) -> tuple[int, int, int]:
        return tuple(image_shape)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z

    def config(self) -> dict[str, Any]:
        return {"kind": self.kind}


class DiffusersAutoencoder(nn.Module):
    """Frozen diffusers autoencoder; latents are scaled by ``scaling_factor`` (SD VAE: 0.18215).

    ``kind``: ``kl`` (``AutoencoderKL``, encode takes the posterior mean) or ``vq`` (``VQModel``:
    the pre-quantisation latents, as LDM, or with ``quantize`` the nearest codebook vectors).
    ``model`` may be given directly (tests, already loaded weights) instead of ``path``.
    """

    def __init__(
        self,
        path: str | None = None,
        kind: str = "kl",
        scaling_factor: float | None = None,
        *,
        model: nn.Module | None = None,
        quantize: bool = False,
    ) -> None:
        super().__init__()
        from diffusers import AutoencoderKL, VQModel

        classes = {"kl": AutoencoderKL, "vq": VQModel}
        if kind not in classes:
            raise UserError(f"autoencoder kind {kind!r} unknown; choose one of {sorted(classes)}")
        if model is None:
            if path is None or not Path(path).is_dir():
                raise UserError(f"autoencoder folder {path!r} not found (a local diffusers model folder)")
            from condnoise.models.first_stage import check_folder_kind

            check_folder_kind(path, kind)  # a VQModel read as kl (or back) would load silently
            try:
                model = classes[kind].from_pretrained(path)
            except (OSError, ValueError) as e:
                raise UserError(f"cannot load {kind} autoencoder from {path}: {e}") from None
        if quantize and kind != "vq":
            raise UserError(f"autoencoder quantize needs kind vq, got kind {kind}")
        self.kind, self.path, self.model = kind, path, model.eval().requires_grad_(False)
        self.quantize = quantize
        cfg = model.config
        self.scale = float(scaling_factor if scaling_factor is not None else getattr(cfg, "scaling_factor", 1.0))
        self.downsample = 2 ** (len(cfg.block_out_channels) - 1)
        from condnoise.models.first_stage import latent_channels_of

        self.latent_channels = latent_channels_of(model)  # VQ: vq_embed_dim (after quant_conv)

    def latent_shape(self, image_shape: tuple[int, int, int]) -> tuple[int, int, int]:
        _, h, w = image_shape
        return (self.latent_channels, h // self.downsample, w // self.downsample)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "kl":
            z = self.model.encode(x).latent_dist.mean
        else:
            z = self.model.encode(x).latents
            if self.quantize:  # the codebook rows themselves (no straight-through z + (q - z))
                b, _, h, w = z.shape
                idx = self.model.quantize(z)[2][2].reshape(b, h, w)
                z = self.model.quantize.embedding(idx).permute(0, 3, 1, 2).contiguous()
        return z * self.scale

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.model.decode(z / self.scale).sample

    def config(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": self.path, "scaling_factor": self.scale,
                "quantize": self.quantize}


def build_autoencoder(cfg: AutoencoderConfig | dict | None = None) -> nn.Module:
    """``None`` / ``{"kind": "identity"}`` -> pixels; ``{"kind": "kl"|"vq", "path": ..., "scaling_factor": ...}``."""
    cfg = AutoencoderConfig.from_dict(cfg or {"kind": "identity"})
    if cfg.kind == "identity":
        return IdentityAutoencoder()
    return DiffusersAutoencoder(cfg.path, cfg.kind, cfg.scaling_factor, quantize=cfg.quantize)
