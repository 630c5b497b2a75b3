"""``open_source(spec)``: the one entry point to every data source.

Specs: ``fashion-mnist``, ``digits``, ``scenes`` (or ``scenes:seed=N``),
``imagefolder:PATH``, ``captions:PATH``, ``wds:PATTERN``. The first three are in-memory
sources with a fast ``.tensors()``.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from condnoise.data.base import ConditionalDataset, DatasetMeta, InMemoryDataset, class_prior
from condnoise.data.fashion_mnist import CLASS_NAMES as FMNIST_CLASSES
from condnoise.data.fashion_mnist import load_fashion_mnist
from condnoise.data.transforms import pad_to, resize_center_crop, uint8_to_unit
from condnoise.errors import UserError

BUILTIN = ("fashion-mnist", "digits", "scenes")
PATH_KINDS = ("imagefolder", "captions", "wds")
OPTION_KINDS = ("scenes",)  # built-in sources that also take options after a colon
SPEC_HELP = "fashion-mnist, digits, scenes[:seed=N], imagefolder:PATH, captions:PATH, wds:PATTERN"

# Digits (scikit-learn) has no official split: every 5th sample (index % 5 == 4) is test.
DIGITS_SPLITS = ("train", "test", "all")


def _check_image_size(image_size: int | None) -> None:
    if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
        raise UserError(f"image size must be a positive integer, got {image_size!r}")


class FashionMNIST(InMemoryDataset):
    """Fashion-MNIST (Debian package IDX files), 1 x 28 x 28; ``image_size`` > 28 pads with
    the background value (-1), e.g. 32 for DiT with patch size 4; < 28 resizes."""

    def __init__(
        self, split: str = "train", data_dir: str | None = None, image_size: int | None = None
    ) -> None:
        _check_image_size(image_size)
        images, labels = load_fashion_mnist(split, str(data_dir) if data_dir else None)
        if len(labels) == 0:
            raise UserError(f"Fashion-MNIST split {split!r} is empty")
        self._images_u8 = images
        super().__init__(_gray_class_meta("fashion-mnist", split, FMNIST_CLASSES, labels,
                                          image_size or 28), labels)  # fmt: skip

    def _build_images(self) -> torch.Tensor:
        x = uint8_to_unit(self._images_u8).unsqueeze(1)
        size = self.meta.image_shape[-1]
        if size > 28:
            return pad_to(x, size)
        return resize_center_crop(x, size) if size < 28 else x


def _gray_class_meta(name: str, split: str, class_names: tuple[str, ...], labels: np.ndarray,
                     size: int) -> DatasetMeta:  # fmt: skip
    """The metadata of an in-memory, one-channel, class-labelled source."""
    return DatasetMeta(name=name, split=split, class_names=class_names,
                       class_prior=class_prior(labels, len(class_names)), num_samples=len(labels),
                       image_shape=(1, size, size), condition_kind="class")  # fmt: skip


class Digits(InMemoryDataset):
    """scikit-learn's 8 x 8 digits (1,797 images, pixel values 0-16), 10 classes.

    Splits: ``train`` (index % 5 != 4, 1,438 images), ``test`` (index % 5 == 4, 359),
    ``all``. ``image_size`` resizes (antialiased bilinear).
    """

    def __init__(self, split: str = "train", image_size: int | None = None) -> None:
        from sklearn.datasets import load_digits

        _check_image_size(image_size)
        if split not in DIGITS_SPLITS:
            raise UserError(f"unknown digits split {split!r}; choose one of {DIGITS_SPLITS}")
        d = load_digits()
        idx = np.arange(len(d.target))
        keep = {"train": idx % 5 != 4, "test": idx % 5 == 4, "all": idx >= 0}[split]
        self._pixels = d.images[keep].astype(np.float32)
        labels = d.target[keep].astype(np.int64)
        names = tuple(str(n) for n in d.target_names)
        super().__init__(_gray_class_meta("digits", split, names, labels, image_size or 8), labels)

    def _build_images(self) -> torch.Tensor:
        x = torch.from_numpy(self._pixels).unsqueeze(1).div_(8.0).sub_(1.0)
        return resize_center_crop(x, self.meta.image_shape[-1])


def parse_spec(spec: str) -> tuple[str, str | None]:
    """Split ``kind:ARG`` into ``(kind, ARG)``; built-in specs have no argument."""
    if not isinstance(spec, str) or not spec.strip():
        raise UserError(f"empty data source spec; choose one of: {SPEC_HELP}")
    spec = spec.strip()
    if spec in BUILTIN:
        return spec, None
    kind, sep, arg = spec.partition(":")
    if sep and kind in OPTION_KINDS:
        return kind, arg
    if sep and kind in PATH_KINDS:
        if not arg:
            raise UserError(f"data source {spec!r} needs a path after '{kind}:'")
        return kind, arg
    raise UserError(f"unknown data source {spec!r}; choose one of: {SPEC_HELP}")


def open_source(
    spec: str,
    split: str = "train",
    *,
    data_dir: str | os.PathLike | None = None,
    image_size: int | None = None,
) -> ConditionalDataset:
    """Open the data source named by ``spec`` (see module docstring) for ``split``.

    ``data_dir`` locates Fashion-MNIST's IDX files (also those scenes are built from);
    ``image_size`` pads (Fashion-MNIST 28 -> 32 with the background value), renders scenes
    at 32 or 64, or resizes + centre-crops to a square.
    """
    kind, arg = parse_spec(spec)
    if kind == "fashion-mnist":
        return FashionMNIST(split, str(data_dir) if data_dir else None, image_size)
    if kind == "digits":
        return Digits(split, image_size)
    if kind == "scenes":
        from condnoise.data.scenes import Scenes, parse_options

        seed = parse_options(arg)["seed"]
        return Scenes(split, seed=seed, image_size=image_size,
                      data_dir=str(data_dir) if data_dir else None)  # fmt: skip
    _check_image_size(image_size)
    assert arg is not None
    if kind == "imagefolder":
        from condnoise.data.folders import ImageFolder

        return ImageFolder(arg, split, image_size=image_size)
    if kind == "captions":
        from condnoise.data.captions import CaptionFile

        return CaptionFile(arg, split, image_size=image_size)
    from condnoise.data.webdataset import WebDataset

    return WebDataset(arg, split, image_size=image_size)
