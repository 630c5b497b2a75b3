"""Vectorised generation of ``scenes``: the item pool, the attribute draws, the rendering.

Every draw is a column of one matrix of uniforms per split (row i = scene i), so the first
n scenes of a split do not depend on how many are generated.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from condnoise.data.fashion_mnist import load_fashion_mnist
from condnoise.data.scenes.vocab import (
    BACKGROUND_RGB,
    CLASSES,
    COLOUR_RGB,
    COLOURS,
    HELD_OUT_COLOUR,
    LAYOUTS,
    MAX_ITEMS,
    POSITIONS,
    SIZES,
    box,
)
from condnoise.data.transforms import resize_center_crop

POOL_FRACTION = 0.3  # share of each class's items kept in the pool (most typical first)
POOL_SIDE = 10  # the small item side at 32 x 32: typicality is judged at that resolution
RIDGE = 1.0  # ridge penalty of the typicality classifier
MASK_ALPHA = 0.1  # a pixel belongs to an item where its intensity exceeds this
DUPLICATE_P = 0.25  # items 2 and 3 repeat item 1's class and colour with this probability
BLACK_P = 0.5  # probability of the black background
N_DRAWS = 14  # uniforms per scene: count, layout, 3 classes, 3 colours, 2 repeats, bg, 3 items

# Layout table: positions / sizes per slot (-1 = empty), item count, number of large items.
LAY_POS = np.full((len(LAYOUTS), MAX_ITEMS), -1, np.int8)
LAY_SIZE = np.full((len(LAYOUTS), MAX_ITEMS), -1, np.int8)
for _i, _lay in enumerate(LAYOUTS):
    for _j, (_p, _s) in enumerate(_lay):
        LAY_POS[_i, _j], LAY_SIZE[_i, _j] = POSITIONS.index(_p), SIZES.index(_s)
LAY_COUNT = (LAY_POS >= 0).sum(1)
LAY_LARGE = (LAY_SIZE == 1).sum(1)


@dataclass
class Layout:
    """Attributes of N scenes: per item slot (``[N, 3]`` int, -1 = no item) class, colour,
    size, position (indices into the vocabulary) and ``source`` (the Fashion-MNIST index in
    the split); ``background`` ``[N]``. Slots are in POSITIONS order."""

    cls: np.ndarray
    colour: np.ndarray
    size: np.ndarray
    position: np.ndarray
    source: np.ndarray
    background: np.ndarray

    def __len__(self) -> int:
        return len(self.background)


def _alpha(images_u8: np.ndarray, side: int) -> np.ndarray:
    """uint8 ``[n, 28, 28]`` -> intensity float32 ``[n, side, side]`` in [0, 1]."""
    x = torch.from_numpy(images_u8.astype(np.float32) / 255.0).unsqueeze(1)
    return resize_center_crop(x, side).squeeze(1).clamp_(0.0, 1.0).numpy()


def _features(images_u8: np.ndarray) -> np.ndarray:
    x = _alpha(images_u8, POOL_SIDE).reshape(len(images_u8), -1).astype(np.float64)
    return np.concatenate([x, np.ones((len(x), 1))], axis=1)


def _ridge_weights(features: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """One-vs-rest ridge classifier (targets +-1) on Fashion-MNIST train features, float64
    (torch's matmul: numpy's bundled BLAS took 1-2 s for this Gram matrix on 2 cores)."""
    a = torch.from_numpy(features)
    y = torch.from_numpy(np.eye(len(CLASSES))[labels] * 2.0 - 1.0)
    gram = a.T @ a + RIDGE * torch.eye(a.shape[1], dtype=torch.float64)
    return torch.linalg.solve(gram, a.T @ y).numpy()


@functools.lru_cache(maxsize=4)
def item_pool(fm_split: str, data_dir: str | None = None) -> np.ndarray:
    """Fashion-MNIST indices of ``fm_split`` used as items, sorted by (class, index): per
    class the POOL_FRACTION with the largest margin (true-class score minus the best other)
    of a ridge classifier fitted on Fashion-MNIST train at POOL_SIDE px, i.e. the items
    still recognisable at that size. Read-only (shared by the cache)."""
    train_images, train_labels = load_fashion_mnist("train", data_dir)
    train_features = _features(train_images)
    weights = _ridge_weights(train_features, train_labels)
    images, labels = load_fashion_mnist(fm_split, data_dir)
    features = train_features if fm_split == "train" else _features(images)
    scores = (torch.from_numpy(features) @ torch.from_numpy(weights)).numpy()
    n = np.arange(len(labels))
    true = scores[n, labels]
    scores[n, labels] = -np.inf
    margin = true - scores.max(1)
    keep = []
    for c in range(len(CLASSES)):
        idx = np.flatnonzero(labels == c)
        order = np.argsort(-margin[idx], kind="stable")
        keep.append(np.sort(idx[order[: round(POOL_FRACTION * len(idx))]]))
    pool = np.concatenate(keep)
    pool.flags.writeable = False
    return pool


def _choose_layouts(count: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Layout ids for item counts, each layout weighted 2 ** (number of large items)."""
    out = np.empty(len(count), np.int64)
    for k in range(1, MAX_ITEMS + 1):
        ids = np.flatnonzero(LAY_COUNT == k)
        cdf = np.cumsum(2.0 ** LAY_LARGE[ids])
        sel = count == k
        pick = np.searchsorted(cdf / cdf[-1], u[sel], side="right")
        out[sel] = ids[np.minimum(pick, len(ids) - 1)]
    return out


