"""Spatial-control adapters on a frozen U-Net base (paper Sec. 5, downstream personalization):
ControlNet (Zhang et al. 2023, "Adding Conditional Control to Text-to-Image Diffusion
Models") and T2I-Adapter (Mou et al. 2023), both from diffusers.

- ``controlnet``: ``ControlNetModel.from_unet`` of the base's ``UNet2DConditionModel`` (a
  trainable copy of its encoder and middle block, zero convolutions on every skip, a
  conditioning embedding sized to the base's downsampling: no stride-2 stage for a
  pixel-space base, ``log2(f)`` for an autoencoder of factor f, as diffusers' 4-stage
  embedding for SD's f = 8); its outputs go in as ``down_block_additional_residuals`` /
  ``mid_block_additional_residual``.
- ``t2i-adapter``: diffusers' ``T2IAdapter`` (``full`` or ``light``), whose features enter
  as ``down_intrablock_additional_residuals``. Two departures, both needed to fit our
  bases: diffusers adds the feature of a down block *without* cross-attention after that
  block's downsampler, so each feature is resized to the size the base expects there
  (average pooling, or nearest upsampling); and each feature passes a zero-initialised 1x1
  convolution (ControlNet's zero convolution), so the adapter starts as the identity on
  the base like ControlNet, instead of perturbing it from step 0.

Both families of our U-Nets (``unet``, ``conv-unet``) are ``UNet2DConditionModel`` and take
these residuals; DiT has no diffusers adapter (:data:`ADAPTER_FAMILIES`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from condnoise.conditioning.embedding import CondEmbedding
from condnoise.errors import UserError
from condnoise.models.conditional import ConditionalDiffusionModel

ADAPTERS = ("controlnet", "t2i-adapter")
ADAPTER_FAMILIES = ("unet", "conv-unet")
#: diffusers' ControlNet conditioning embedding for SD (f = 8): one stage per factor of 2
EMBEDDING_CHANNELS = (16, 32, 96, 256)


def check_family(family: str, what: str = "the base") -> None:
    """UserError unless the family takes diffusers' adapter residuals."""
    if family not in ADAPTER_FAMILIES:
        raise UserError(f"{what} is a {family} model: ControlNet and T2I-Adapter (diffusers) need a "
                        f"U-Net base (family {' or '.join(ADAPTER_FAMILIES)})")  # fmt: skip


def _stages(downscale: int) -> int:
    if downscale < 1 or downscale & (downscale - 1):
        raise UserError(f"model.adapter.downscale must be a power of 2 >= 1, got {downscale}")
    return int(math.log2(downscale))


class ControlNetAdapter(nn.Module):
    """``forward(x, t, emb, control, scale) -> residual kwargs`` of diffusers' U-Net."""

    def __init__(self, denoiser: nn.Module, control_channels: int, downscale: int = 1) -> None:
        super().__init__()
        from diffusers import ControlNetModel

        channels = EMBEDDING_CHANNELS[: _stages(downscale) + 1]
        if len(channels) <= _stages(downscale):
            raise UserError(f"model.adapter.downscale {downscale}: ControlNet's conditioning "
                            f"embedding downsamples at most {2 ** (len(EMBEDDING_CHANNELS) - 1)}x")
        self.net = ControlNetModel.from_unet(denoiser.net, conditioning_channels=control_channels,
                                             conditioning_embedding_out_channels=channels)  # fmt: skip

    @torch.no_grad()
    def copy_base(self, denoiser: nn.Module) -> None:
        """The trainable copy: the base's current encoder weights (``from_unet``'s copy)."""
        unet, net = denoiser.net, self.net
        for name in ("conv_in", "time_proj", "time_embedding", "class_embedding", "down_blocks", "mid_block"):
            mine = getattr(net, name, None)
            if mine is not None:
                mine.load_state_dict(getattr(unet, name).state_dict())

    def forward(self, x: torch.Tensor, t: torch.Tensor, emb: CondEmbedding, control: torch.Tensor,
                scale: float, base: nn.Module) -> dict[str, Any]:  # fmt: skip
        # diffusers' ControlNet takes no cross-attention mask: text bases' padding tokens are
        # attended by the copy (the base itself keeps its mask)
        cond = base.diffusers_conditions(emb, x.dtype)
        down, mid = self.net(x, t, cond["encoder_hidden_states"], control, conditioning_scale=float(scale),
                             class_labels=cond["class_labels"], return_dict=False)  # fmt: skip
        return {"down_block_additional_residuals": list(down), "mid_block_additional_residual": mid}


def residual_shapes(unet: nn.Module, size: int) -> list[tuple[int, int]]:
    """``(channels, side)`` where diffusers' U-Net adds each T2I-Adapter feature: inside a
    cross-attention down block (before its downsampler), after any other block (after it)."""
    cfg, out = unet.config, []
    levels = len(cfg.block_out_channels)
    for i, (kind, ch) in enumerate(zip(cfg.down_block_types, cfg.block_out_channels)):
        side = size // 2**i
        if "CrossAttn" not in kind and i < levels - 1:
            side //= 2
        out.append((int(ch), side))
    return out


