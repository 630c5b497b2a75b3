"""The ``scenes`` source on real Fashion-MNIST items: determinism, split sizes and item
provenance, held-out (class, colour) pairs, masks against records, Canny against OpenCV,
the caption grammar round trip for every synonym, and bad input."""

from __future__ import annotations

import json
import re

import cv2
import numpy as np
import pytest
import torch

from condnoise.data import open_source
from condnoise.data.fashion_mnist import load_fashion_mnist
from condnoise.data.scenes import HELD_OUT, CaptionParseError, Scenes, parse_caption, render_caption
from condnoise.data.scenes.captions import N_CHOICES, vocabulary_words
from condnoise.data.scenes.vocab import (
    BACKGROUND_RGB,
    BACKGROUNDS,
    CLASSES,
    COLOUR_RGB,
    COLOURS,
    POSITIONS,
    SIZES,
    box,
    is_valid_layout,
)  # fmt: skip
from condnoise.diffusion.grids import to_uint8
from condnoise.errors import UserError

torch.set_num_threads(1)
SLICE = 2000


@pytest.fixture(scope="module")
def train_slice():
    return Scenes("train", num_samples=SLICE)


def _held_pairs(layout) -> set[tuple[str, str]]:
    m = layout.position >= 0
    return {(CLASSES[c], COLOURS[k]) for c, k in zip(layout.cls[m], layout.colour[m])}


def test_same_seed_same_bytes_other_seed_differs():
    a, b = Scenes("test", num_samples=300), Scenes("test", num_samples=300)
    c = Scenes("test", seed=1, num_samples=300)
    assert a.images_uint8().tobytes() == b.images_uint8().tobytes()
    assert a.masks().tobytes() == b.masks().tobytes() and a.conditions() == b.conditions()
    assert a.images_uint8().tobytes() != c.images_uint8().tobytes()
    assert sum(x != y for x, y in zip(a.conditions(), c.conditions())) > 290
    assert (a.meta.name, c.meta.name) == ("scenes", "scenes:seed=1")


def test_full_splits_cache_and_prefix(scenes_env, train_slice):
    train = open_source("scenes", "train")
    assert len(train) == 60000 and train.meta.image_shape == (3, 32, 32)
    assert (scenes_env / "scenes" / "scenes-v2-seed0-train-32.npz").is_file()
    again = open_source("scenes", "train")  # from the cache: same bytes
    assert again.conditions() == train.conditions()
    assert again.images_uint8().tobytes() == train.images_uint8().tobytes()
    assert np.array_equal(again.masks(), train.masks())
    # the first n scenes do not depend on how many are generated
    assert train.conditions()[:SLICE] == train_slice.conditions()
    assert np.array_equal(train.images_uint8()[:SLICE], train_slice.images_uint8())
    assert [len(open_source("scenes", s)) for s in ("test", "test-novel")] == [10000, 10000]


def test_held_out_pairs_only_in_test_novel(scenes_env):
    held = set(HELD_OUT)
    assert len(held) == len(CLASSES)
    for split in ("train", "test"):
        assert not _held_pairs(open_source("scenes", split).layout) & held
    assert _held_pairs(open_source("scenes", "test-novel").layout) == held


def _item_intensity(ds, i, j) -> np.ndarray:
    """An item's intensity recovered from its black-background render (pixel / tint)."""
    lay = ds.layout
    y, x, side = box(POSITIONS[lay.position[i, j]], SIZES[lay.size[i, j]], ds.meta.image_shape[-1])
    region = ds.images_uint8()[i, y : y + side, x : x + side].astype(np.float64) / 255
    tint = COLOUR_RGB[lay.colour[i, j]]
    return region[..., int(np.argmax(tint))] / tint.max()


def _resized(images: np.ndarray, side: int) -> np.ndarray:
    out = np.stack([cv2.resize(x, (side, side), interpolation=cv2.INTER_AREA) for x in images])
    out = out.reshape(len(images), -1).astype(np.float64)
    out -= out.mean(1, keepdims=True)
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)


@pytest.mark.parametrize("split", ["train", "test"])
def test_items_are_the_splits_own_fashion_mnist_images(split):
    """Each item's pixels (at 64 px, where items are distinct) match its recorded
    Fashion-MNIST image of its own split best among every image of its class in either
    split: the items are those images, and no test item is in train."""
    ds = Scenes(split, num_samples=120, image_size=64)
    own, own_y = load_fashion_mnist(split)
    other, other_y = load_fashion_mnist("test" if split == "train" else "train")
    lay = ds.layout
    assert lay.source.max() < len(own) and (lay.source[lay.position < 0] == -1).all()
    assert (own_y[lay.source[lay.position >= 0]] == lay.cls[lay.position >= 0]).all()
    refs: dict = {}
    checked = 0
    for i in np.flatnonzero(lay.background == 0)[:8]:
        for j in np.flatnonzero(lay.position[i] >= 0):
            got = _item_intensity(ds, i, j).ravel()
            got = (got - got.mean()) / np.linalg.norm(got - got.mean())
            key = (int(np.sqrt(got.size)), int(lay.cls[i, j]))
            if key not in refs:
                mine = np.flatnonzero(own_y == key[1])
                refs[key] = (mine, _resized(own[mine], key[0]),
                             _resized(other[other_y == key[1]], key[0]))  # fmt: skip
            mine, ref_own, ref_other = refs[key]
            corr_own, corr_other = ref_own @ got, ref_other @ got
            assert mine[np.argmax(corr_own)] == lay.source[i, j]
            assert corr_own.max() > 0.98 and corr_own.max() > corr_other.max()
            checked += 1
    assert checked > 10


