"""``wds:PATTERN``: WebDataset tar shards, streamed (the ImageNet / CC3M scale path).

A sample is the group of consecutive tar members sharing a key (the member path up to
the first dot of its file name): one image (``.jpg``, ``.jpeg``, ``.png``, ``.webp``) and
a condition, ``.cls`` (class index as text) or ``.txt`` (caption). Every sample of a
dataset must carry the same condition kind (``.cls`` wins when both are present).
Class names come from ``classes.txt`` (one per line) beside the first shard, else
``"0", "1", ...``.

``PATTERN`` takes brace ranges / lists (``shard-{000..009}.tar``, ``{a,b}.tar``) and
glob characters; shards are read in sorted order. Iteration splits the shards across
DataLoader workers and DDP ranks (``torch.distributed`` or the ``RANK`` / ``WORLD_SIZE``
variables); with fewer shards than consumers every consumer reads all shards and keeps
every k-th sample instead. Plain Python ``tarfile``, no ``webdataset`` dependency.

``meta`` / ``conditions()`` / indexed iteration need one pass over the tar headers
(image bytes are skipped, not decoded); it is done lazily and cached. Training reads
:meth:`WebDataset.stream`: shards reshuffled per epoch, split over ranks and workers,
resumable from a sample count.
"""

from __future__ import annotations

import glob
import os
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from condnoise.data.base import ConditionalDataset, DatasetMeta, class_prior
from condnoise.data.files import open_image
from condnoise.data.transforms import pil_mode_channels, pil_to_tensor
from condnoise.errors import UserError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")


def expand_braces(pattern: str) -> list[str]:
    """Expand ``{000..009}`` ranges (zero padding kept) and ``{a,b}`` lists, left to right."""
    m = _BRACE.search(pattern)
    if not m:
        return [pattern]
    body = m.group(1)
    r = _RANGE.match(body)
    if r:
        lo, hi = int(r.group(1)), int(r.group(2))
        width = len(r.group(1)) if r.group(1).startswith("0") else 0
        step = 1 if hi >= lo else -1
        items = [str(i).zfill(width) for i in range(lo, hi + step, step)]
    else:
        items = body.split(",")
    head, tail = pattern[: m.start()], pattern[m.end() :]
    return [out for item in items for out in expand_braces(head + item + tail)]


def expand_shards(pattern: str) -> list[Path]:
    """Shard paths for ``pattern`` (braces, then globs); UserError when one is missing."""
    shards: list[Path] = []
    for item in expand_braces(os.path.expanduser(pattern)):
        if glob.has_magic(item):
            found = sorted(glob.glob(item))
            if not found:
                raise UserError(f"no WebDataset shard matches {item}")
            shards += [Path(p) for p in found]
        else:
            p = Path(item)
            if not p.is_file():
                raise UserError(f"WebDataset shard not found: {p}")
            shards.append(p)
    if not shards:
        raise UserError(f"pattern {pattern!r} names no WebDataset shard")
    return sorted({p.resolve() for p in shards})


