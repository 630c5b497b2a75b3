"""PatchGAN discriminator of the VQGAN / LDM first stage.

``NLayerDiscriminator`` of pix2pix (Isola et al. 2017, Sec. 3.2.2: a fully convolutional
net whose outputs each judge one receptive-field patch) as used by taming-transformers
(Esser et al. 2021) and LDM: 4x4 convolutions, stride 2 for ``n_layers`` levels, then two
stride-1 layers, LeakyReLU(0.2), a normalisation after every layer but the first and the
last; weights initialised N(0, 0.02) (norm scales N(1, 0.02)) as in pix2pix.
diffusers has no discriminator, hence this module.
"""

from __future__ import annotations

import torch
from torch import nn

NORMS = ("batch", "group")


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    return nn.GroupNorm(min(32, channels // 4) or 1, channels)


class NLayerDiscriminator(nn.Module):
    """Patch logits ``[B, 1, h, w]`` for images ``[B, C, H, W]`` in [-1, 1]."""

    def __init__(self, in_channels: int = 3, width: int = 64, n_layers: int = 3,
                 norm: str = "batch") -> None:
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        layers: list[nn.Module] = [nn.Conv2d(in_channels, width, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        ch = width
        for n in range(1, n_layers + 1):
            out = width * min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(ch, out, 4, stride, 1, bias=False), _norm(norm, out),
                       nn.LeakyReLU(0.2, True)]
            ch = out
        layers.append(nn.Conv2d(ch, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        self.apply(_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def _init(m: nn.Module) -> None:
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d | nn.GroupNorm):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)
