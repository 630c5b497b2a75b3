"""Small convolutional class-conditional U-Net (diffusers ``UNet2DConditionModel``, no
attention): the condition vector joins the timestep embedding.

The class embedding ``c`` (after the perturbation, so CEP acts on it exactly as in paper
Sec. 3) enters through diffusers' ``class_embed_type``: ``projection`` (an MLP from
``cond_dim`` to the time-embedding width, added to the time embedding) or ``identity``
(``c`` added as is; needs ``cond_dim`` = time-embedding width = 4 x the first channel
count). Every ResNet block then applies the summed embedding as a GroupNorm scale / shift
(``resnet_time_scale_shift="scale_shift"``, ADM's adaptive group norm, Dhariwal & Nichol
2021). Built on ``UNet2DConditionModel`` (not ``UNet2DModel``) so that
``ControlNetModel.from_unet`` and LCM's ``time_cond_proj_dim`` apply to the same family.
CPU-sized: at 16 x 16 the ``xs`` size trains about 110 images per CPU-second (BENCHMARKS.md).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from condnoise.conditioning.embedding import CondEmbedding
from condnoise.errors import UserError

#: size -> settings; ``channels`` per resolution level (one downsampling between levels)
CONV_UNET_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"channels": [16, 32], "layers_per_block": 1, "norm_groups": 8},  # tests
    "xs": {"channels": [32, 64], "layers_per_block": 1, "norm_groups": 8},  # 16x16 demo
    "s": {"channels": [32, 64, 64], "layers_per_block": 1, "norm_groups": 8},  # 32x32
    "m": {"channels": [64, 128, 128], "layers_per_block": 2, "norm_groups": 16},
}
CLASS_EMBED_TYPES = ("projection", "identity")


def time_embed_dim(channels: list[int]) -> int:
    """diffusers' time-embedding width: 4 x the first level's channels."""
    return 4 * int(channels[0])


class ConvUNet(nn.Module):
    """``forward(x [B,C,H,W], t [B], emb: CondEmbedding, **extra) -> eps or v``; the
    condition vector is ``emb.pooled`` (a class vector; for a text model the pooled caption,
    a global condition only: no cross-attention). ``guidance_dim``: an LCM student's guidance
    embedding width (diffusers' ``time_cond_proj_dim``; ``extra["timestep_cond"]``)."""

    def __init__(
        self,
        *,
        in_channels: int,
        image_size: int,
        cond_dim: int,
        channels: list[int],
        layers_per_block: int = 1,
        norm_groups: int = 8,
        class_embed: str = "projection",
        learn_sigma: bool = False,
        checkpointing: bool = False,
        text: bool = False,
        guidance_dim: int | None = None,
    ) -> None:
        super().__init__()
        from diffusers import UNet2DConditionModel

        _check(channels, norm_groups, image_size, class_embed, cond_dim)
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        levels = len(channels)
        self.net = UNet2DConditionModel(
            sample_size=image_size,
            in_channels=in_channels,
            out_channels=self.out_channels,
            down_block_types=("DownBlock2D",) * levels,
            up_block_types=("UpBlock2D",) * levels,
            mid_block_type="UNetMidBlock2D",  # one ResNet block, no attention
            block_out_channels=tuple(channels),
            layers_per_block=layers_per_block,
            norm_num_groups=norm_groups,
            class_embed_type=class_embed,
            projection_class_embeddings_input_dim=cond_dim if class_embed == "projection" else None,
            resnet_time_scale_shift="scale_shift",
            time_cond_proj_dim=guidance_dim,
        )
        zero_guidance_projection(self.net)
        if checkpointing:
            self.net.enable_gradient_checkpointing()

    def diffusers_conditions(self, emb: CondEmbedding, dtype: torch.dtype) -> dict[str, Any]:
        """The condition inputs of diffusers' U-Net (and of a ControlNet copy of it): no
        tokens, the condition vector as ``class_labels``."""
        return {"encoder_hidden_states": None, "class_labels": emb.pooled.to(dtype)}

    def forward(self, x: torch.Tensor, t: torch.Tensor, emb: CondEmbedding, **extra: Any) -> torch.Tensor:
        """``extra`` goes to diffusers (``timestep_cond``, adapter residuals)."""
        return self.net(x, t, encoder_hidden_states=None, class_labels=emb.pooled.to(x.dtype),
                        return_dict=False, **extra)[0]  # fmt: skip


def zero_guidance_projection(net: nn.Module) -> None:
    """Zero the projection of an LCM student's guidance embedding (diffusers'
    ``time_embedding.cond_proj``, present when ``time_cond_proj_dim`` is set), so a student
    copied from its teacher starts as the teacher (:mod:`condnoise.models.guidance`)."""
    proj = getattr(getattr(net, "time_embedding", None), "cond_proj", None)
    if proj is not None:
        nn.init.zeros_(proj.weight)


def _check(channels: list[int], groups: int, size: int, class_embed: str, cond_dim: int) -> None:
    """One-line UserErrors for settings diffusers would reject with a traceback."""
    if class_embed not in CLASS_EMBED_TYPES:
        raise UserError(f"conv U-Net: class_embed {class_embed!r} unknown; choose one of "
                        f"{', '.join(CLASS_EMBED_TYPES)}")  # fmt: skip
    if any(ch % groups for ch in channels):
        raise UserError(f"conv U-Net: every channel count {channels} must be divisible by norm_groups {groups}")
    if size % 2 ** (len(channels) - 1):
        raise UserError(f"conv U-Net: image size {size} not divisible by 2^{len(channels) - 1} "
                        "(number of downsamplings)")  # fmt: skip
    if class_embed == "identity" and cond_dim != time_embed_dim(channels):
        raise UserError(f"conv U-Net: class_embed identity needs cond_dim = {time_embed_dim(channels)} "
                        f"(4 x channels[0]), got {cond_dim}")  # fmt: skip
