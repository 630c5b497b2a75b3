"""Image grids as PNG (Pillow only, no torchvision): sample sheets and walk strips.

:func:`save_labelled_grid` is the one grid with a text label per row (a class name in a
column on the left, or a long prompt wrapped above its row); the trainer's sample grids,
``condnoise sample``'s ``grid.png`` and the study report's grids use it, so that one look
tells whether every row shows its class.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
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


MIN_CELL = 24  # images smaller than this are enlarged (nearest) so that the grid reads


def _font(size: int) -> Any:
    from PIL import ImageFont

    return ImageFont.load_default(size=size)  # Pillow's built-in font: no font files needed


def _wrap(text: str, font: Any, width: int) -> list[str]:
    """Greedy word wrap of ``text`` to lines at most ``width`` pixels wide."""
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines or [""]


def labelled_grid(images: Any, row_labels: Sequence[str], nrow: int, *, padding: int = 2,
                  font_size: int = 11) -> np.ndarray:  # fmt: skip
    """:func:`make_grid` with ``row_labels[r]`` written beside (or, when long, above) row r.

    Images smaller than :data:`MIN_CELL` pixels are enlarged by an integer factor (nearest
    neighbour). Labels that fit in 40% of the image area's width go in a column on the
    left, otherwise each is wrapped to the grid width above its row. Returns uint8
    ``[H', W', C]`` (black text on the white padding).
    """
    from PIL import Image, ImageDraw

    arr = images if isinstance(images, np.ndarray) and images.dtype == np.uint8 else to_uint8(images)
    rows = math.ceil(len(arr) / max(1, min(nrow, len(arr))))
    if len(row_labels) != rows:
        raise ValueError(f"{len(row_labels)} row labels for {rows} rows of {nrow} images")
    k = max(1, math.ceil(MIN_CELL / arr.shape[1]))
    arr = arr.repeat(k, axis=1).repeat(k, axis=2) if k > 1 else arr
    grid = make_grid(arr, nrow, padding=padding)
    cell, font = arr.shape[1] + padding, _font(font_size)
    widths = [font.getlength(str(t)) for t in row_labels]
    mode = "L" if grid.shape[2] == 1 else "RGB"
    body = Image.fromarray(grid[..., 0] if grid.shape[2] == 1 else grid[..., :3])
    ink = 0 if mode == "L" else (0, 0, 0)
    if max(widths, default=0) <= 0.4 * grid.shape[1]:  # a label column on the left
        left = int(max(widths, default=0)) + 2 * padding + 4
        out = Image.new(mode, (grid.shape[1] + left, grid.shape[0]), 255 if mode == "L" else (255,) * 3)
        out.paste(body, (left, 0))
        draw = ImageDraw.Draw(out)
        for r, text in enumerate(row_labels):
            y = padding + r * cell + (cell - padding) / 2
            draw.text((padding + 2, y), str(text), fill=ink, font=font, anchor="lm")
        return np.asarray(out).reshape(out.size[1], out.size[0], -1)
    return _labels_above(body, [str(t) for t in row_labels], cell, padding, font, ink)


def _labels_above(body: Any, labels: list[str], cell: int, padding: int, font: Any, ink: Any
                  ) -> np.ndarray:  # fmt: skip
    """Each row preceded by its label wrapped to the grid width (long prompts)."""
    from PIL import Image, ImageDraw

    line = font_size_px(font) + 2
    wrapped = [_wrap(t, font, body.size[0] - 2 * padding) for t in labels]
    height = body.size[1] + sum(len(w) * line for w in wrapped)
    out = Image.new(body.mode, (body.size[0], height), 255 if body.mode == "L" else (255,) * 3)
    draw, y = ImageDraw.Draw(out), 0
    for r, lines in enumerate(wrapped):
        for text in lines:
            draw.text((padding, y + 1), text, fill=ink, font=font)
            y += line
        top = padding + r * cell - (padding if r else 0)
        out.paste(body.crop((0, top, body.size[0], padding + (r + 1) * cell)), (0, y))
        y += padding + (r + 1) * cell - top
    return np.asarray(out).reshape(out.size[1], out.size[0], -1)


def font_size_px(font: Any) -> int:
    """Line height of ``font`` in pixels."""
    box = font.getbbox("Ag")
    return int(box[3] - box[1]) + 2


def save_labelled_grid(images: Any, row_labels: Sequence[str], path: str | os.PathLike,
                       nrow: int, *, padding: int = 2) -> None:  # fmt: skip
    """Write :func:`labelled_grid` as a PNG (atomic write); one label per row of ``nrow``."""
    from PIL import Image

    grid = labelled_grid(images, row_labels, nrow, padding=padding)
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
