"""The ``scenes`` source: generation from a seed, the on-disk cache, the dataset class."""

from __future__ import annotations

import json
import time
import warnings
import zipfile
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from condnoise.data.base import ConditionalDataset, DatasetMeta
from condnoise.data.fashion_mnist import load_fashion_mnist
from condnoise.data.scenes.captions import N_CHOICES, make_record, render_caption
from condnoise.data.scenes.render import N_DRAWS, PAIRS, Layout, draw_layout, item_pool, render
from condnoise.data.scenes.vocab import BACKGROUNDS, COLOURS, POSITIONS, SIZES, vocabulary
from condnoise.errors import UserError
from condnoise.io import atomic_open
from condnoise.paths import cache_dir
from condnoise.rng import uniform

VERSION = 2  # bump when any generation rule changes: cached files carry it in their name
# 1: numpy SeedSequence draws; 2: the shared counter-based condnoise.rng
DEFAULT_SEED = 0
IMAGE_SIZES = (32, 64)
# split -> (Fashion-MNIST split its items come from, stream id of its draws)
SPLITS = {"train": ("train", 0), "test": ("test", 1), "test-novel": ("test", 2)}
OPTIONS = ("seed",)


def parse_options(arg: str | None) -> dict[str, int]:
    """``seed=N`` (the part after ``scenes:``) -> ``{"seed": N}``; UserError when malformed."""
    opts = {"seed": DEFAULT_SEED}
    if arg is None:
        return opts
    if not arg.strip():
        raise UserError("data source 'scenes:' needs an option after the colon, e.g. scenes:seed=1")
    for part in arg.split(","):
        key, sep, value = part.strip().partition("=")
        if not sep or key not in OPTIONS:
            raise UserError(f"unknown scenes option {part.strip()!r}; known: seed=N (e.g. scenes:seed=1)")
        if not value.isdigit():
            raise UserError(f"scenes seed must be a non-negative integer, got {value!r}")
        opts[key] = int(value)
    return opts


def spec_name(seed: int) -> str:
    """The canonical spec of a seed: ``scenes`` (default seed) or ``scenes:seed=N``."""
    return "scenes" if seed == DEFAULT_SEED else f"scenes:seed={seed}"


@dataclass
class SceneData:
    """One generated split: its layout, captions, and (possibly lazily read) pixels."""

    layout: Layout
    captions: list[str]
    images: np.ndarray | None = None  # uint8 [N, H, W, 3]
    masks: np.ndarray | None = None  # uint8 [N, H, W]


def layout_records(layout: Layout) -> list[dict]:
    """The canonical record (``captions.make_record``) of every scene of ``layout``."""
    out = []
    for i in range(len(layout)):
        items = [
            {"class": int(layout.cls[i, j]), "colour": COLOURS[layout.colour[i, j]],
             "size": SIZES[layout.size[i, j]], "position": POSITIONS[layout.position[i, j]]}
            for j in range(layout.cls.shape[1]) if layout.position[i, j] >= 0
        ]  # fmt: skip
        out.append(make_record(items, BACKGROUNDS[layout.background[i]]))
    return out


def _uniforms(seed: int, stream: str, n: int, k: int) -> np.ndarray:
    """float64 [n, k]: draw j of scene i is ``rng.uniform(seed, stream, i, j)`` (so the first
    n scenes do not depend on how many are generated)."""
    rows = torch.arange(n, dtype=torch.int64)[:, None]
    cols = torch.arange(k, dtype=torch.int64)[None, :]
    return uniform(seed, stream, rows, cols).numpy()


def generate(
    split: str, seed: int, image_size: int, data_dir: str | None = None, num: int | None = None
) -> SceneData:
    """Generate the first ``num`` scenes (default: all) of ``split`` from ``seed``."""
    fm_split, _ = SPLITS[split]
    size = len(load_fashion_mnist(fm_split, data_dir)[1])
    pairs = "held-out" if split == "test-novel" else "seen"
    return generate_scenes(f"scenes/{split}", seed, image_size, fm_split=fm_split, pairs=pairs,
                           data_dir=data_dir, num=size if num is None else min(num, size))  # fmt: skip


