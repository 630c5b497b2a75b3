"""Image grids as PNG (Pillow only, no torchvision): sample sheets and walk strips."""

from __future__ import annotations

import math
import os
import re
from typing import Any

import numpy as np

from condnoise.errors import UserError
from condnoise.io import atomic_open


def to_uint8(images: Any) -> np.ndarray:
    """Float images ``[N,C,H,W]`` in [-1, 1] (tensor or array) -> uint8 ``[N,H,W,C]``.

    Values outside [-1, 1] are clipped; rounding is to the nearest level (x+1)*127.5.
    """
    if hasattr(images, "detach"):  # torch tensor, without importing torch here
        images = images.detach().float().cpu().numpy()
    arr = np.asarray(images, dtype=np.float32)
    if arr.ndim != 4:
        raise ValueError(f"expected images [N,C,H,W], got shape {arr.shape}")
    arr = np.clip((arr + 1.0) * 127.5 + 0.5, 0.0, 255.0).astype(np.uint8)
    return np.ascontiguousarray(arr.transpose(0, 2, 3, 1))


def make_grid(images: Any, nrow: int, *, padding: int = 2, pad_value: int = 255) -> np.ndarray:
    """Tile images into one uint8 ``[H', W', C]`` array with ``nrow`` images per row.

    ``images``: uint8 ``[N,H,W,C]`` (array), or float ``[N,C,H,W]`` in [-1, 1] (tensor or
    array, converted by :func:`to_uint8`).
    """
    arr = np.asarray(images) if not hasattr(images, "detach") else None
    if arr is None or arr.dtype != np.uint8:
        arr = to_uint8(images)
    if arr.ndim != 4 or arr.shape[0] == 0:
        raise ValueError(f"expected a non-empty image batch [N,H,W,C], got shape {arr.shape}")
    if nrow < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}")
    n, h, w, c = arr.shape
    ncol = min(nrow, n)
    rows = math.ceil(n / ncol)
    grid = np.full(
        (rows * (h + padding) + padding, ncol * (w + padding) + padding, c), pad_value, np.uint8
    )
    for i in range(n):
        r, k = divmod(i, ncol)
        y, x = padding + r * (h + padding), padding + k * (w + padding)
        grid[y : y + h, x : x + w] = arr[i]
    return grid


def save_grid(images: Any, path: str | os.PathLike, nrow: int, *, padding: int = 2) -> None:
    """Write ``images`` as one PNG grid with ``nrow`` images per row (atomic write).

    ``images`` as in :func:`make_grid`: uint8 ``[N,H,W,C]`` or float ``[N,C,H,W]`` in [-1, 1].
    Gray (C=1) gives an 8-bit gray PNG, C=3 RGB, C=4 RGBA.
    """
    from PIL import Image

    grid = make_grid(images, nrow, padding=padding)
    if grid.shape[2] not in (1, 3, 4):
        raise UserError(f"cannot write {path}: {grid.shape[2]} channels (PNG takes 1, 3 or 4)")
    img = Image.fromarray(grid[..., 0] if grid.shape[2] == 1 else grid)
    with atomic_open(path, "wb") as f:
        img.save(f, format="PNG")


def save_png(image: np.ndarray, path: str | os.PathLike) -> None:
    """Write one uint8 ``[H,W,C]`` image as PNG (atomic write)."""
    from PIL import Image

    img = Image.fromarray(image[..., 0] if image.shape[2] == 1 else image)
    with atomic_open(path, "wb") as f:
        img.save(f, format="PNG")


def safe_name(name: str) -> str:
    """A file-name-safe form of a class name (``T-shirt/top`` -> ``T-shirt_top``)."""
    out = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")
    return out or "class"


def _wrap(text: str, width: float, measure: Any) -> list[str]:
    """Greedy word wrap of ``text`` to lines no wider than ``width`` pixels."""
    lines: list[str] = []
    for word in text.split():
        if lines and measure(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines or [""]


def save_labelled_grid(
    images: Any, row_labels: list[str], path: str | os.PathLike, nrow: int, *, padding: int = 2,
    scale: int = 1,
) -> None:
    """A grid with a text label above each row of ``nrow`` images (a class name, or a prompt
    wrapped to the grid width), in Pillow's default font; ``scale`` enlarges the images
    (nearest neighbour). Atomic PNG write; gray images are written as RGB."""
    from PIL import Image, ImageDraw, ImageFont

    arr = np.asarray(images) if not hasattr(images, "detach") else to_uint8(images)
    if arr.dtype != np.uint8:
        arr = to_uint8(arr)
    if arr.ndim != 4 or arr.shape[0] == 0:
        raise ValueError(f"expected a non-empty image batch [N,H,W,C], got shape {arr.shape}")
    if scale > 1:
        arr = arr.repeat(scale, axis=1).repeat(scale, axis=2)
    rows = math.ceil(arr.shape[0] / nrow)
    if len(row_labels) != rows:
        raise ValueError(f"{len(row_labels)} labels for {rows} rows of {nrow} images")
    arr = np.repeat(arr, 3, axis=3) if arr.shape[3] == 1 else arr[..., :3]
    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    width = min(nrow, arr.shape[0]) * (arr.shape[2] + padding) + padding
    line_h = probe.textbbox((0, 0), "Ag", font=font)[3] + 2
    strips = []
    for r, label in enumerate(row_labels):
        lines = _wrap(str(label), width - 2 * padding, lambda t: probe.textlength(t, font=font))
        band = Image.new("RGB", (width, line_h * len(lines) + padding), "white")
        draw = ImageDraw.Draw(band)
        for k, line in enumerate(lines):
            draw.text((padding, padding + k * line_h), line, fill="black", font=font)
        strips += [np.asarray(band), make_grid(arr[r * nrow : (r + 1) * nrow], nrow, padding=padding)]
    canvas = np.full((sum(s.shape[0] for s in strips), width, 3), 255, np.uint8)
    y = 0
    for s in strips:
        canvas[y : y + s.shape[0], : s.shape[1]] = s
        y += s.shape[0]
    with atomic_open(path, "wb") as f:
        Image.fromarray(canvas).save(f, format="PNG")
