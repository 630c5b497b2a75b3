"""The conditional diffusion model: condition encoder -> perturbation -> denoiser.

``build_model(model_cfg, *, in_channels, image_size, num_classes)`` from the typed model
config (:mod:`condnoise.models.config`, or a plain mapping of it); the encoder is the
class embedder or the text encoder of ``model.encoder``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from condnoise.conditioning.embedding import CondEmbedding
from condnoise.conditioning.encoders import ClassEmbedder, cfg_drop
from condnoise.conditioning.perturb import Perturbation, build_perturbation
from condnoise.conditioning.text import build_text_encoder
from condnoise.errors import UserError
from condnoise.models.config import ModelConfig


class ConditionalDiffusionModel(nn.Module):
    """``forward(x_t, t, cond, *, sample_index=None, step=None, **extra) -> model output``.

    ``cond``: class labels int64 ``[B]`` or token ids int64 ``[B, L]`` (text encoders), as
    the encoder makes them (``encoder.as_cond`` / ``encoder.tokenize``). Training mode:
    rows go to the null condition with probability ``cfg_dropout``, then the embedding is
    perturbed (non-null rows, real tokens only). Eval mode: neither (``cond`` may hold null
    rows, ``null_like(cond)``, for the unconditional branch of CFG). ``extra`` goes to the
    denoiser (e.g. ``timestep_cond``, adapter residuals).
    """

    def __init__(
        self,
        encoder: nn.Module,
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
    def condition_kind(self) -> str:
        """``"class"`` or ``"text"`` (the encoder's kind)."""
        return self.encoder.kind

    @property
    def num_classes(self) -> int:
        return int(getattr(self.encoder, "num_classes", 0))

    @property
    def null_index(self) -> int:
        """The null class label (class models only)."""
        if self.encoder.kind != "class":
            raise UserError("a text model has no null class label; use model.null_like(cond)")
        return self.encoder.null_index

    @property
    def input_perturbation(self) -> float:
        """xi of input perturbation (read by ``diffusion_loss``)."""
        return self.perturbation.input_perturbation

    @property
    def lcm(self) -> dict[str, Any] | None:
        """An LCM student's ``{w_embed_dim, solver_steps}`` (``model.lcm``); None otherwise."""
        return self.config.get("lcm")

    def guidance_cond(self, guidance: torch.Tensor) -> torch.Tensor:
        """An LCM student's ``timestep_cond`` for CFG scales ``guidance [B]`` (the embedding of
        ``w = s - 1``, :mod:`condnoise.models.guidance`)."""
        from condnoise.models.guidance import guidance_embedding

        if not self.lcm:
            raise UserError("this model has no guidance embedding: it is not an LCM student "
                            "(make one with `condnoise distill lcm`)")  # fmt: skip
        return guidance_embedding(guidance.float() - 1.0, int(self.lcm["w_embed_dim"]))

    def null_like(self, cond: torch.Tensor) -> torch.Tensor:
        """Null (unconditional) conditions of ``cond``'s shape: the null class / empty caption."""
        return self.encoder.null_like(cond)

    def is_null(self, cond: torch.Tensor) -> torch.Tensor:
        """bool ``[B]``: rows holding the null condition."""
        return self.encoder.is_null(cond)

    def embed(
        self, cond: torch.Tensor, *, sample_index: torch.Tensor | None = None, step: int | None = None
    ) -> CondEmbedding:
        """The condition embedding (CFG dropout and perturbation in training mode)."""
        if cond.device.type == "cpu":
            self.encoder.check(cond)
        if self.training:
            cond = cfg_drop(cond, self.cfg_dropout, self.encoder.null_like(cond))
        emb = self.encoder.embed(cond)
        return self.perturbation(emb, cond, encoder=self.encoder, sample_index=sample_index, step=step)

    def forward(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        cond: torch.Tensor,
        *,
        sample_index: torch.Tensor | None = None,
        step: int | None = None,
        **extra: Any,
    ) -> torch.Tensor:
        if cond.shape[0] != x_t.shape[0]:
            raise UserError(f"model input: {x_t.shape[0]} images but {cond.shape[0]} conditions (labels or "
                            "token-id rows)")
        emb = self.embed(cond, sample_index=sample_index, step=step)
        return self.denoiser(x_t, t, emb, **extra)


def build_encoder(cfg: ModelConfig, resolved: dict[str, Any], num_classes: int) -> nn.Module:
    """The condition encoder of a model config: the class embedder or a text encoder."""
    enc = cfg.encoder
    if not cfg.is_text:
        if num_classes < 1:
            raise UserError(f"build_model: a class model needs num_classes >= 1, got {num_classes} "
                            "(captions need a text encoder: model.encoder.name bert-embed, minilm or clip)")  # fmt: skip
        return ClassEmbedder(num_classes, resolved["cond_dim"], init_std=resolved["embed_init_std"])
    assert enc is not None
    return build_text_encoder(enc.name, path=enc.path, max_length=enc.max_length, dim=resolved["cond_dim"],
                              depth=enc.depth, heads=enc.heads, cache_size=enc.cache_size)  # fmt: skip


def build_model(
    model_cfg: ModelConfig | dict[str, Any], *, in_channels: int, image_size: int, num_classes: int = 0
) -> ConditionalDiffusionModel:
    """Build encoder + perturbation + denoiser from a model config (``num_classes``: class
    models only).

    The resolved config (every default filled in; ``cond_dim`` = the encoder's token width)
    is kept as ``model.config``.
    """
    cfg = ModelConfig.from_dict(model_cfg)
    resolved = cfg.resolved()
    encoder = build_encoder(cfg, resolved, num_classes)
    resolved["cond_dim"] = encoder.dim
    denoiser = cfg.build_denoiser(in_channels=in_channels, image_size=image_size, cond_dim=encoder.dim)
    perturbation = build_perturbation(**resolved["perturbation"])
    if cfg.adapter is not None:  # a fine-tuned ControlNet / T2I-Adapter on this base
        from condnoise.models.adapters import ControlledDiffusionModel, build_adapter

        a = cfg.adapter
        adapter = build_adapter(a.kind, denoiser, control_channels=a.control_channels, downscale=a.downscale,
                                image_size=image_size, t2i_type=a.t2i_type, num_res_blocks=a.num_res_blocks)
        return ControlledDiffusionModel(encoder, perturbation, denoiser, adapter,
                                        cfg_dropout=resolved["cfg_dropout"], config=resolved)  # fmt: skip
    return ConditionalDiffusionModel(encoder, perturbation, denoiser,
                                     cfg_dropout=resolved["cfg_dropout"], config=resolved)  # fmt: skip
