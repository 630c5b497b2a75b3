"""Spatial controls of ControlNet / T2I-Adapter fine-tuning (paper Sec. 5, "Downstream
personalization": Canny edges and segmentation masks).

A control has a *native* form, uint8 ``[N, H, W]``, which sample folders store and the
control-fidelity metrics read, and an *input* form, float ``[N, C, H, W]`` in [0, 1], which
the adapter sees (:meth:`Control.encode`):

- ``canny``: OpenCV ``Canny(image, low, high)`` on the uint8 image (RGB or gray; the
  paper: thresholds 100 / 200), values 0 / 255; input: one channel, edges = 1.
- ``mask``: per-pixel segment labels, 0 = background. ``scenes`` has exact per-pixel
  classes (class + 1, from its renderer); every other source gets the foreground
  silhouette of :func:`silhouette` (label 1). Input: one channel per label 1..K (one-hot,
  background all zero).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from condnoise.errors import UserError

CONTROLS = ("canny", "mask")
#: the scenes renderer's mask threshold (item intensity > 0.1) applied to the distance
#: from the background colour: the silhouette of :func:`silhouette`
FOREGROUND_THRESHOLD = 0.1 * 255


def canny(images: np.ndarray, low: float = 100, high: float = 200) -> np.ndarray:
    """OpenCV Canny edges (0 / 255) of uint8 images ``[N, H, W]`` or ``[N, H, W, C]``
    (C = 1 or 3): uint8 ``[N, H, W]``."""
    import cv2

    arr = np.asarray(images)
    if arr.dtype != np.uint8:
        raise UserError(f"canny: expected uint8 images, got {arr.dtype}")
    if arr.ndim == 4 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (3, 4) or (arr.ndim == 4 and arr.shape[-1] != 3):
        raise UserError(f"canny: expected images [N, H, W] or [N, H, W, 1|3], got shape {arr.shape}")
    if not 0 <= low <= high:
        raise UserError(f"canny thresholds must satisfy 0 <= low <= high, got {low:g} / {high:g}")
    out = np.empty(arr.shape[:3], np.uint8)
    for i in range(len(arr)):
        out[i] = cv2.Canny(np.ascontiguousarray(arr[i]), low, high)
    return out


def silhouette(images: np.ndarray) -> np.ndarray:
    """Foreground of uint8 images ``[N, H, W(, C)]``: bool ``[N, H, W]``, pixels whose largest
    channel distance from the image's background colour (the per-channel median of its
    one-pixel border, which items rarely reach) exceeds :data:`FOREGROUND_THRESHOLD`. On
    Fashion-MNIST (black background) this is intensity > 0.1; on a scene it approximates the
    renderer's mask (item intensity > 0.1)."""
    arr = np.asarray(images)
    if arr.ndim == 3:
        arr = arr[..., None]
    x = arr.astype(np.int16)
    ring = np.concatenate([x[:, 0], x[:, -1], x[:, 1:-1, 0], x[:, 1:-1, -1]], axis=1)  # [N, P, C]
    bg = np.median(ring, axis=1)[:, None, None, :]
    return np.abs(x - bg).max(axis=-1) > FOREGROUND_THRESHOLD


def images_to_uint8(images: torch.Tensor) -> np.ndarray:
    """Float images ``[N, C, H, W]`` in [-1, 1] -> uint8 ``[N, H, W, C]``: the data's
    ``p / 127.5 - 1`` inverted exactly (nearest level, as the sample grids round)."""
    x = torch.as_tensor(images).detach().float().cpu()
    u8 = ((x + 1.0) * 127.5 + 0.5).clamp_(0.0, 255.0).to(torch.uint8)
    return np.ascontiguousarray(u8.permute(0, 2, 3, 1).numpy())


def _with_masks(dataset: Any) -> Any:
    """The dataset (or the source under its views) that has exact masks, else None."""
    while dataset is not None:
        if hasattr(dataset, "masks") and hasattr(dataset, "images_uint8"):
            return dataset
        dataset = getattr(dataset, "source", None)
    return None


