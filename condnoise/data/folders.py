"""``imagefolder:PATH``: one sub-folder per class, classes sorted by name.

If ``PATH/<split>`` is a folder (e.g. ``PATH/train``, ``PATH/test``) it is used for that
split; otherwise ``PATH`` itself holds the classes. Images are found recursively inside
each class folder (extensions in ``files.IMAGE_EXTENSIONS``, case-insensitive), sorted.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from condnoise.data.base import DatasetMeta, class_prior
from condnoise.data.files import IMAGE_EXTENSIONS, FileDataset, probe_shape
from condnoise.errors import UserError


def scan_image_folder(root: Path) -> tuple[list[str], list[Path], np.ndarray]:
    """Return ``(class_names, image_paths, labels)`` of an image folder."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise UserError(f"image folder {root} has no class sub-folders (expected {root}/CLASS/*.png)")
    paths: list[Path] = []
    labels: list[int] = []
    for k, name in enumerate(classes):
        files = sorted(
            p
            for p in (root / name).rglob("*")
            if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file() and not p.name.startswith(".")
        )
        paths += files
        labels += [k] * len(files)
    if not paths:
        raise UserError(f"image folder {root} is empty: no image files in its class sub-folders")
    return classes, paths, np.asarray(labels, dtype=np.int64)


class ImageFolder(FileDataset):
    """Class-conditional images from a folder tree (see module docstring)."""

    def __init__(self, path: str, split: str = "train", *, image_size: int | None = None) -> None:
        root = Path(path).expanduser().resolve()
        if not root.is_dir():
            raise UserError(f"image folder not found: {root}")
        if (root / split).is_dir():
            root = root / split
        classes, paths, labels = scan_image_folder(root)
        labels.flags.writeable = False
        meta = DatasetMeta(
            name=f"imagefolder:{Path(path).expanduser().resolve()}",
            split=split,
            class_names=tuple(classes),
            class_prior=class_prior(labels, len(classes)),
            num_samples=len(paths),
            image_shape=probe_shape(paths[0], image_size),
            condition_kind="class",
            extra={"root": str(root)},
        )
        super().__init__(meta, paths, labels)