def draw_layout(u: np.ndarray, pool: np.ndarray, pool_labels: np.ndarray, novel: bool) -> Layout:
    """Attributes from uniforms ``u [N, N_DRAWS]`` (see module docstring for the rules)."""
    n, k = len(u), len(CLASSES)
    lay = _choose_layouts(1 + np.minimum((u[:, 0] * 3).astype(np.int64), 2), u[:, 1])
    position, size = LAY_POS[lay].astype(np.int64), LAY_SIZE[lay].astype(np.int64)
    cls = np.minimum((u[:, 2:5] * k).astype(np.int64), k - 1)
    held = np.asarray(HELD_OUT_COLOUR)[cls]
    others = np.minimum((u[:, 5:8] * (len(COLOURS) - 1)).astype(np.int64), len(COLOURS) - 2)
    colour = held if novel else (held + 1 + others) % len(COLOURS)
    repeat = u[:, 8:10] < DUPLICATE_P
    for j in (1, 2):
        cls[:, j] = np.where(repeat[:, j - 1], cls[:, 0], cls[:, j])
        colour[:, j] = np.where(repeat[:, j - 1], colour[:, 0], colour[:, j])
    rest = np.minimum(((u[:, 10] - BLACK_P) / (1 - BLACK_P) * 3).astype(np.int64), 2)
    background = np.where(u[:, 10] < BLACK_P, 0, 1 + rest)
    start = np.searchsorted(pool_labels, np.arange(k))
    count = np.bincount(pool_labels, minlength=k)
    pick = start[cls] + np.minimum((u[:, 11:14] * count[cls]).astype(np.int64), count[cls] - 1)
    source = pool[pick]
    empty = position < 0
    for a in (cls, colour, source):
        a[empty] = -1
    return Layout(cls.astype(np.int8), colour.astype(np.int8), size.astype(np.int8),
                  position.astype(np.int8), source.astype(np.int32),
                  background.astype(np.int8).reshape(n))  # fmt: skip


def render(layout: Layout, items_u8: np.ndarray, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 [N, H, W, 3], masks uint8 [N, H, W])`` for ``layout``.

    ``items_u8``: the split's Fashion-MNIST images. An item's intensity (resized, scaled so
    its brightest pixel is 1) blends its tint over the background inside its box; the mask
    holds class + 1 where the intensity exceeds MASK_ALPHA.
    """
    n = len(layout)
    bg = BACKGROUND_RGB[layout.background]
    images = np.empty((n, image_size, image_size, 3), np.uint8)
    images[:] = np.rint(bg * 255).astype(np.uint8)[:, None, None, :]
    masks = np.zeros((n, image_size, image_size), np.uint8)
    used = np.unique(layout.source[layout.source >= 0])
    row = np.full(len(items_u8), -1, np.int64)
    row[used] = np.arange(len(used))
    for s, size in enumerate(SIZES):
        bank = None
        for p, pos in enumerate(POSITIONS):
            y, x, side = box(pos, size, image_size)
            for j in range(MAX_ITEMS):
                sel = np.flatnonzero((layout.position[:, j] == p) & (layout.size[:, j] == s))
                if not len(sel):
                    continue
                if bank is None:
                    bank = _alpha(items_u8[used], side)
                    bank /= np.maximum(bank.max(axis=(1, 2), keepdims=True), 1e-6)
                a = bank[row[layout.source[sel, j]]]
                tint = COLOUR_RGB[layout.colour[sel, j]][:, None, None, :]
                out = bg[sel][:, None, None, :] * (1 - a[..., None]) + tint * a[..., None]
                images[sel, y : y + side, x : x + side] = np.rint(out * 255).astype(np.uint8)
                cls = layout.cls[sel, j].astype(np.uint8)[:, None, None] + 1
                masks[sel, y : y + side, x : x + side] = np.where(a > MASK_ALPHA, cls, 0)
    return images, masks
