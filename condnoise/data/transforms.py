"""Image transforms without torchvision: scale to [-1, 1], pad, resize + centre-crop, flip.

Pixel values follow the usual diffusion convention ``x = pixel / 127.5 - 1`` (DDPM /
DiT), so black (the Fashion-MNIST background) maps to -1.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

BACKGROUND = -1.0


def uint8_to_unit(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float32 in [-1, 1] (vectorised; no copy of the uint8 input)."""
    if isinstance(images, np.ndarray):
        return torch.from_numpy(images.astype(np.float32)).div_(127.5).sub_(1.0)
    return images.to(torch.float32).div_(127.5).sub_(1.0)


def pad_to(images: torch.Tensor, size: int, value: float = BACKGROUND) -> torch.Tensor:
    """Pad ``[..., H, W]`` symmetrically to ``size x size`` with ``value`` (extra on the right)."""
    h, w = images.shape[-2:]
    if h > size or w > size:
        raise ValueError(f"cannot pad {h}x{w} to the smaller size {size}")
    top, left = (size - h) // 2, (size - w) // 2
    return F.pad(images, (left, size - w - left, top, size - h - top), value=value)


def resize_center_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize ``[N, C, H, W]`` so the shorter side is ``size`` (antialiased bilinear), then
    centre-crop to ``size x size``."""
    h, w = images.shape[-2:]
    if (h, w) == (size, size):
        return images
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    out = F.interpolate(images, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    top, left = (nh - size) // 2, (nw - size) // 2
    return out[..., top : top + size, left : left + size].clamp_(-1.0, 1.0).contiguous()


def pil_resize_center_crop(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Resize a PIL image so it covers ``size = (H, W)`` (bicubic), then centre-crop to it."""
    th, tw = size
    w, h = img.size
    if (h, w) == (th, tw):
        return img
    scale = max(th / h, tw / w)
    nw, nh = max(tw, math.ceil(w * scale - 1e-6)), max(th, math.ceil(h * scale - 1e-6))
    img = img.resize((nw, nh), Image.Resampling.BICUBIC, reducing_gap=None)
    left, top = (nw - tw) // 2, (nh - th) // 2
    return img.crop((left, top, left + tw, top + th))


def pil_mode_channels(mode: str) -> int:
    """1 for grey-level PIL modes, 3 otherwise (colour, palette, alpha are made RGB)."""
    return 1 if mode in ("1", "L", "LA", "I", "I;16", "F") else 3


def pil_to_tensor(img: Image.Image, channels: int, size: tuple[int, int]) -> torch.Tensor:
    """PIL image -> float32 ``[channels, H, W]`` in [-1, 1] after resize + centre-crop."""
    if img.mode in ("I", "I;16", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I") and arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / top * 255.0, 0, 255).astype(np.uint8))
    img = img.convert("L" if channels == 1 else "RGB")
    img = pil_resize_center_crop(img, size)
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[None]
    else:
        arr = arr.transpose(2, 0, 1)
    return uint8_to_unit(np.ascontiguousarray(arr))


def random_hflip(
    images: torch.Tensor, generator: torch.Generator | None = None, p: float = 0.5
) -> torch.Tensor:
    """Flip each image of ``[N, C, H, W]`` left-right with probability ``p`` (batched)."""
    flip = torch.rand(images.shape[0], generator=generator, device="cpu") < p
    flip = flip.to(images.device)
    return torch.where(flip[:, None, None, None], images.flip(-1), images)
