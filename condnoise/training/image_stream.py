"""Images only, in a resumable order: the batches of first-stage (autoencoder) training.

Conditions are ignored, so any source works (class- or caption-labelled). Indexable
sources follow the diffusion trainer's :class:`~condnoise.training.data.EpochOrder` (a
seeded permutation per epoch, position ``(epoch, offset)``); in-memory sources are
indexed from ``.tensors()``, files are decoded by a ``DataLoader``. Streaming sources
(``wds:``) are read in shard order (shuffle the shards when writing them, as WebDataset
recommends), one epoch after another; resuming skips the ``offset`` images already seen
in the current epoch.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from condnoise.errors import UserError
from condnoise.training.data import EpochOrder, Position


class _Images(Dataset):
    def __init__(self, base: Any) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.base[index][0]


class _OrderSampler:
    """Index lists of successive batches of an :class:`EpochOrder` from a position."""

    def __init__(self, order: EpochOrder, start: Position, batch: int) -> None:
        self.order, self.start, self.batch = order, start, batch

    def __iter__(self) -> Iterator[list[int]]:
        pos = self.start
        while True:
            idx, pos = self.order.take(pos, self.batch)
            yield idx.tolist()


class ImageBatches:
    """``batches(position, batch_size)`` yields ``(images [B,C,H,W] in [-1,1], next position)``."""

    def __init__(self, source: Any, seed: int, *, max_samples: int | None = None,
                 num_workers: int = 0) -> None:
        self.source, self.meta, self.num_workers = source, source.meta, num_workers
        self.streaming = isinstance(source, IterableDataset)
        n = len(source)
        if max_samples is not None:
            if max_samples < 1:
                raise UserError(f"data.max_samples must be >= 1, got {max_samples}")
            n = min(n, max_samples)
        if n < 1:
            raise UserError(f"data source {self.meta.name!r} ({self.meta.split}) holds no images")
        self.num_samples = n
        self.order = EpochOrder(n, seed)
        self._tensors = source.tensors()[0] if hasattr(source, "tensors") else None

    def first(self, count: int) -> torch.Tensor:
        """The first ``count`` images in dataset order (reconstruction grids, scaling factor)."""
        return torch.cat(list(self.in_order(count, min(count, self.num_samples))))

    def in_order(self, batch: int, count: int | None = None) -> Iterator[torch.Tensor]:
        """One pass over the first ``count`` (default: all) images in dataset order."""
        n = self.num_samples if count is None else min(count, self.num_samples)
        if self._tensors is not None:
            for s in range(0, n, batch):
                yield self._tensors[s:min(n, s + batch)]
            return
        if self.streaming:
            buf: list[torch.Tensor] = []
            for i, (image, _) in enumerate(self.source):
                if i >= n:
                    break
                buf.append(image)
                if len(buf) == batch:
                    yield torch.stack(buf)
                    buf = []
            if buf:
                yield torch.stack(buf)
            return
        from torch.utils.data import Subset

        yield from DataLoader(Subset(_Images(self.source), range(n)), batch_size=batch,
                              num_workers=self.num_workers)

    def batches(self, start: Position, batch: int) -> Iterator[tuple[torch.Tensor, Position]]:
        if self.streaming:
            yield from self._stream(start, batch)
            return
        if self._tensors is not None:
            pos = start
            while True:
                idx, pos = self.order.take(pos, batch)
                yield self._tensors[torch.as_tensor(idx, dtype=torch.long)], pos
        loader = DataLoader(_Images(self.source), batch_sampler=_OrderSampler(self.order, start, batch),
                            num_workers=self.num_workers, pin_memory=torch.cuda.is_available())
        pos = start
        for images in loader:
            pos = self.order.take(pos, batch)[1]
            yield images, pos

    def _stream(self, start: Position, batch: int) -> Iterator[tuple[torch.Tensor, Position]]:
        epoch, offset, buf = start.epoch, start.offset, []
        while True:
            for i, (image, _) in enumerate(self.source):
                if i < offset:
                    continue
                if i >= self.num_samples:
                    break
                buf.append(image)
                offset = i + 1
                if len(buf) == batch:
                    at_end = offset >= self.num_samples
                    pos = Position(epoch + 1, 0) if at_end else Position(epoch, offset)
                    yield torch.stack(buf), pos
                    buf = []
            epoch, offset = epoch + 1, 0


@torch.no_grad()
def reconstructions(model: Any, images: ImageBatches, batch: int, device: str | torch.device = "cpu"
                    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """``(x, reconstruction clamped to [-1, 1], VQ codes | None)`` per batch, on the CPU, over
    every image of ``images`` in dataset order (``first_stage.reconstruct``: deterministic)."""
    from condnoise.models.first_stage import reconstruct

    for x in images.in_order(batch):
        rec, codes = reconstruct(model, x.to(device))
        yield x, rec.float().clamp(-1, 1).cpu(), None if codes is None else codes.cpu()


@torch.no_grad()
def save_reconstruction_grid(model: Any, images: ImageBatches, path: Any, count: int,
                             device: str | torch.device = "cpu") -> None:
    """The first ``count`` images (top row) over their reconstructions (bottom row)."""
    from condnoise.diffusion.grids import save_grid
    from condnoise.models.first_stage import reconstruct

    x = images.first(count).to(device)
    rec = reconstruct(model, x)[0]
    save_grid(torch.cat([x, rec]).float().clamp(-1, 1).cpu(), path, nrow=len(x))

