"""Every data source on real data: Fashion-MNIST (Debian package), scikit-learn digits, and
an image folder, caption files and WebDataset shards written here from real images."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader

from condnoise.data import open_source
from condnoise.data.corruption import CorruptedView, corrupt
from condnoise.data.fashion_mnist import CLASS_NAMES
from condnoise.data.transforms import random_hflip, uint8_to_unit
from condnoise.data.webdataset import expand_braces
from condnoise.errors import UserError

torch.set_num_threads(1)


def _png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _digit_uint8(img: np.ndarray) -> np.ndarray:
    return (img * 255.0 / 16.0).round().astype(np.uint8)


@pytest.fixture(scope="module")
def fm_pick(fmnist):
    """Three real images of each of the classes 0, 3, 7 (uint8 [28, 28]) with labels."""
    images, labels = fmnist
    idx = np.concatenate([np.flatnonzero(labels == c)[:3] for c in (0, 3, 7)])
    return images[idx], labels[idx]


# -- built-in in-memory sources -----------------------------------------------------------
def test_fashion_mnist_source_matches_idx_files(fmnist):
    images, labels = fmnist
    src = open_source("fashion-mnist", "train")
    m = src.meta
    assert (m.name, m.split, m.num_samples, m.image_shape) == ("fashion-mnist", "train", 60000, (1, 28, 28))
    assert m.class_names == CLASS_NAMES and m.condition_kind == "class"
    assert np.allclose(m.class_prior, np.bincount(labels) / len(labels))
    x, y = src.tensors()
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape == (60000, 1, 28, 28)
    assert torch.equal(y, torch.from_numpy(labels.copy()))
    assert torch.equal(x[123, 0], uint8_to_unit(images[123]))
    assert x.min() == -1.0 and x.max() == 1.0
    assert src.tensors()[0] is x  # cached
    img, cond = src[59999]
    assert cond == int(labels[59999]) and torch.equal(img, x[59999])
    assert len(open_source("fashion-mnist", "test")) == 10000


def test_fashion_mnist_pads_to_32_with_background(fmnist):
    images, _ = fmnist
    x, _ = open_source("fashion-mnist", image_size=32).tensors()
    assert x.shape == (60000, 1, 32, 32)
    assert torch.equal(x[7, 0, 2:30, 2:30], uint8_to_unit(images[7]))
    border = torch.cat([x[:, :, :2].flatten(), x[:, :, 30:].flatten(), x[:, :, :, :2].flatten()])
    assert torch.all(border == -1.0)


def test_digits_source_and_splits():
    d = load_digits()
    train, test, full = (open_source("digits", s) for s in ("train", "test", "all"))
    assert (len(train), len(test), len(full)) == (1438, 359, 1797)
    x, y = train.tensors()
    assert x.shape == (1438, 1, 8, 8) and x.min() == -1.0 and x.max() == 1.0
    keep = np.arange(1797) % 5 != 4
    assert np.array_equal(y.numpy(), d.target[keep])
    assert torch.allclose(x[0, 0], torch.from_numpy(d.images[0] / 8.0 - 1.0).float())
    big, _ = open_source("digits", "test", image_size=16).tensors()
    assert big.shape == (359, 1, 16, 16) and big.min() >= -1.0 and big.max() <= 1.0
    with pytest.raises(UserError, match="unknown digits split 'val'"):
        open_source("digits", "val")


@pytest.mark.parametrize(
    "spec, message",
    [
        ("mnist", "unknown data source 'mnist'"),
        ("imagefolder:", "needs a path"),
        ("imagefolder:/nonexistent/cn", "image folder not found: /nonexistent/cn"),
        ("captions:/nonexistent/c.jsonl", "caption file not found"),
        ("wds:/nonexistent/shard-{0..1}.tar", "shard not found: /nonexistent/shard-0.tar"),
    ],
)
def test_bad_specs_name_the_problem(spec, message):
    with pytest.raises(UserError, match=message):
        open_source(spec)


def test_fashion_mnist_not_installed_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="Fashion-MNIST not found"):
        open_source("fashion-mnist", data_dir=tmp_path)


# -- image folder -------------------------------------------------------------------------
def _write_folder(root, images, labels):
    for k, (img, y) in enumerate(zip(images, labels)):
        folder = root / CLASS_NAMES[y].replace("/", "-")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / f"{k:03d}.png")


def test_imagefolder_on_real_pngs(tmp_path, fm_pick):
    images, labels = fm_pick
    _write_folder(tmp_path / "train", images, labels)
    src = open_source(f"imagefolder:{tmp_path}", "train")
    # Classes sorted by folder name; files sorted inside each class.
    assert src.meta.class_names == ("Dress", "Sneaker", "T-shirt-top")
    assert src.meta.image_shape == (1, 28, 28) and len(src) == 9
    assert np.array_equal(src.conditions(), [0, 0, 0, 1, 1, 1, 2, 2, 2])
    img, cond = src[0]  # file 003.png, the first Dress
    assert cond == 0 and torch.equal(img[0], uint8_to_unit(images[3]))
    img, cond = src[8]  # file 002.png, the last T-shirt/top
    assert cond == 2 and torch.equal(img[0], uint8_to_unit(images[2]))
    resized = open_source(f"imagefolder:{tmp_path}", "train", image_size=16)
    assert resized[4][0].shape == (1, 16, 16)
    loader = DataLoader(src, batch_size=4)
    xb, yb = next(iter(loader))
    assert xb.shape == (4, 1, 28, 28) and yb.tolist() == [0, 0, 0, 1]


def test_imagefolder_errors_name_the_file(tmp_path, fm_pick):
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(UserError, match="is empty"):
        open_source(f"imagefolder:{tmp_path / 'empty'}")
    images, labels = fm_pick
    _write_folder(tmp_path / "bad", images[:2], labels[:2])
    broken = tmp_path / "bad" / "T-shirt-top" / "zz.png"
    broken.write_bytes(b"not a png at all")
    src = open_source(f"imagefolder:{tmp_path / 'bad'}")
    with pytest.raises(UserError, match=f"cannot decode image {broken}"):
        src[2]
    with pytest.raises(UserError, match=f"cannot decode image {broken}"):
        src.verify_images()


# -- caption files ------------------------------------------------------------------------
def _digit_caption_records(folder, n=12):
    d = load_digits()
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    recs = []
    for i in range(n):
        name = f"img/{i:03d}.png"
        (folder / "img").mkdir(parents=True, exist_ok=True)
        Image.fromarray(_digit_uint8(d.images[i])).save(folder / name)
        recs.append({"image": name, "caption": f"a small white handwritten {words[d.target[i]]}"})
    return recs, d


def test_captions_jsonl_and_csv(tmp_path):
    recs, d = _digit_caption_records(tmp_path)
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    lines = ["image,caption"] + [f'{r["image"]},"{r["caption"]}, ok"' for r in recs]
    (tmp_path / "c.csv").write_text("\n".join(lines) + "\n")
    js = open_source(f"captions:{tmp_path / 'c.jsonl'}")
    cs = open_source(f"captions:{tmp_path / 'c.csv'}")
    assert js.meta.condition_kind == "caption" and js.meta.image_shape == (1, 8, 8)
    assert js.conditions() == [r["caption"] for r in recs]
    assert cs.conditions() == [r["caption"] + ", ok" for r in recs]
    img, cap = js[5]
    assert cap == recs[5]["caption"]
    assert torch.equal(img[0], uint8_to_unit(_digit_uint8(d.images[5])))


@pytest.mark.parametrize(
    "content, suffix, message",
    [
        ('{"image": "img/000.png"}\n', "jsonl", r"c.jsonl:1: missing or empty field 'caption'"),
        ('{"image": "img/000.png", "caption": "x"}\n[1]\n', "jsonl", r"c.jsonl:2: expected"),
        ('{"image": "nope.png", "caption": "x"}\n', "jsonl", r"image file not found: .*nope.png"),
        ("img,caption\nimg/000.png,x\n", "csv", r"lacks the required field\(s\) image"),
        ("", "jsonl", "is empty"),
    ],
)
def test_caption_file_errors(tmp_path, content, suffix, message):
    _digit_caption_records(tmp_path, n=1)
    path = tmp_path / f"c.{suffix}"
    path.write_text(content)
    with pytest.raises(UserError, match=message):
        open_source(f"captions:{path}")


# -- WebDataset shards --------------------------------------------------------------------
def _write_shards(folder, images, conds, per_shard, ext="cls"):
    folder.mkdir(parents=True, exist_ok=True)
    n_shards = -(-len(images) // per_shard)
    for s in range(n_shards):
        with tarfile.open(folder / f"shard-{s:03d}.tar", "w") as tar:
            for i in range(s * per_shard, min(len(images), (s + 1) * per_shard)):
                for suffix, data in (("png", _png_bytes(images[i])), (ext, str(conds[i]).encode())):
                    info = tarfile.TarInfo(f"sample{i:05d}.{suffix}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return n_shards


def test_brace_expansion():
    assert expand_braces("s-{000..002}.tar") == ["s-000.tar", "s-001.tar", "s-002.tar"]
    assert expand_braces("{a,b}/x{8..10}") == ["a/x8", "a/x9", "a/x10", "b/x8", "b/x9", "b/x10"]


def test_webdataset_class_shards(tmp_path, fmnist):
    images, labels = fmnist
    images, labels = images[:50], labels[:50]
    n_shards = _write_shards(tmp_path / "wds", images, labels, per_shard=12)
    pattern = f"{tmp_path}/wds/shard-{{000..{n_shards - 1:03d}}}.tar"
    src = open_source(f"wds:{pattern}")
    assert src.meta.num_samples == 50 and src.meta.condition_kind == "class"
    assert src.meta.image_shape == (1, 28, 28) and len(src.meta.class_names) == labels.max() + 1
    assert np.array_equal(src.conditions(), labels)
    items = list(src)
    assert len(items) == 50 and [c for _, c in items] == labels.tolist()
    assert torch.equal(items[17][0][0], uint8_to_unit(images[17]))
    # Two DataLoader workers: every sample exactly once (shard-level split) ...
    seen = [int(y) for _, y in DataLoader(src, batch_size=None, num_workers=2)]
    assert sorted(seen) == sorted(labels.tolist())
    idx = sorted(i for i, _, _ in src.iter_indexed())
    assert idx == list(range(50))
    # ... and with more consumers than shards, a sample-level split.
    one = open_source(f"wds:{tmp_path}/wds/shard-000.tar")
    got = sorted(i for batch in DataLoader(_Indexed(one), batch_size=None, num_workers=2)
                 for i in [int(batch)])  # fmt: skip
    assert got == list(range(12))
    (tmp_path / "wds" / "classes.txt").write_text("\n".join(CLASS_NAMES) + "\n")
    named = open_source(f"wds:{tmp_path}/wds/shard-*.tar")
    assert named.meta.class_names == CLASS_NAMES


class _Indexed(torch.utils.data.IterableDataset):
    def __init__(self, src):
        self.src = src

    def __iter__(self):
        for i, _, _ in self.src.iter_indexed():
            yield i


def test_webdataset_captions_and_corrupted_stream_view(tmp_path, fmnist):
    images, labels = fmnist
    caps = [f"a photo of a {CLASS_NAMES[y].lower()} number {i}" for i, y in enumerate(labels[:20])]
    _write_shards(tmp_path / "w", images[:20], caps, per_shard=7, ext="txt")
    src = open_source(f"wds:{tmp_path}/w/shard-{{000..002}}.tar", image_size=16)
    assert src.meta.condition_kind == "caption" and src.meta.image_shape == (1, 16, 16)
    assert src.conditions() == caps
    m = corrupt(src, "swap", 0.5, seed=3)
    view = CorruptedView(src, m)
    got = [c for _, c in view]
    assert sum(a != b for a, b in zip(got, caps)) == 10
    assert got == m.apply(caps)


def test_webdataset_bad_members_are_named(tmp_path, fmnist):
    images, labels = fmnist
    _write_shards(tmp_path / "w", images[:3], ["x", "1", "2"], per_shard=3)
    with pytest.raises(UserError, match=r"shard-000.tar: sample 'sample00000' has a non-integer"):
        open_source(f"wds:{tmp_path}/w/shard-000.tar").conditions()
    (tmp_path / "w" / "shard-009.tar").write_bytes(b"garbage" * 100)
    with pytest.raises(UserError, match="cannot read WebDataset shard .*shard-009.tar"):
        _ = open_source(f"wds:{tmp_path}/w/shard-009.tar").meta


def test_random_hflip_is_seeded():
    x = torch.arange(2 * 1 * 2 * 3, dtype=torch.float32).reshape(2, 1, 2, 3)
    a = random_hflip(x, torch.Generator().manual_seed(0), p=1.0)
    assert torch.equal(a, x.flip(-1))
    assert torch.equal(random_hflip(x, torch.Generator().manual_seed(0), p=0.0), x)
