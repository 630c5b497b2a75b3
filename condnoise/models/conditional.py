"""The conditional diffusion model: condition encoder -> perturbation -> denoiser.

``build_model(model_cfg, *, in_channels, image_size, num_classes)`` from the typed model
config (:mod:`condnoise.models.config`, or a plain mapping of it).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from condnoise.conditioning.encoders import ClassEmbedder, cfg_drop
from condnoise.conditioning.perturb import Perturbation, build_perturbation
from condnoise.errors import UserError
from condnoise.models.config import ModelConfig


class ConditionalDiffusionModel(nn.Module):
    """``forward(x_t, t, labels, *, sample_index=None, step=None) -> eps``.

    Training mode: labels go to the null class with probability ``cfg_dropout``, then the
    embedding is perturbed (non-null rows only). Eval mode: neither (labels may hold
    ``null_index`` for the unconditional branch of CFG).
    """

    def __init__(
        self,
        encoder: ClassEmbedder,
        perturbation: Perturbation,
        denoiser: nn.Module,
        *,
        cfg_dropout: float = 0.1,
        config: dict | None = None,
    ) -> None:
        super().__init__()
        self.encoder, self.perturbation, self.denoiser = encoder, perturbation, denoiser
        self.cfg_dropout = cfg_dropout
        self.config = config or {}

    @property
    def num_classes(self) -> int:
        return self.encoder.num_classes

    @property
    def null_index(self) -> int:
        return self.encoder.null_index

    @property
    def input_perturbation(self) -> float:
        """xi of input perturbation (read by ``diffusion_loss``)."""
        return self.perturbation.input_perturbation

    def embed(
        self, labels: torch.Tensor, *, sample_index: torch.Tensor | None = None, step: int | None = None
    ) -> torch.Tensor:
        """Condition embedding ``[B, cond_dim]`` (CFG dropout and perturbation in training)."""
        if labels.device.type == "cpu":
            self.encoder.check_labels(labels)
        if self.training:
            labels = cfg_drop(labels, self.cfg_dropout, self.null_index)
        c = self.encoder.encode(labels)
        return self.perturbation(c, labels, encoder=self.encoder, sample_index=sample_index, step=step)

    def forward(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        labels: torch.Tensor,
        *,
        sample_index: torch.Tensor | None = None,
        step: int | None = None,
    ) -> torch.Tensor:
        if labels.shape[0] != x_t.shape[0]:
            raise UserError(f"model input: {x_t.shape[0]} images but {labels.shape[0]} labels")
        c = self.embed(labels, sample_index=sample_index, step=step)
        return self.denoiser(x_t, t, c)


def build_model(
    model_cfg: ModelConfig | dict[str, Any], *, in_channels: int, image_size: int, num_classes: int
) -> ConditionalDiffusionModel:
    """Build encoder + perturbation + denoiser from a model config.

    The resolved config (every default filled in) is kept as ``model.config``.
    """
    cfg = ModelConfig.from_dict(model_cfg)
    if num_classes < 1:
        raise UserError(f"build_model: num_classes must be >= 1, got {num_classes}")
    resolved = cfg.resolved()
    denoiser = cfg.build_denoiser(in_channels=in_channels, image_size=image_size)
    encoder = ClassEmbedder(num_classes, resolved["cond_dim"], init_std=resolved["embed_init_std"])
    perturbation = build_perturbation(**resolved["perturbation"])
    return ConditionalDiffusionModel(encoder, perturbation, denoiser,
                                     cfg_dropout=resolved["cfg_dropout"], config=resolved)  # fmt: skip
