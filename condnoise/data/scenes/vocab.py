"""The attribute vocabulary of ``scenes`` and its fixed layout geometry (one place per fact).

Boxes are given in a 32 x 32 frame and scale with the image (64 x 64 doubles them).
See the package docstring for the rules they implement.
"""

from __future__ import annotations

import itertools

import numpy as np

from condnoise.data.fashion_mnist import CLASS_NAMES

CLASSES: tuple[str, ...] = CLASS_NAMES
COLOURS = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "white")
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "centre")
BACKGROUNDS = ("black", "gray", "brown", "navy")
FIELDS = ("class", "colour", "size", "position")  # the per-item attributes

# Tints (RGB in [0, 1]) multiplied by the item's intensity; backgrounds are darker than
# every tint and hold no hue of the tint set.
COLOUR_RGB = np.array([
    (0.95, 0.15, 0.15), (1.00, 0.55, 0.05), (0.95, 0.90, 0.10), (0.15, 0.80, 0.20),
    (0.10, 0.85, 0.90), (0.20, 0.35, 1.00), (0.65, 0.25, 0.95), (1.00, 1.00, 1.00),
], dtype=np.float32)  # fmt: skip
BACKGROUND_RGB = np.array(
    [(0.0, 0.0, 0.0), (0.35, 0.35, 0.35), (0.35, 0.20, 0.10), (0.05, 0.07, 0.30)], np.float32
)

# test-novel: class c is shown only in colour HELD_OUT_COLOUR[c]; train / test never pair
# class c with that colour. (3c mod 8 spreads the ten pairs over all eight colours.)
HELD_OUT_COLOUR = tuple((3 * c) % len(COLOURS) for c in range(len(CLASSES)))
HELD_OUT = tuple((CLASSES[c], COLOURS[h]) for c, h in enumerate(HELD_OUT_COLOUR))

FRAME = 32
SIDE = {"small": 10, "large": 16}  # item box side in the 32-frame
# Top-left corner (y, x) of each (position, size) box in the 32-frame: a plus-shaped layout;
# small boxes never overlap each other, large ones take half the frame along their side.
CORNER = {
    ("left", "small"): (11, 0), ("right", "small"): (11, 22), ("top", "small"): (0, 11),
    ("bottom", "small"): (22, 11), ("centre", "small"): (11, 11),
    ("left", "large"): (8, 0), ("right", "large"): (8, 16), ("top", "large"): (0, 8),
    ("bottom", "large"): (16, 8), ("centre", "large"): (8, 8),
}  # fmt: skip
MAX_ITEMS = 3


def box(position: str, size: str, image_size: int = FRAME) -> tuple[int, int, int]:
    """``(y0, x0, side)`` of the item box at ``image_size`` (a multiple of 32)."""
    k = image_size // FRAME
    y, x = CORNER[(position, size)]
    return y * k, x * k, SIDE[size] * k


def _overlap(a: tuple[str, str], b: tuple[str, str]) -> bool:
    (ya, xa, sa), (yb, xb, sb) = box(*a), box(*b)
    return ya < yb + sb and yb < ya + sa and xa < xb + sb and xb < xa + sa


def _valid_layouts() -> tuple[tuple[tuple[str, str], ...], ...]:
    """Every set of 1-3 items at distinct positions whose boxes do not overlap, each a tuple
    of (position, size) in POSITIONS order; ordered by item count, then enumeration."""
    out = []
    for k in range(1, MAX_ITEMS + 1):
        for pos in itertools.combinations(POSITIONS, k):
            for sizes in itertools.product(SIZES, repeat=k):
                items = tuple(zip(pos, sizes))
                if not any(_overlap(a, b) for a, b in itertools.combinations(items, 2)):
                    out.append(items)
    return tuple(out)


LAYOUTS = _valid_layouts()
_LAYOUT_SET = frozenset(LAYOUTS)


def is_valid_layout(items: list[tuple[str, str]]) -> bool:
    """True if the (position, size) pairs form one of LAYOUTS (any order)."""
    key = tuple(sorted(items, key=lambda ps: POSITIONS.index(ps[0])))
    return key in _LAYOUT_SET


def allowed_pair(class_index: int, colour: str, novel: bool = False) -> bool:
    """Whether (class, colour) may appear: train / test avoid the held-out pairs,
    test-novel uses only them."""
    held = COLOURS[HELD_OUT_COLOUR[class_index]] == colour
    return held if novel else not held


def vocabulary() -> dict:
    """JSON-serialisable vocabulary and layout facts (``meta.extra`` of a scenes source)."""
    return {
        "classes": list(CLASSES),
        "colours": list(COLOURS),
        "sizes": list(SIZES),
        "positions": list(POSITIONS),
        "backgrounds": list(BACKGROUNDS),
        "held_out": [list(p) for p in HELD_OUT],
        "boxes_32": {f"{p}/{s}": [*CORNER[(p, s)], SIDE[s]] for p, s in CORNER},
        "max_items": MAX_ITEMS,
    }
