"""The dataset interface every source implements (paper section 2: pairs (x, y)).

An item is ``(image float32 [C, H, W] in [-1, 1], condition)`` where the condition is a
class index (``int``) or a caption (``str``). ``.meta`` describes the dataset;
``.conditions()`` returns every condition without decoding any image.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

ConditionKind = Literal["class", "caption"]
Conditions = np.ndarray | list[str]


@dataclass(frozen=True)
class DatasetMeta:
    """What a consumer needs to know about a source without reading it.

    ``class_prior`` is the empirical class frequency (sums to 1); it is empty, like
    ``class_names``, for caption sources.
    """

    name: str
    split: str
    class_names: tuple[str, ...]
    class_prior: tuple[float, ...]
    num_samples: int
    image_shape: tuple[int, int, int]
    condition_kind: ConditionKind
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def class_prior(labels: np.ndarray, num_classes: int) -> tuple[float, ...]:
    """Empirical class frequencies of ``labels`` (int array) over ``num_classes`` classes."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes)
    total = counts.sum()
    if total == 0:
        return tuple(0.0 for _ in range(num_classes))
    return tuple(float(c) for c in counts / total)


class ConditionalDataset(Dataset):
    """Map-style dataset of ``(image, condition)`` pairs with ``.meta`` and ``.conditions()``."""

    meta: DatasetMeta

    def __len__(self) -> int:
        return self.meta.num_samples

    def conditions(self) -> Conditions:
        """Every condition in index order (int64 array or list of str), no image decoding."""
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int | str]:
        raise NotImplementedError


class InMemoryDataset(ConditionalDataset):
    """A source whose images are one float32 tensor ``[N, C, H, W]`` in [-1, 1].

    ``tensors()`` is the trainer's fast path: it returns the whole split at once
    (computed once, then cached; treat the result as read-only).
    """

    def __init__(self, meta: DatasetMeta, labels: np.ndarray) -> None:
        self.meta = meta
        self._labels = np.ascontiguousarray(labels, dtype=np.int64)
        self._labels.flags.writeable = False
        self._cache: tuple[torch.Tensor, torch.Tensor] | None = None

    def _build_images(self) -> torch.Tensor:
        raise NotImplementedError

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(images float32 [N, C, H, W] in [-1, 1], labels int64 [N])``, cached."""
        if self._cache is None:
            self._cache = (self._build_images(), torch.from_numpy(self._labels.copy()))
        return self._cache

    def conditions(self) -> np.ndarray:
        return self._labels

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        images, _ = self.tensors()
        return images[index], int(self._labels[index])
