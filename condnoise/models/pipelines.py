"""diffusers pipelines as condnoise models (the paper's released models, e.g. its CC3M LDMs
as ``LDMTextToImagePipeline`` and DiT-XL/2 as ``DiTPipeline``), so the same samplers,
guidance sweeps and metrics run on them.

Each wrapper is a model in the sense of the samplers: ``forward(x_t, t, cond) -> eps`` with
``null_like`` / ``is_null`` / ``condition_kind`` and an ``encoder`` (``tokenize`` for text).
They compute what the pipelines' own ``__call__`` computes for one denoising step:

- LDM text-to-image: ``cond`` are BERT token ids padded to 77 (the pipeline's
  ``tokenizer(..., padding="max_length", max_length=77)``), the context is
  ``bert(ids)[0]`` over all 77 positions (the pipeline passes no attention mask), the null
  condition is the empty prompt "";
- DiT: ``cond`` are class labels, the null class is ``num_embeds_ada_norm`` (1000 for
  ImageNet, the pipeline's ``class_null``); the output keeps the learned-sigma channels
  (the samplers use the first C).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from condnoise.conditioning.embedding import CondEmbedding
from condnoise.conditioning.text import TextEncoder, Tokenizer
from condnoise.errors import UserError

LDM_MAX_LENGTH = 77  # LDMTextToImagePipeline pads / truncates prompts to 77 tokens


class PipelineText(TextEncoder):
    """The LDM pipeline's ``bert`` on its tokenizer's ids (all positions, as the pipeline)."""

    name = "ldm-bert"

    def __init__(self, tokenizer: Tokenizer, bert: nn.Module) -> None:
        super().__init__(tokenizer, int(bert.config.d_model))
        self.bert = bert.eval().requires_grad_(False)

    def embed(self, ids: torch.Tensor) -> CondEmbedding:
        tokens = self.bert(ids)[0]
        mask = torch.ones(ids.shape, dtype=torch.bool, device=ids.device)
        return CondEmbedding.from_tokens(tokens, mask, self.is_null(ids))


class LDMTextModel(nn.Module):
    """``LDMTextToImagePipeline``'s U-Net cross-attending to its BERT's token states."""

    condition_kind = "text"

    def __init__(self, unet: nn.Module, encoder: PipelineText) -> None:
        super().__init__()
        self.unet, self.encoder = unet.eval().requires_grad_(False), encoder

    def null_like(self, cond: torch.Tensor) -> torch.Tensor:
        return self.encoder.null_like(cond)

    def is_null(self, cond: torch.Tensor) -> torch.Tensor:
        return self.encoder.is_null(cond)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, **extra: Any) -> torch.Tensor:
        ctx = self.encoder.embed(cond).tokens.to(x_t.dtype)
        return self.unet(x_t, t, encoder_hidden_states=ctx, **extra).sample


class ClassLabels(nn.Module):
    """Class labels with the null class ``num_classes`` (what a diffusers DiT embeds)."""

    kind = "class"

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = int(num_classes)

    def null_like(self, labels: torch.Tensor) -> torch.Tensor:
        return torch.full_like(labels, self.num_classes)

    def is_null(self, labels: torch.Tensor) -> torch.Tensor:
        return labels == self.num_classes

    def check(self, labels: torch.Tensor) -> None:
        if labels.dim() != 1 or (labels.numel() and int(labels.max()) > self.num_classes):
            raise UserError(f"this DiT pipeline takes class labels [B] in [0, {self.num_classes}]")


class DiTClassModel(nn.Module):
    """``DiTPipeline``'s transformer (adaLN-Zero on its own class embedding)."""

    condition_kind = "class"

    def __init__(self, transformer: nn.Module) -> None:
        super().__init__()
        self.transformer = transformer.eval().requires_grad_(False)
        self.encoder = ClassLabels(transformer.config.num_embeds_ada_norm)

    @property
    def num_classes(self) -> int:
        return self.encoder.num_classes

    def null_like(self, cond: torch.Tensor) -> torch.Tensor:
        return self.encoder.null_like(cond)

    def is_null(self, cond: torch.Tensor) -> torch.Tensor:
        return self.encoder.is_null(cond)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, **extra: Any) -> torch.Tensor:
        if cond.device.type == "cpu":
            self.encoder.check(cond)
        return self.transformer(x_t, timestep=t, class_labels=cond, **extra).sample
