"""Shared machinery of file-backed sources (image folders, caption files): decoding with
errors that name the file, and a map-style dataset over ``(path, condition)`` lists."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from condnoise.data.base import ConditionalDataset, DatasetMeta
from condnoise.data.transforms import pil_mode_channels, pil_to_tensor
from condnoise.errors import UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")

Image.MAX_IMAGE_PIXELS = None  # large photos are legitimate input, not a decompression bomb


def open_image(data: str | Path | bytes, name: str) -> Image.Image:
    """Open and fully decode an image from a path or bytes; UserError naming ``name``."""
    try:
        img = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)
        img.load()
        return img
    except FileNotFoundError:
        raise UserError(f"image file not found: {name}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise UserError(f"cannot decode image {name}: {e}") from None


def verify_image(path: Path) -> None:
    """Check that ``path`` is a readable image (header + integrity check, no full decode)."""
    try:
        with Image.open(path) as img:
            img.verify()
    except FileNotFoundError:
        raise UserError(f"image file not found: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise UserError(f"cannot decode image {path}: {e}") from None


def probe_shape(path: Path, image_size: int | None) -> tuple[int, int, int]:
    """``(C, H, W)`` the source will produce, from the first image's header."""
    img = open_image(path, str(path))
    c = pil_mode_channels(img.mode)
    if image_size:
        return (c, image_size, image_size)
    return (c, img.size[1], img.size[0])


class FileDataset(ConditionalDataset):
    """Map-style dataset over image files with one condition each.

    Every image is converted to the first image's channel count and resized +
    centre-cropped to ``meta.image_shape`` (the first image's size unless ``image_size``).
    """

    def __init__(self, meta: DatasetMeta, paths: Sequence[Path], conditions) -> None:
        self.meta = meta
        self.paths = list(paths)
        self._conditions = conditions

    def conditions(self):
        return self._conditions

    def load_image(self, index: int) -> torch.Tensor:
        path = self.paths[index]
        c, h, w = self.meta.image_shape
        return pil_to_tensor(open_image(path, str(path)), c, (h, w))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int | str]:
        cond = self._conditions[index]
        if isinstance(cond, np.integer):
            cond = int(cond)
        return self.load_image(index), cond

    def verify_images(self, progress: bool = False) -> None:
        """Check every image file (UserError naming the first bad one)."""
        from tqdm import tqdm

        for path in tqdm(self.paths, desc="checking images", disable=not progress or len(self.paths) < 1000,
                         unit="img"):
            verify_image(path)