class T2IAdapterModule(nn.Module):
    """diffusers' ``T2IAdapter`` with per-level zero 1x1 convolutions (module docstring)."""

    def __init__(self, denoiser: nn.Module, control_channels: int, downscale: int = 1, *,
                 kind: str = "full", num_res_blocks: int = 2, image_size: int = 32) -> None:  # fmt: skip
        super().__init__()
        from diffusers import T2IAdapter

        _stages(downscale)
        self.targets = residual_shapes(denoiser.net, image_size)
        chans = [c for c, _ in self.targets]
        if kind == "light":  # LightAdapter gives len(channels) + 1 features
            chans = chans[: max(1, len(chans) - 1)]
        elif kind != "full":
            raise UserError(f"model.adapter.t2i_type must be full or light, got {kind!r}")
        self.net = T2IAdapter(in_channels=control_channels, channels=chans, num_res_blocks=num_res_blocks,
                              downscale_factor=downscale, adapter_type=f"{kind}_adapter")  # fmt: skip
        with torch.no_grad():
            feats = self.net(torch.zeros(1, control_channels, image_size * downscale, image_size * downscale))
        self.zero = nn.ModuleList()
        for f, (ch, _) in zip(feats, self.targets):
            conv = nn.Conv2d(f.shape[1], ch, kernel_size=1)
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)
            self.zero.append(conv)

    def copy_base(self, denoiser: nn.Module) -> None:
        """Nothing to copy (T2I-Adapter is trained from scratch)."""

    def forward(self, x: torch.Tensor, t: torch.Tensor, emb: CondEmbedding, control: torch.Tensor,
                scale: float, base: nn.Module) -> dict[str, Any]:  # fmt: skip
        feats = []
        for f, conv, (_, side) in zip(self.net(control), self.zero, self.targets):
            if f.shape[-1] > side:
                f = F.adaptive_avg_pool2d(f, side)
            elif f.shape[-1] < side:
                f = F.interpolate(f, size=(side, side), mode="nearest")
            feats.append(conv(f) * float(scale))
        return {"down_intrablock_additional_residuals": feats}


def build_adapter(kind: str, denoiser: nn.Module, *, control_channels: int, downscale: int,
                  image_size: int, t2i_type: str = "full", num_res_blocks: int = 2) -> nn.Module:  # fmt: skip
    """The adapter ``kind`` (:data:`ADAPTERS`) on a U-Net denoiser of ``image_size`` inputs."""
    if not hasattr(denoiser, "diffusers_conditions"):
        raise UserError(f"{type(denoiser).__name__} takes no adapter: ControlNet and T2I-Adapter need a "
                        f"U-Net base (family {' or '.join(ADAPTER_FAMILIES)})")  # fmt: skip
    if kind == "controlnet":
        return ControlNetAdapter(denoiser, control_channels, downscale)
    if kind == "t2i-adapter":
        return T2IAdapterModule(denoiser, control_channels, downscale, kind=t2i_type,
                                num_res_blocks=num_res_blocks, image_size=image_size)  # fmt: skip
    raise UserError(f"unknown adapter {kind!r}; choose one of {', '.join(ADAPTERS)}")


class ControlledDiffusionModel(ConditionalDiffusionModel):
    """The conditional model with an adapter: ``forward(x_t, t, cond, *, control=None,
    control_scale=1.0, ...)``; ``control`` float ``[B, C, H, W]`` in [0, 1] (image
    resolution), ``None`` runs the base alone. The condition embedding (CFG dropout and the
    perturbation in training mode, paper Sec. 3) feeds both the base and the adapter."""

    def __init__(self, encoder: nn.Module, perturbation: Any, denoiser: nn.Module, adapter: nn.Module,
                 *, cfg_dropout: float = 0.1, config: dict | None = None) -> None:  # fmt: skip
        super().__init__(encoder, perturbation, denoiser, cfg_dropout=cfg_dropout, config=config)
        self.adapter = adapter

    @property
    def adapter_config(self) -> dict[str, Any]:
        return dict(self.config.get("adapter") or {})

    def freeze_base(self) -> None:
        """Freeze the encoder and the denoiser: only the adapter trains."""
        self.encoder.requires_grad_(False)
        self.denoiser.requires_grad_(False)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, *,
                control: torch.Tensor | None = None, control_scale: float = 1.0,
                sample_index: torch.Tensor | None = None, step: int | None = None,
                **extra: Any) -> torch.Tensor:  # fmt: skip
        if cond.shape[0] != x_t.shape[0]:
            raise UserError(f"model input: {x_t.shape[0]} images but {cond.shape[0]} conditions")
        emb = self.embed(cond, sample_index=sample_index, step=step)
        if control is not None:
            if control.shape[0] != x_t.shape[0]:
                raise UserError(f"model input: {x_t.shape[0]} images but {control.shape[0]} controls")
            extra = {**self.adapter(x_t, t, emb, control.to(x_t.dtype), control_scale, self.denoiser), **extra}
        return self.denoiser(x_t, t, emb, **extra)
