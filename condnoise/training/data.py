"""The trainer's view of the data: a resumable, rank-sliced, deterministic batch order.

Every optimizer step consumes one *global* batch of ``train.batch_size`` dataset indices
taken from a per-epoch permutation seeded by ``(seed, epoch)``; the global batch is split
into ``grad_accum`` micro-steps and each micro-step across the ranks. The union over ranks
is therefore the same batch whatever the number of processes, and the position
``(epoch, offset)`` is all a checkpoint needs to continue the exact sequence.

In-memory sources (Fashion-MNIST, digits, scenes) are indexed directly from ``.tensors()``
(the fast path); other map-style sources go through a ``DataLoader`` fed by the same order
(it replaces ``DistributedSampler`` because it can start mid-epoch). Every sample keeps
its dataset index (``sample_index``), which the fixed CEP and random-flip perturbations use.

Streaming ``wds:`` sources cannot follow a global permutation: each rank (and each of its
DataLoader workers) reads its own share of the shards, reshuffled per epoch, and resumes
from the number of batches it delivered (``step x grad_accum``), so a resumed run reads
exactly the samples the uninterrupted one would have (same world size and workers). The
position's ``epoch`` then counts samples over the dataset size.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from condnoise import rng
from condnoise.errors import UserError
from condnoise.training.config import DataConfig


@dataclass(frozen=True)
class Position:
    """Where the next global batch starts: ``offset`` into epoch ``epoch``'s permutation."""

    epoch: int = 0
    offset: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset}


class EpochOrder:
    """Seeded per-epoch permutations of ``range(num_samples)``; a batch may span epochs."""

    def __init__(self, num_samples: int, seed: int) -> None:
        if num_samples < 1:
            raise UserError("the training data is empty")
        self.num_samples = num_samples
        self.seed = seed
        self._cache: tuple[int, np.ndarray] | None = None

    def permutation(self, epoch: int) -> np.ndarray:
        if self._cache is None or self._cache[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch, 0x5EED])
            self._cache = (epoch, rng.permutation(self.num_samples))
        return self._cache[1]

    def take(self, pos: Position, count: int) -> tuple[np.ndarray, Position]:
        """The next ``count`` indices from ``pos`` and the position after them."""
        parts, epoch, offset, need = [], pos.epoch, pos.offset, count
        while need:
            perm = self.permutation(epoch)
            chunk = perm[offset : offset + need]
            parts.append(chunk)
            need -= len(chunk)
            offset += len(chunk)
            if offset >= self.num_samples:
                epoch, offset = epoch + 1, 0
        return np.concatenate(parts), Position(epoch, offset)


def rank_slices(indices: np.ndarray, grad_accum: int, world_size: int, rank: int) -> list[np.ndarray]:
    """This rank's share of a global batch, one index array per micro-step."""
    micro = len(indices) // (grad_accum * world_size)
    out = []
    for m in range(grad_accum):
        start = (m * world_size + rank) * micro
        out.append(indices[start : start + micro])
    return out


def global_slice(micro: int, grad_accum_step: int, world_size: int, rank: int) -> slice:
    """Rows of the global batch that micro-step ``grad_accum_step`` of ``rank`` covers."""
    start = (grad_accum_step * world_size + rank) * micro
    return slice(start, start + micro)