def generate_scenes(
    stream: str, seed: int, image_size: int, *, fm_split: str, pairs: str,
    data_dir: str | None = None, num: int | None = None,
) -> SceneData:  # fmt: skip
    """The first ``num`` scenes (default: as many as ``fm_split`` has images) of the draw
    stream ``stream`` (uniforms ``{stream}/layout`` and ``{stream}/caption``), items from
    the Fashion-MNIST split ``fm_split``, (class, colour) pairs restricted by ``pairs``
    (``render.PAIRS``). The named splits are ``generate(split, ...)``; other streams make
    scenes outside them, e.g. the all-pairs renders that train the evaluation networks
    (``pairs="any"``, ``fm_split="train"``: never a test item)."""
    if pairs not in PAIRS:
        raise UserError(f"scenes pairs must be one of {', '.join(PAIRS)}, got {pairs!r}")
    items_u8, labels = load_fashion_mnist(fm_split, data_dir)
    n = len(labels) if num is None else num
    u = _uniforms(seed, f"{stream}/layout", n, N_DRAWS)
    choices = _uniforms(seed, f"{stream}/caption", n, N_CHOICES)
    pool = item_pool(fm_split, data_dir)
    layout = draw_layout(u, pool, labels[pool], pairs)
    images, masks = render(layout, items_u8, image_size)
    captions = [render_caption(r, c) for r, c in zip(layout_records(layout), choices)]
    return SceneData(layout, captions, images, masks)


EVAL_STREAM = "scenes/eval-train"


def eval_train_scenes(num: int, seed: int = DEFAULT_SEED, image_size: int = 32,
                      data_dir: str | None = None) -> SceneData:  # fmt: skip
    """Clean renders that train the evaluation networks (``scenes-recognizer``,
    ``scenes-clip``): items from Fashion-MNIST *train* (never a test item), every (class,
    colour) pair allowed (``pairs="any"``) so the networks know the held-out pairs of
    ``test-novel``; stream ``scenes/eval-train``, not cached (about 5 CPU-seconds per 60,000)."""
    return generate_scenes(EVAL_STREAM, seed, image_size, fm_split="train", pairs="any",
                           data_dir=data_dir, num=num)  # fmt: skip


# -- cache ---------------------------------------------------------------------------------
def cache_path(split: str, seed: int, image_size: int) -> Path:
    return cache_dir() / "scenes" / f"scenes-v{VERSION}-seed{seed}-{split}-{image_size}.npz"


def _info(split: str, seed: int, image_size: int) -> dict:
    return {"version": VERSION, "seed": seed, "split": split, "image_size": image_size}


def save_cache(path: Path, data: SceneData, info: dict) -> None:
    """Write the split as one uncompressed .npz (atomic)."""
    arrays = {f.name: getattr(data.layout, f.name) for f in fields(Layout)}
    arrays["captions"] = np.frombuffer("\n".join(data.captions).encode(), np.uint8)
    arrays["info"] = np.frombuffer(json.dumps(info).encode(), np.uint8)
    with atomic_open(path, "wb") as f:
        np.savez(f, images=data.images, masks=data.masks, **arrays)


def load_cache(path: Path, info: dict) -> SceneData | None:
    """The cached split (pixels read lazily), or None when absent, stale or unreadable."""
    if not path.is_file():
        return None
    try:
        with np.load(path) as z:
            if json.loads(z["info"].tobytes()) != info:
                return None
            layout = Layout(**{f.name: z[f.name] for f in fields(Layout)})
            captions = z["captions"].tobytes().decode().split("\n")
    except (OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile):
        return None
    if len(captions) != len(layout):
        return None
    return SceneData(layout, captions)


def load_or_generate(split: str, seed: int, image_size: int, data_dir: str | None) -> SceneData:
    """The split from the cache (keyed by version, seed, split, size), else generated and
    cached; a failed cache write only warns."""
    info = _info(split, seed, image_size)
    path = cache_path(split, seed, image_size)
    data = load_cache(path, info)
    if data is None:
        data = generate(split, seed, image_size, data_dir)
        try:
            save_cache(path, data, info)
        except OSError as e:
            warnings.warn(f"could not cache scenes in {path}: {e}", stacklevel=2)
    return data


# -- dataset -------------------------------------------------------------------------------
def check_image_size(image_size: int | None) -> int:
    if image_size is None:
        return IMAGE_SIZES[0]
    if isinstance(image_size, bool) or image_size not in IMAGE_SIZES:
        raise UserError(f"scenes image size must be 32 or 64, got {image_size!r}")
    return int(image_size)