@dataclass
class Control:
    """A control kind bound to a data source: ``native(images, index)`` from a batch of the
    source's images (float ``[N, C, H, W]`` in [-1, 1]) and their dataset indices."""

    name: str
    low: float = 100.0
    high: float = 200.0
    num_labels: int = 1  # mask: labels 1..K (scenes: 10 classes; silhouettes: 1)
    exact: Any = None  # a source with exact masks (scenes), else None

    @classmethod
    def for_source(cls, name: str, dataset: Any = None, *, low: float = 100.0, high: float = 200.0) -> Control:
        if name not in CONTROLS:
            raise UserError(f"unknown control {name!r}; choose one of {', '.join(CONTROLS)}")
        if not 0 <= low <= high:
            raise UserError(f"canny thresholds must satisfy 0 <= low <= high, got {low:g} / {high:g}")
        exact = _with_masks(dataset) if name == "mask" else None
        labels = 1
        if exact is not None:
            from condnoise.data.scenes.vocab import CLASSES

            labels = len(CLASSES)
        return cls(name, float(low), float(high), labels, exact)

    @property
    def channels(self) -> int:
        """Input channels the adapter sees."""
        return self.num_labels if self.name == "mask" else 1

    @property
    def needs_images(self) -> bool:
        """Whether the control is computed from the pixels (not looked up by index)."""
        return self.exact is None

    def native(self, images: torch.Tensor | None, index: torch.Tensor | np.ndarray) -> np.ndarray:
        """uint8 ``[N, H, W]`` controls of a batch (see the module docstring)."""
        if self.exact is not None:
            return np.asarray(self.exact.masks()[np.asarray(index, dtype=np.int64)])
        if images is None:
            raise UserError(f"control {self.name} is computed from the images; this batch has none "
                            "(latent-cache runs: drop data.latents)")  # fmt: skip
        u8 = images_to_uint8(images)
        if self.name == "canny":
            return canny(u8, self.low, self.high)
        return silhouette(u8).astype(np.uint8)

    def encode(self, native: np.ndarray | torch.Tensor) -> torch.Tensor:
        """The adapter's input, float32 ``[N, C, H, W]`` in [0, 1], of native controls."""
        x = torch.as_tensor(np.asarray(native)).long()
        if self.name == "canny":
            return (x > 0).float()[:, None]
        labels = torch.arange(1, self.num_labels + 1, dtype=torch.long)
        return (x[:, None] == labels[None, :, None, None]).float()

    def batch(self, images: torch.Tensor | None, index: torch.Tensor) -> torch.Tensor:
        """``encode(native(images, index))``: the control field of a training batch."""
        return self.encode(self.native(images, index))

    def to_rgb(self, native: np.ndarray, channels: int = 3) -> np.ndarray:
        """uint8 ``[N, H, W, channels]`` pictures of native controls (grids): edges white on
        black; masks with one colour per label (gray levels for one label or gray images)."""
        x = np.asarray(native)
        if self.name == "canny" or self.num_labels == 1 or channels == 1:
            level = (x > 0) * 255 if self.name == "canny" or self.num_labels == 1 else \
                (x.astype(np.int32) * 255) // self.num_labels  # fmt: skip
            gray = level.astype(np.uint8)[..., None]
            return np.repeat(gray, channels, axis=-1)
        import colorsys

        palette = np.zeros((self.num_labels + 1, 3), np.uint8)
        for k in range(1, self.num_labels + 1):
            palette[k] = np.rint(np.array(colorsys.hsv_to_rgb((k - 1) / self.num_labels, 0.8, 1.0)) * 255)
        return palette[np.clip(x, 0, self.num_labels)]

    def settings(self) -> dict[str, Any]:
        """What a sample folder's ``meta.json`` records of the control."""
        out: dict[str, Any] = {"kind": self.name}
        if self.name == "canny":
            out |= {"low": self.low, "high": self.high}
        else:
            out |= {"labels": self.num_labels, "exact": self.exact is not None}
        return out