class _Indexed(Dataset):
    """``(image, dataset index)``: the condition comes from the condition table."""

    def __init__(self, base: Dataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, _ = self.base[index]
        return image, int(index)


class _PlanSampler:
    """Batch sampler replaying the rank's micro-batches of the order from a position."""

    def __init__(self, order: EpochOrder, start: Position, batch: int, accum: int,
                 world: int, rank: int) -> None:
        self.order, self.start, self.batch = order, start, batch
        self.accum, self.world, self.rank = accum, world, rank

    def __iter__(self) -> Iterator[list[int]]:
        pos = self.start
        while True:
            idx, pos = self.order.take(pos, self.batch)
            for part in rank_slices(idx, self.accum, self.world, self.rank):
                yield part.tolist()


def delivered(batches: int, role: int, roles: int) -> int:
    """How many of the first ``batches`` batches have ``j % roles == role``."""
    return max(0, (batches - role + roles - 1) // roles)


class _StreamBatches(IterableDataset):
    """A rank's micro-batches of a ``wds:`` source, resumable from a batch count.

    The DataLoader takes batches from its workers round-robin, so batch j of the rank comes
    from the worker with role ``j % workers``; after ``start`` batches worker w plays role
    ``(start + w) % workers``, and role r is consumer slot ``rank * workers + r`` of
    :meth:`condnoise.data.webdataset.WebDataset.stream`, resumed after the samples it gave.
    """

    def __init__(self, source: Any, seed: int, micro: int, rank: int, world: int, start: int) -> None:
        self.source, self.seed, self.micro = source, seed, micro
        self.rank, self.world, self.start = rank, world, start

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        role = (self.start + wid) % nw
        skip = delivered(self.start, role, nw) * self.micro
        it = self.source.stream(self.rank * nw + role, self.world * nw, seed=self.seed, start=skip)
        while True:
            items = [next(it) for _ in range(self.micro)]
            yield torch.stack([img for _, img in items]), torch.tensor([i for i, _ in items])


class TrainData:
    """Opened (possibly corrupted) training split with the rank's micro-batch stream.

    Conditions come from :attr:`cond_table` (class labels ``[N]`` or token ids ``[N, L]``,
    set by :meth:`attach_encoder` with the model's encoder: captions are tokenized once),
    indexed by dataset index. ``wds:`` sources stream (see :class:`_StreamBatches`).
    """

    def __init__(self, cfg: DataConfig, seed: int) -> None:
        from condnoise.data.sources import open_source

        source = open_source(cfg.source, cfg.split, data_dir=cfg.data_dir,
                             image_size=cfg.image_size)
        self.latents = _open_latents(cfg, source)
        if cfg.corruption:
            source = apply_corruption(source, cfg.corruption)
        self.dataset, self.seed = source, seed
        self.meta = source.meta
        self.streaming = isinstance(source, IterableDataset)
        n = len(source)  # type: ignore[arg-type]
        if cfg.max_samples is not None:
            if cfg.max_samples < 1:
                raise UserError(f"data.max_samples must be >= 1, got {cfg.max_samples}")
            if self.streaming:
                raise UserError(f"data.max_samples is not supported for the streaming source {cfg.source!r}")
            n = min(n, cfg.max_samples)
        self.num_samples = n
        self.order = EpochOrder(n, seed)
        if self.latents is not None:
            self.latents.check_data(source.meta, n, cfg.image_size)
        no_images = self.streaming or self.latents is not None
        self._tensors = None if no_images else _fast_tensors(source)
        self.cond_table: torch.Tensor | None = None
        self.control: Any = None  # a condnoise.data.controls.Control (attach_control)

    @property
    def extra_fields(self) -> tuple[str, ...]:
        """Names of the fields each micro-batch carries after ``(images, conditions,
        sample_index)``: ``("control",)`` once :meth:`attach_control` was called."""
        return ("control",) if self.control is not None else ()

    def attach_control(self, control: Any) -> None:
        """Give every micro-batch a ``control`` field, float ``[B, C, H, W]``
        (``control.batch(images, index)``, computed on the fly from the images or, for exact
        scenes masks, looked up by index). Pixel controls need the images: UserError with
        ``data.latents``."""
        if self.latents is not None and control.needs_images:
            raise UserError(f"control {control.name} is computed from the images, but data.latents "
                            "replaces them with cached latents; drop data.latents")  # fmt: skip
        self.control = control

    def _with_control(self, images: torch.Tensor, cond: torch.Tensor, idx: torch.Tensor,
                      pixels: bool = True) -> tuple[torch.Tensor, ...]:  # fmt: skip
        """A micro-batch, plus its control field when one is attached (``pixels``: whether
        ``images`` are images, not cached latents)."""
        if self.control is None:
            return images, cond, idx
        return images, cond, idx, self.control.batch(images if pixels else None, idx)

    @property
    def in_memory(self) -> bool:
        return self._tensors is not None

    def first_items(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Images float ``[n, C, H, W]`` and condition tensors of the first ``n`` samples in
        dataset order (indexable sources; after :meth:`attach_encoder`)."""
        if self.cond_table is None or self.streaming or self.latents is not None:
            raise UserError("first_items needs an indexable image source and attach_encoder")
        n = min(n, self.num_samples)
        if self._tensors is not None:
            return self._tensors[0][:n], self.cond_table[:n]
        return torch.stack([self.dataset[i][0] for i in range(n)]), self.cond_table[:n]

    def attach_encoder(self, encoder: Any) -> torch.Tensor:
        """The training conditions as the model's condition tensors (UserError when the
        model's kind, class or text, differs from the data's)."""
        values = self.dataset.conditions()
        self.cond_table = encoder.as_cond(values[: self.num_samples])
        return self.cond_table

    def micro_batches(self, start: Position, batch: int, accum: int, world: int, rank: int,
                      num_workers: int = 0) -> Iterator[tuple[torch.Tensor, ...]]:
        """Endless ``(images, conditions, sample_index, *extra_fields)`` micro-batches for
        this rank (with ``data.latents``: the cached latents in place of the images)."""
        if self.cond_table is None:
            raise UserError("TrainData.attach_encoder must be called before reading batches")
        table = self.cond_table
        if self.latents is not None:
            for part in _PlanSampler(self.order, start, batch, accum, world, rank):
                idx = torch.as_tensor(part, dtype=torch.long)
                yield self._with_control(self.latents.gather(idx), table[idx], idx, pixels=False)
            return
        if self._tensors is not None:
            images = self._tensors[0]
            for part in _PlanSampler(self.order, start, batch, accum, world, rank):
                idx = torch.as_tensor(part, dtype=torch.long)
                yield self._with_control(images[idx], table[idx], idx)
            return
        micro = batch // (accum * world)
        if self.streaming:
            consumed = start.epoch * self.num_samples + start.offset
            source = getattr(self.dataset, "source", self.dataset)  # a corrupted view streams its source
            data: Any = _StreamBatches(source, self.seed, micro, rank, world, consumed // (micro * world))
            kwargs: dict[str, Any] = {"batch_size": None}
        else:
            data = _Indexed(self.dataset)
            kwargs = {"batch_sampler": _PlanSampler(self.order, start, batch, accum, world, rank)}
        # its own generator: creating the loader must not draw from the global RNG, whose
        # state a checkpoint restores (a resumed run creates its loader one step later)
        gen = rng.generator(self.seed, "train/loader", rank)
        loader = DataLoader(data, num_workers=num_workers, persistent_workers=num_workers > 0,
                            pin_memory=torch.cuda.is_available(), generator=gen, **kwargs)  # fmt: skip
        for images, idx in loader:
            yield self._with_control(images, table[idx.long()], idx.long())


def _open_latents(cfg: DataConfig, source: Any) -> Any:
    """The ``data.latents`` cache (``None`` without one); streamed sources have none."""
    if not cfg.latents:
        return None
    from condnoise.training.latent_cache import LatentCache

    if isinstance(source, IterableDataset):
        raise UserError(f"data.latents: the streamed source {cfg.source!r} has no latent cache "
                        "(extraction needs an indexable source)")
    return LatentCache(cfg.latents)


def _fast_tensors(source: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``source.tensors()`` for in-memory sources (and views over them), else ``None``."""
    base = getattr(source, "source", source)  # a CorruptedView / RandomFlipView wraps one
    if hasattr(source, "tensors") and hasattr(base, "tensors"):
        return source.tensors()
    return None


def apply_corruption(source: Any, manifest_dir: str) -> Any:
    """Wrap ``source`` in the ``CorruptedView`` of a ``condnoise corrupt`` manifest folder."""
    from condnoise.data.corruption import CorruptedView, Manifest

    folder = Path(manifest_dir)
    if not folder.is_dir():
        raise UserError(f"data.corruption: manifest folder not found: {manifest_dir}")
    manifest = Manifest.load(folder)
    return CorruptedView(source, manifest)