class Scenes(ConditionalDataset):
    """Captioned procedural scenes (see ``condnoise.data.scenes``).

    Items: ``(image float32 [3, H, W] in [-1, 1], caption str)``. ``num_samples``: only the
    first n scenes of the split, generated and not cached (quick looks, tests).
    """

    def __init__(self, split: str = "train", *, seed: int = DEFAULT_SEED,
                 image_size: int | None = None, data_dir: str | None = None,
                 num_samples: int | None = None) -> None:  # fmt: skip
        if split not in SPLITS:
            raise UserError(f"unknown scenes split {split!r}; choose one of {', '.join(SPLITS)}")
        if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
            raise UserError(f"scenes seed must be a non-negative integer, got {seed!r}")
        size = check_image_size(image_size)
        if num_samples is not None and (not isinstance(num_samples, int) or num_samples < 1):
            raise UserError(f"scenes num_samples must be a positive integer, got {num_samples!r}")
        self.seed, self.data_dir = int(seed), data_dir
        self._cache_file = cache_path(split, self.seed, size)
        start = time.process_time()
        if num_samples is None:
            self._data = load_or_generate(split, self.seed, size, data_dir)
        else:
            self._data = generate(split, self.seed, size, data_dir, num_samples)
        self.load_cpu_seconds = time.process_time() - start
        self._records: list[dict] | None = None
        self._tensors: tuple[torch.Tensor, torch.Tensor] | None = None
        self.meta = DatasetMeta(
            name=spec_name(self.seed), split=split, class_names=(), class_prior=(),
            num_samples=len(self._data.captions), image_shape=(3, size, size),
            condition_kind="caption",
            extra={"seed": self.seed, "version": VERSION, "vocabulary": vocabulary()},
        )  # fmt: skip

    # -- pixels (read from the cache on first use) ----------------------------------------
    def _pixels(self) -> SceneData:
        d = self._data
        if d.images is None:
            try:
                with np.load(self._cache_file) as z:
                    d.images, d.masks = z["images"], z["masks"]
            except (OSError, KeyError, ValueError, zipfile.BadZipFile) as e:
                raise UserError(f"cannot read the scenes cache {self._cache_file}: {e}") from None
            d.images.flags.writeable = False
            d.masks.flags.writeable = False
        return d

    def images_uint8(self) -> np.ndarray:
        """The rendered images, uint8 ``[N, H, W, 3]`` (read-only); float = p / 127.5 - 1."""
        return self._pixels().images  # type: ignore[return-value]

    def masks(self) -> np.ndarray:
        """Segmentation masks uint8 ``[N, H, W]``: class index + 1 per item pixel, 0 elsewhere."""
        return self._pixels().masks  # type: ignore[return-value]

    def canny(self, indices: Any, low: float = 100, high: float = 200) -> np.ndarray:
        """OpenCV Canny edges (0 / 255) of the uint8 RGB renders: uint8 ``[n, H, W]``
        (:func:`condnoise.data.controls.canny`)."""
        from condnoise.data.controls import canny

        idx = np.atleast_1d(np.asarray(indices, dtype=np.int64))
        return canny(self.images_uint8()[idx], low, high)

    # -- conditions and records ------------------------------------------------------------
    def conditions(self) -> list[str]:
        return self._data.captions

    def records(self) -> list[dict]:
        """Per sample: ``{"items": [{"class", "class_name", "colour", "size", "position"}],
        "background", "count"}`` (items in POSITIONS order); JSON-serialisable."""
        if self._records is None:
            self._records = layout_records(self._data.layout)
        return self._records

    @property
    def layout(self) -> Layout:
        """The attribute arrays (``source``: Fashion-MNIST index of each item in its split)."""
        return self._data.layout

    # -- tensors ----------------------------------------------------------------------------
    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(images float32 [N, 3, H, W] in [-1, 1], caption index int64 [N])``, cached:
        row i's caption is ``conditions()[i]`` (so a corrupted view keeps the same index)."""
        if self._tensors is None:
            x = np.ascontiguousarray(self.images_uint8().transpose(0, 3, 1, 2))
            images = torch.from_numpy(x).float().div_(127.5).sub_(1.0)
            self._tensors = (images, torch.arange(len(self), dtype=torch.int64))
        return self._tensors

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        x = torch.from_numpy(np.array(self.images_uint8()[index])).permute(2, 0, 1)
        return x.float().div_(127.5).sub_(1.0), self._data.captions[index]

    # -- corruption ------------------------------------------------------------------------
    def rewriter(self, name: str):
        """A built-in rewriter for ``condnoise corrupt --kind rewrite`` (see rewrite.py)."""
        from condnoise.data.scenes.rewrite import make_rewriter

        return make_rewriter(name, novel=self.meta.split == "test-novel")

    default_rewriter = "attributes"

    def annotate_manifest(self, manifest, severities=None) -> None:
        """Add ``changes.jsonl`` (per row: the attribute changes) to a caption manifest."""
        from condnoise.data.scenes.rewrite import annotate

        annotate(manifest, self.records(), severities)