def split_key(name: str) -> tuple[str, str]:
    """WebDataset convention: ``dir/key.ext.more`` -> ``("dir/key", "ext.more")``."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


@dataclass
class _Sample:
    key: str
    image: tuple[str, bytes | None] | None = None  # (member name, bytes when streaming)
    cls: str | None = None
    txt: str | None = None


def _iter_samples(shard: Path, read_images: bool) -> Iterator[_Sample]:
    """Group consecutive members of ``shard`` by key. Image bytes are read only when asked."""
    current: _Sample | None = None
    try:
        # Streaming mode ("r|*") reads sequentially; header scans may seek past data.
        with tarfile.open(shard, "r|*" if read_images else "r:*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = split_key(member.name)
                if current is None or key != current.key:
                    if current is not None:
                        yield current
                    current = _Sample(key)
                if ext in IMAGE_EXTS:
                    data = tar.extractfile(member).read() if read_images else None
                    current.image = (member.name, data)
                elif ext in ("cls", "txt"):
                    text = tar.extractfile(member).read().decode("utf-8", "replace").strip()
                    setattr(current, ext, text)
    except (tarfile.TarError, OSError, EOFError) as e:
        raise UserError(f"cannot read WebDataset shard {shard}: {e}") from None
    if current is not None:
        yield current


def _partition() -> tuple[int, int]:
    """``(slot, num_slots)`` of this consumer over DDP ranks x DataLoader workers."""
    rank, world = 0, 1
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    elif "WORLD_SIZE" in os.environ:
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ["WORLD_SIZE"])
    info = get_worker_info()
    wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
    return rank * nw + wid, world * nw


class WebDataset(ConditionalDataset, IterableDataset):
    """Streaming source over WebDataset shards (see module docstring)."""

    def __init__(self, pattern: str, split: str = "train", *, image_size: int | None = None):
        self.pattern = pattern
        self.split = split
        self.image_size = image_size
        self.shards = expand_shards(pattern)

    # -- cheap probe: condition kind and image shape from the first sample ----------------
    @cached_property
    def _probe(self) -> tuple[str, tuple[int, int, int]]:
        first = next(_iter_samples(self.shards[0], read_images=True), None)
        if first is None:
            raise UserError(f"WebDataset shard {self.shards[0]} is empty (no samples)")
        self._check(first, self.shards[0], None)
        kind = "class" if first.cls is not None else "caption"
        name, data = first.image
        img = open_image(data, f"{self.shards[0]}:{name}")
        c = pil_mode_channels(img.mode)
        shape = (c, self.image_size, self.image_size) if self.image_size else (c, *img.size[::-1])
        return kind, shape

    def _check(self, s: _Sample, shard: Path, kind: str | None) -> None:
        if s.image is None:
            raise UserError(f"{shard}: sample {s.key!r} has no image ({', '.join(IMAGE_EXTS)})")
        if kind == "class" and s.cls is None or kind is None and s.cls is None and s.txt is None:
            raise UserError(f"{shard}: sample {s.key!r} has no .cls condition")
        if kind == "caption" and not s.txt:
            raise UserError(f"{shard}: sample {s.key!r} has no (or an empty) .txt caption")

    def _condition(self, s: _Sample, shard: Path, kind: str) -> int | str:
        self._check(s, shard, kind)
        if kind == "caption":
            return s.txt
        try:
            return int(s.cls)
        except ValueError:
            raise UserError(f"{shard}: sample {s.key!r} has a non-integer .cls {s.cls!r}") from None

    # -- full header scan: conditions, counts, meta ---------------------------------------
    @cached_property
    def _scan(self) -> tuple[list, np.ndarray]:
        from tqdm import tqdm

        kind = self._probe[0]
        conds: list = []
        counts = []
        for shard in tqdm(self.shards, desc="scanning shards", disable=len(self.shards) < 8):
            before = len(conds)
            conds += [self._condition(s, shard, kind) for s in _iter_samples(shard, False)]
            counts.append(len(conds) - before)
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        return conds, offsets

    def conditions(self):
        conds = self._scan[0]
        if self._probe[0] == "class":
            arr = np.asarray(conds, dtype=np.int64)
            arr.flags.writeable = False
            return arr
        return conds

    @cached_property
    def meta(self) -> DatasetMeta:  # type: ignore[override]
        kind, shape = self._probe
        conds = self.conditions()
        if not len(conds):
            raise UserError(f"WebDataset {self.pattern} is empty (no samples)")
        names: tuple[str, ...] = ()
        prior: tuple[float, ...] = ()
        if kind == "class":
            if conds.min() < 0:
                raise UserError(f"WebDataset {self.pattern}: negative class index {conds.min()}")
            names_file = self.shards[0].parent / "classes.txt"
            if names_file.is_file():
                lines = names_file.read_text(encoding="utf-8").splitlines()
                names = tuple(line.strip() for line in lines if line.strip())
                if conds.max() >= len(names):
                    raise UserError(
                        f"{names_file} names {len(names)} classes but a shard uses class "
                        f"index {conds.max()}"
                    )
            else:
                names = tuple(str(i) for i in range(int(conds.max()) + 1))
            prior = class_prior(conds, len(names))
        return DatasetMeta(
            name=f"wds:{self.pattern}",
            split=self.split,
            class_names=names,
            class_prior=prior,
            num_samples=len(conds),
            image_shape=shape,
            condition_kind=kind,  # type: ignore[arg-type]
            extra={"num_shards": len(self.shards)},
        )

    # -- streaming ---------------------------------------------------------------------
    def iter_indexed(self, with_index: bool = True) -> Iterator[tuple[int, torch.Tensor, int | str]]:
        """Yield ``(global index, image, condition)`` for this consumer's share of the data.

        The global index (order of the sorted shards) is what manifests refer to; it needs
        the header scan (``with_index=False`` skips it and yields -1).
        """
        kind, (c, h, w) = self._probe
        offsets = self._scan[1] if with_index else None
        slot, slots = _partition()
        by_shard = len(self.shards) >= slots
        shard_ids = range(slot, len(self.shards), slots) if by_shard else range(len(self.shards))
        counter = 0
        for si in shard_ids:
            shard = self.shards[si]
            for pos, s in enumerate(_iter_samples(shard, read_images=True)):
                keep = by_shard or counter % slots == slot
                counter += 1
                if not keep:
                    continue
                cond = self._condition(s, shard, kind)
                name, data = s.image
                image = pil_to_tensor(open_image(data, f"{shard}:{name}"), c, (h, w))
                index = int(offsets[si]) + pos if offsets is not None else -1
                yield index, image, cond

    # -- resumable training stream ----------------------------------------------------------
    def epoch_shards(self, epoch: int, seed: int) -> list[int]:
        """Shard order of ``epoch``: a permutation keyed by ``(seed, epoch)`` (stream
        ``wds/shards`` of :mod:`condnoise.rng`), so shards are reshuffled every epoch."""
        from condnoise import rng

        keys = rng.uniform(seed, "wds/shards", epoch, torch.arange(len(self.shards)))
        return torch.argsort(keys, stable=True).tolist()

    def _slot_plan(self, epoch: int, seed: int, slot: int, slots: int) -> tuple[list[int], bool, int]:
        """``(shard ids, by_shard, samples of the slot)`` of one epoch."""
        counts = np.diff(self._scan[1])
        order = self.epoch_shards(epoch, seed)
        if len(self.shards) >= slots:
            mine = order[slot::slots]
            return mine, True, int(sum(counts[i] for i in mine))
        total = int(counts.sum())
        return order, False, max(0, (total - slot + slots - 1) // slots)

    def stream(self, slot: int, slots: int, *, seed: int, start: int = 0) -> Iterator[tuple[int, torch.Tensor]]:
        """Endless ``(global index, image)`` of consumer ``slot`` of ``slots`` (DDP ranks x
        DataLoader workers), epoch after epoch, skipping its first ``start`` samples.

        Each epoch the shards are reshuffled (:meth:`epoch_shards`); with at least as many
        shards as consumers, slot s reads shards ``order[s::slots]`` in full, otherwise every
        slot reads all shards and keeps every ``slots``-th sample. A slot's position is its
        sample count alone, so a trainer resumes it from the number of samples it consumed.
        Samples within a shard keep their order (no shuffle buffer).
        """
        _, (c, h, w) = self._probe
        offsets, epoch = self._scan[1], 0
        while True:
            shards, by_shard, size = self._slot_plan(epoch, seed, slot, slots)
            if size == 0:
                raise UserError(f"WebDataset {self.pattern}: consumer {slot} of {slots} gets no samples")
            if start >= size:
                start, epoch = start - size, epoch + 1
                continue
            counter = 0
            for si in shards:
                for pos, sample in enumerate(_iter_samples(self.shards[si], read_images=True)):
                    keep = by_shard or counter % slots == slot
                    counter += 1
                    if not keep:
                        continue
                    if start:
                        start -= 1
                        continue
                    name, data = sample.image
                    image = pil_to_tensor(open_image(data, f"{self.shards[si]}:{name}"), c, (h, w))
                    yield int(offsets[si]) + pos, image
            epoch += 1

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int | str]]:
        for _, image, cond in self.iter_indexed(with_index=False):
            yield image, cond

    def __len__(self) -> int:
        return self.meta.num_samples
