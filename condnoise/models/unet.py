"""LDM-style U-Net (diffusers ``UNet2DConditionModel``) conditioned by cross-attention on the
condition embedding used as a one-token context (paper Sec. 4: LDM-4, channels 192,
multipliers 1,2,3,5, one attention head, cross-attention conditioning)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from condnoise.conditioning.embedding import CondEmbedding
from condnoise.errors import UserError

#: preset -> U-Net settings. ``attention``: per resolution level, whether it has
#: (cross-)attention; ``cond_dim``: default condition-embedding size (the context size).
UNET_PRESETS: dict[str, dict[str, Any]] = {
    # LDM-4 cin256 config: model_channels 192, mult 1,2,3,5, attention at 32/16/8 of a 64
    # latent, 2 res blocks, 1 head, transformer depth 1, ClassEmbedder dim 512.
    "ldm": {
        "channels": [192, 384, 576, 960],
        "attention": [False, True, True, True],
        "layers_per_block": 2,
        "heads": 1,
        "norm_groups": 32,
        "cond_dim": 512,
    },
    # Fashion-MNIST (32x32x1), CPU-sized: cross-attention at the 8x8 level only (45 img/s
    # training on 2 idle CPU cores at batch 64; channels 64/128/128 with attention at 16x16
    # too ran 13.8 img/s there).
    "fmnist": {
        "channels": [32, 64, 128],
        "attention": [False, False, True],
        "layers_per_block": 1,
        "heads": 4,
        "norm_groups": 16,
        "cond_dim": 128,
    },
    # scenes (32x32x3 captions), CPU-sized: cross-attention on the caption tokens at the 8x8
    # level (and the middle block), where each cell is a 4x4 patch of the item positions;
    # bert-embed width 128. 1.4M denoiser parameters, 1.6 CPU-s per training step of 32 on one
    # loaded core (the convolutions are 2/3 of it).
    "scenes": {
        "channels": [32, 64, 64],
        "attention": [False, False, True],
        "layers_per_block": 1,
        "heads": 4,
        "norm_groups": 16,
        "cond_dim": 128,
    },
    # tiny CPU model for tests and smoke runs
    "tiny": {
        "channels": [32, 64],
        "attention": [False, True],
        "layers_per_block": 1,
        "heads": 2,
        "norm_groups": 8,
        "cond_dim": 64,
    },
}


class UNet(nn.Module):
    """``forward(x [B,C,H,W], t [B], emb: CondEmbedding) -> eps``; ``emb.tokens [B, L,
    cond_dim]`` are the context of every cross-attention layer (a class: one token); with
    ``text`` the padding is masked out and ``emb.pooled`` joins the time embedding."""

    def __init__(
        self,
        *,
        in_channels: int,
        image_size: int,
        cond_dim: int,
        channels: list[int],
        attention: list[bool],
        layers_per_block: int = 2,
        heads: int = 1,
        norm_groups: int = 32,
        learn_sigma: bool = False,
        checkpointing: bool = False,
        text: bool = False,
        guidance_dim: int | None = None,
    ) -> None:
        super().__init__()
        from diffusers import UNet2DConditionModel

        from condnoise.models.conv_unet import zero_guidance_projection

        if len(channels) != len(attention):
            raise UserError(
                f"U-Net: 'channels' ({len(channels)} levels) and 'attention' ({len(attention)}) differ in length"
            )
        if any(ch % norm_groups for ch in channels):
            raise UserError(f"U-Net: every channel count {channels} must be divisible by norm_groups {norm_groups}")
        if image_size % 2 ** (len(channels) - 1):
            raise UserError(
                f"U-Net: image size {image_size} not divisible by 2^{len(channels) - 1} (number of downsamplings)"
            )
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        down = ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention]
        up = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)]
        self.net = UNet2DConditionModel(
            sample_size=image_size,
            in_channels=in_channels,
            out_channels=self.out_channels,
            down_block_types=tuple(down),
            up_block_types=tuple(up),
            mid_block_type="UNetMidBlock2DCrossAttn",
            block_out_channels=tuple(channels),
            layers_per_block=layers_per_block,
            norm_num_groups=norm_groups,
            cross_attention_dim=cond_dim,
            attention_head_dim=heads,  # diffusers' historical name: the number of heads
            # text: the pooled caption is added to the time embedding (as SDXL's text_embeds)
            **({"class_embed_type": "projection", "projection_class_embeddings_input_dim": cond_dim}
               if text else {}),
            time_cond_proj_dim=guidance_dim,  # an LCM student's guidance embedding
        )
        zero_guidance_projection(self.net)
        self.text = text
        if checkpointing:
            self.net.enable_gradient_checkpointing()

    def diffusers_conditions(self, emb: CondEmbedding, dtype: torch.dtype) -> dict[str, Any]:
        """The condition inputs of diffusers' U-Net (and of a ControlNet copy of it):
        ``encoder_hidden_states`` (the tokens) and ``class_labels`` (text: the pooled caption)."""
        pooled = emb.pooled.to(dtype) if self.text else None
        return {"encoder_hidden_states": emb.tokens.to(dtype), "class_labels": pooled}

    def forward(self, x: torch.Tensor, t: torch.Tensor, emb: CondEmbedding, **extra: Any) -> torch.Tensor:
        """``extra`` goes to diffusers (``timestep_cond``, ``down_block_additional_residuals``,
        ``mid_block_additional_residual``, ``down_intrablock_additional_residuals``)."""
        if self.text:  # mask out padding; a class (one token) keeps the mask-free path
            extra = {"encoder_attention_mask": emb.mask, "class_labels": emb.pooled.to(x.dtype), **extra}
        return self.net(x, t, encoder_hidden_states=emb.tokens.to(x.dtype), return_dict=False,
                        **extra)[0]  # fmt: skip