def test_masks_match_records(train_slice):
    masks, images, records = train_slice.masks(), train_slice.images_uint8(), train_slice.records()
    for i, rec in enumerate(records):
        inside = np.zeros(masks.shape[1:], bool)
        for it in rec["items"]:
            y, x, side = box(it["position"], it["size"])
            region = masks[i, y : y + side, x : x + side]
            # the item's class and at most background inside its box (a bag may fill it)
            values = set(np.unique(region).tolist())
            assert it["class"] + 1 in values and values <= {0, it["class"] + 1}, (i, it)
            inside[y : y + side, x : x + side] = True
        assert not masks[i][~inside].any()
        bg = np.rint(BACKGROUND_RGB[BACKGROUNDS.index(rec["background"])] * 255)
        assert (np.abs(images[i][masks[i] > 0] - bg).max(axis=1) > 0).all()


def test_canny_equals_opencv(train_slice):
    idx = [0, 5, 17, SLICE - 1]
    for low, high in ((100, 200), (40, 90)):
        edges = train_slice.canny(idx, low, high)
        assert edges.shape == (4, 32, 32) and edges.dtype == np.uint8
        for k, i in enumerate(idx):
            rgb = to_uint8(train_slice[i][0][None])[0]
            assert np.array_equal(edges[k], cv2.Canny(rgb, low, high))
    assert train_slice.canny(idx).any()


def test_captions_parse_back_for_every_synonym(train_slice):
    rng = np.random.default_rng(0)
    words: set[str] = set()
    for rec, cap in zip(train_slice.records(), train_slice.conditions()):
        assert parse_caption(cap) == rec, cap
        for _ in range(4):
            other = render_caption(rec, rng.random(N_CHOICES))
            assert parse_caption(other) == rec, other
            words.update(re.findall(r"[a-z]+(?:-[a-z]+)*", other))
        words.update(re.findall(r"[a-z]+(?:-[a-z]+)*", cap))
    assert set(vocabulary_words()) <= words  # every synonym, prefix and phrase was emitted
    recs = train_slice.records()
    seen = {f: {it[f] for r in recs for it in r["items"]} for f in ("class", "colour", "size", "position")}
    assert seen == {"class": set(range(10)), "colour": set(COLOURS), "size": set(SIZES),
                    "position": set(POSITIONS)}  # fmt: skip
    assert {r["background"] for r in recs} == set(BACKGROUNDS)
    assert {r["count"] for r in recs} == {1, 2, 3}
    assert any(re.search(r"\b(two|three) ", c) for c in train_slice.conditions())


@pytest.mark.parametrize("text", [
    "hello world", "a small red sneaker", "two small red sneaker on the left",
    "a small red sneaker on the left and a large blue bag on the left side",
    "a small red sneaker on the left on a pink background", "a small red sneaker on the left,",
])  # fmt: skip
def test_parse_rejects_what_the_grammar_cannot_say(text):
    with pytest.raises(CaptionParseError):
        parse_caption(text)


def test_items_records_meta_and_tensors(train_slice):
    ds = train_slice
    image, caption = ds[7]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert -1.0 <= image.min() and image.max() <= 1.0 and caption == ds.conditions()[7]
    images, index = ds.tensors()
    assert images.shape == (SLICE, 3, 32, 32) and torch.equal(images[7], image)
    assert torch.equal(index, torch.arange(SLICE))
    rec = json.loads(json.dumps(ds.records()[7]))
    assert set(rec) == {"items", "background", "count"} and rec["count"] == len(rec["items"])
    assert set(rec["items"][0]) == {"class", "class_name", "colour", "size", "position"}
    assert all(is_valid_layout([(it["position"], it["size"]) for it in r["items"]])
               for r in ds.records())  # fmt: skip
    m = ds.meta
    assert m.condition_kind == "caption" and m.class_names == ()
    voc = m.extra["vocabulary"]
    assert voc["classes"] == list(CLASSES) and voc["colours"] == list(COLOURS)
    assert voc["sizes"] == list(SIZES) and voc["positions"] == list(POSITIONS)


def test_image_size_64_renders_the_same_scenes():
    small, big = Scenes("test", num_samples=40), Scenes("test", image_size=64, num_samples=40)
    assert big[0][0].shape == (3, 64, 64) and big.masks().shape == (40, 64, 64)
    assert big.conditions() == small.conditions() and big.records() == small.records()
    down = big.masks()[:, ::2, ::2]
    assert (down == small.masks()).mean() > 0.97


@pytest.mark.parametrize("spec, kwargs, message", [
    ("scenes", {"split": "val"}, "unknown scenes split 'val'; choose one of train, test, test-novel"),
    ("scenes", {"image_size": 48}, "scenes image size must be 32 or 64, got 48"),
    ("scenes:seed=x", {}, "scenes seed must be a non-negative integer, got 'x'"),
    ("scenes:seed=-1", {}, "scenes seed must be a non-negative integer, got '-1'"),
    ("scenes:colour=1", {}, "unknown scenes option 'colour=1'"),
    ("scenes:", {}, "needs an option after the colon"),
])  # fmt: skip
def test_bad_input_is_one_line(spec, kwargs, message):
    with pytest.raises(UserError) as e:
        open_source(spec, **kwargs)
    assert message in str(e.value) and "\n" not in str(e.value)
