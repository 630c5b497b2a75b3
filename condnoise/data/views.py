"""Training views of a source: fixed corruption (source + manifest) and random corruption
(labels re-drawn on every read, paper appendix E.4). Images are never copied."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import replace

import numpy as np
import torch
from torch.utils.data import IterableDataset

from condnoise.data.base import ConditionalDataset, class_prior
from condnoise.data.manifest import Manifest
from condnoise.data.random_flip import RandomRelabeler
from condnoise.errors import UserError


class CorruptedView(ConditionalDataset):
    """``source`` with the manifest's conditions substituted (checked to match ``source``).

    ``meta.class_prior`` is the corrupted label distribution; ``meta.extra`` records the
    manifest. A streaming source gives a streaming view (``CorruptedStreamView``).
    """

    def __new__(cls, source, manifest):
        if cls is CorruptedView and isinstance(source, IterableDataset):
            cls = CorruptedStreamView
        return super().__new__(cls)

    def __init__(self, source: ConditionalDataset, manifest: Manifest | str | os.PathLike):
        if not isinstance(manifest, Manifest):
            manifest = Manifest.load(manifest)
        manifest.check_matches(source)
        self.source = source
        self.manifest = manifest
        self._conditions = manifest.apply(source.conditions())
        if isinstance(self._conditions, np.ndarray):
            self._conditions.flags.writeable = False
        m = source.meta
        prior = (
            class_prior(self._conditions, m.num_classes)
            if m.condition_kind == "class"
            else m.class_prior
        )
        extra = {**m.extra, "corruption": {"kind": manifest.kind, "ratio": manifest.ratio,
                                           "seed": manifest.seed}}  # fmt: skip
        self.meta = replace(m, class_prior=prior, extra=extra)

    def conditions(self):
        return self._conditions

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The source's images with the corrupted labels (in-memory sources only); caption
        sources keep their caption indices, which point into the corrupted conditions()."""
        if not hasattr(self.source, "tensors"):
            raise UserError(f"{self.meta.name} is not an in-memory source (no tensors())")
        images, labels = self.source.tensors()
        if self.meta.condition_kind == "caption":
            return images, labels
        return images, torch.from_numpy(np.array(self._conditions, dtype=np.int64))

    def __getitem__(self, index: int):
        image, _ = self.source[index]
        cond = self._conditions[index]
        return image, int(cond) if isinstance(cond, np.integer) else cond


class CorruptedStreamView(CorruptedView, IterableDataset):
    """Streaming form of ``CorruptedView`` (over a ``WebDataset``)."""

    def __iter__(self) -> Iterator:
        for index, image, _ in self.source.iter_indexed():
            cond = self._conditions[index]
            yield image, int(cond) if isinstance(cond, np.integer) else cond


class RandomFlipView(ConditionalDataset):
    """Random data corruption: reading sample i in epoch e gives its label re-drawn
    (symmetric) with probability ``ratio``, a pure function of (seed, e, i).

    Call ``set_epoch(e)`` each epoch (as with ``DistributedSampler``). Trainers working on
    tensors use ``relabel(labels, sample_index, step)`` directly.
    """

    def __init__(self, source: ConditionalDataset, ratio: float, seed: int) -> None:
        if source.meta.condition_kind != "class":
            raise UserError(f"random relabelling needs class labels; {source.meta.name} has captions")
        if isinstance(source, IterableDataset):
            raise UserError("RandomFlipView needs a map-style source; use relabel() on batches")
        self.source = source
        self.meta = source.meta
        self.relabel = RandomRelabeler(source.meta.class_prior, ratio, seed)
        self.epoch = 0
        self._cached: tuple[int, np.ndarray] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def conditions(self) -> np.ndarray:
        """Labels as read in the current epoch (one vectorised draw per epoch, cached)."""
        if self._cached is None or self._cached[0] != self.epoch:
            clean = torch.from_numpy(np.array(self.source.conditions(), dtype=np.int64))
            labels = self.relabel(clean, torch.arange(len(clean)), self.epoch).numpy()
            labels.flags.writeable = False
            self._cached = (self.epoch, labels)
        return self._cached[1]

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Clean images and the current epoch's labels (in-memory sources only)."""
        images, _ = self.source.tensors()
        return images, torch.from_numpy(self.conditions().copy())

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, _ = self.source[index]
        return image, int(self.conditions()[index])
