"""The ``scenes-recognizer``: a multi-head attribute CNN that reads a ``scenes`` image back
into its record, for the *caption accuracy* of text-to-image samples (issue 14's
small-scale stand-in for the paper's CLIP-based alignment measures, paper section 5).

Heads: per position slot (left, right, top, bottom, centre, the fixed boxes of
``data.scenes.vocab``): present / class / colour / size; the background; the item count.
It is trained once on clean renders from Fashion-MNIST *train* items with every
(class, colour) pair allowed (``data.scenes.dataset.eval_train_scenes``): an evaluation
tool must recognise the held-out pairs of ``test-novel``, which a network trained on the
``train`` split alone ties to the colours it saw. Weights are stored as safetensors with a
JSON card (its own accuracies on real ``test`` / ``test-novel`` renders: the ceiling; on
random images: chance) in the cache directory, like the fmnist-classifier.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from condnoise.errors import UserError
from condnoise.evaluation.netcache import fit_one_cycle, load_network, save_network

NAME = "scenes-recognizer"
WEIGHTS_NAME = f"{NAME}.safetensors"
CARD_NAME = f"{NAME}.json"
MIN_ALL = 0.95  # training fails below this all-attributes accuracy on real test renders
SIZE = 32  # native input side; 64 x 64 samples are 2 x 2 average-pooled first
NUM_POSITIONS, NUM_CLASSES, NUM_COLOURS, NUM_SIZES, NUM_BACKGROUNDS, MAX_COUNT = 5, 10, 8, 2, 4, 3
SLOT_HEADS = {"present": 2, "class": NUM_CLASSES, "colour": NUM_COLOURS, "size": NUM_SIZES}
SCENE_HEADS = {"background": NUM_BACKGROUNDS, "count": MAX_COUNT}
ATTRIBUTES = ("all", "class", "colour", "size", "position", "background", "count")
NUM_TRAIN, EPOCHS = 60_000, 3  # defaults of train_recognizer (see the card for its cost)


ITEM_SIDE = 10  # every box crop is read at the small item's side (large boxes resized)
ITEM_DIM = 128


def _boxes() -> list[tuple[int, int, int]]:
    """(y0, x0, side) of the small and the large box of every position, in POSITIONS order."""
    from condnoise.data.scenes.vocab import POSITIONS, SIZES, box

    return [box(p, s, SIZE) for p in POSITIONS for s in SIZES]


class SceneRecognizer(nn.Module):
    """Reads the fixed layout boxes with one shared item CNN (paper-independent design: the
    scenes rules put every item in one of 10 known boxes, ``data.scenes.vocab.CORNER``).

    Per position, the small box (10 px) and the large box (16 px, resized to 10 px) go
    through conv 3x3/32 -> 3x3/64 stride 2 (ReLU) -> 128-d; both vectors and the position's
    one-hot feed the slot heads (present / class / colour / size). The background and count
    heads read the five slot vectors and a 4 x 4 average of the image. Input [B, 3, 32, 32]
    in [-1, 1]; about 7.5M multiply-adds per image."""

    def __init__(self) -> None:
        super().__init__()
        self.item = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
            nn.Flatten(), nn.Linear(64 * 5 * 5, ITEM_DIM), nn.ReLU(),
        )  # fmt: skip
        self.slot = nn.Sequential(
            nn.Linear(2 * ITEM_DIM + NUM_POSITIONS, ITEM_DIM), nn.ReLU(),
            nn.Linear(ITEM_DIM, sum(SLOT_HEADS.values())),
        )  # fmt: skip
        self.scene = nn.Linear(NUM_POSITIONS * ITEM_DIM + 3 * 16, sum(SCENE_HEADS.values()))
        self.register_buffer("onehot", torch.eye(NUM_POSITIONS), persistent=False)
        self.boxes = _boxes()

    def crops(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, 32, 32] -> the 10 box crops at 10 x 10, [B, 10, 3, 10, 10]."""
        out = []
        for y, x0, side in self.boxes:
            c = x[:, :, y:y + side, x0:x0 + side]
            if side != ITEM_SIDE:
                c = nn.functional.interpolate(c, size=(ITEM_SIDE, ITEM_SIDE), mode="bilinear",
                                              align_corners=False, antialias=True)  # fmt: skip
            out.append(c)
        return torch.stack(out, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits: slot heads ``[B, 5, K]``, scene heads ``[B, K]``."""
        b = len(x)
        f = self.item(self.crops(x).reshape(-1, 3, ITEM_SIDE, ITEM_SIDE))
        f = f.reshape(b, NUM_POSITIONS, 2 * ITEM_DIM)
        slots = self.slot(torch.cat([f, self.onehot.expand(b, -1, -1)], -1))
        out, i = {}, 0
        for name, k in SLOT_HEADS.items():
            out[name] = slots[..., i:i + k]
            i += k
        pooled = nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)
        scene = self.scene(torch.cat([f[..., :ITEM_DIM].flatten(1), pooled], 1))
        i = 0
        for name, k in SCENE_HEADS.items():
            out[name] = scene[:, i:i + k]
            i += k
        return out


# -- targets ------------------------------------------------------------------------------
def layout_targets(layout) -> dict[str, np.ndarray]:
    """Targets of a ``data.scenes.render.Layout``: ``present, class, colour, size`` int64
    ``[N, 5]`` per position (-1 where no item), ``background`` and ``count`` (0-based) [N]."""
    n = len(layout)
    out = {k: np.full((n, NUM_POSITIONS), -1, np.int64) for k in SLOT_HEADS}
    out["present"][:] = 0
    for j in range(layout.position.shape[1]):
        rows = np.flatnonzero(layout.position[:, j] >= 0)
        pos = layout.position[rows, j].astype(np.int64)
        out["present"][rows, pos] = 1
        for key, arr in (("class", layout.cls), ("colour", layout.colour), ("size", layout.size)):
            out[key][rows, pos] = arr[rows, j]
    out["background"] = layout.background.astype(np.int64)
    out["count"] = out["present"].sum(1) - 1
    return out


def record_targets(records: list[dict]) -> dict[str, np.ndarray]:
    """The same targets from scenes records (``parse_caption`` / ``Scenes.records()``)."""
    from condnoise.data.scenes.vocab import BACKGROUNDS, COLOURS, POSITIONS, SIZES

    n = len(records)
    out = {k: np.full((n, NUM_POSITIONS), -1, np.int64) for k in SLOT_HEADS}
    out["present"][:] = 0
    for i, rec in enumerate(records):
        for it in rec["items"]:
            p = POSITIONS.index(it["position"])
            out["present"][i, p] = 1
            out["class"][i, p] = it["class"]
            out["colour"][i, p] = COLOURS.index(it["colour"])
            out["size"][i, p] = SIZES.index(it["size"])
    out["background"] = np.array([BACKGROUNDS.index(r["background"]) for r in records], np.int64)
    out["count"] = out["present"].sum(1) - 1
    return out


def _loss(logits: dict[str, torch.Tensor], t: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of cross-entropies; slot attributes only where an item is present."""
    ce = nn.functional.cross_entropy
    loss = ce(logits["present"].reshape(-1, 2), t["present"].reshape(-1))
    for key in ("class", "colour", "size"):
        loss = loss + ce(logits[key].reshape(-1, SLOT_HEADS[key]), t[key].reshape(-1),
                         ignore_index=-1)  # fmt: skip
    return loss + ce(logits["background"], t["background"]) + ce(logits["count"], t["count"])


# -- input --------------------------------------------------------------------------------
def to_input(images: np.ndarray, what: str = NAME) -> torch.Tensor:
    """uint8 ``[N, H, W, 3]`` (H = W = 32, or 64: 2 x 2 average-pooled) -> float [N,3,32,32]
    in [-1, 1] (the input of both scenes networks; ``what`` names the network in errors)."""
    if images.ndim != 4 or images.shape[-1] != 3 or images.shape[1] != images.shape[2] \
            or images.shape[1] not in (SIZE, 2 * SIZE):
        raise UserError(f"{what}: needs RGB scenes images of 32 x 32 or 64 x 64, got shape "
                        f"{tuple(images.shape)}")
    x = torch.from_numpy(np.array(images, dtype=np.uint8)).permute(0, 3, 1, 2).float()
    if x.shape[-1] != SIZE:
        x = nn.functional.avg_pool2d(x, 2)
    return x / 127.5 - 1.0


@torch.no_grad()
def predict(model: SceneRecognizer, images: np.ndarray, batch_size: int = 500
            ) -> dict[str, np.ndarray]:
    """Predicted targets (argmax of every head) of uint8 images, same layout as the targets
    (slot attributes -1 where the predicted slot is empty)."""
    model.eval()
    parts: dict[str, list[np.ndarray]] = {}
    for s in range(0, len(images), batch_size):
        for key, v in model(to_input(images[s:s + batch_size])).items():
            parts.setdefault(key, []).append(v.argmax(-1).numpy())
    out = {k: np.concatenate(v).astype(np.int64) for k, v in parts.items()}
    for key in ("class", "colour", "size"):
        out[key][out["present"] == 0] = -1
    return out


def attribute_accuracy(pred: dict[str, np.ndarray], target: dict[str, np.ndarray]
                       ) -> dict[str, float]:
    """Accuracy of predicted against wanted targets (both as from :func:`record_targets`).

    Per wanted item: ``position`` (an item is found at its position), ``class`` /
    ``colour`` / ``size`` (found there with that attribute; a missing item counts wrong).
    Per image: ``background``, ``count`` (the count head), ``all`` (every slot's presence
    and attributes, the background and the count right: the whole record read back)."""
    want = target["present"] == 1
    out = {"position": float((pred["present"][want] == 1).mean())}
    for key in ("class", "colour", "size"):
        out[key] = float((pred[key][want] == target[key][want]).mean())
    out["background"] = float((pred["background"] == target["background"]).mean())
    out["count"] = float((pred["count"] == target["count"]).mean())
    ok = (pred["background"] == target["background"]) & (pred["count"] == target["count"])
    ok &= (pred["present"] == target["present"]).all(1)
    for key in ("class", "colour", "size"):
        ok &= ((pred[key] == target[key]) | ~want).all(1)
    out["all"] = float(ok.mean())
    return {k: out[k] for k in ATTRIBUTES}


# -- training and the cache ---------------------------------------------------------------
def ceiling(model: SceneRecognizer, *, data_dir: str | None = None, seed: int = 0,
            num: int | None = None) -> dict[str, dict[str, float]]:  # fmt: skip
    """Accuracies on the real ``test`` and ``test-novel`` renders (the ceiling of caption
    accuracy), on uniform random images scored against the ``test`` records (chance) and on
    ``test`` renders scored against the next scene's record (shuffled pairs); ``num``: only
    the first scenes of each split (default: all 10,000)."""
    from condnoise.data.scenes import Scenes

    out = {}
    for split in ("test", "test-novel"):
        ds = Scenes(split, data_dir=data_dir, num_samples=num)  # all: cached
        target = {k: v[:num] for k, v in layout_targets(ds.layout).items()}
        pred = predict(model, ds.images_uint8()[:num])
        out[split] = attribute_accuracy(pred, target)
        if split == "test":
            shifted = {k: np.roll(v, 1, axis=0) for k, v in target.items()}
            out["test-shuffled"] = attribute_accuracy(pred, shifted)
            noise = np.random.default_rng(seed).integers(0, 256, (len(pred["count"]), SIZE, SIZE, 3),
                                                         dtype=np.uint8)  # fmt: skip
            out["random"] = attribute_accuracy(predict(model, noise), target)
    return out


def _fit(model: SceneRecognizer, images: np.ndarray, targets: dict[str, np.ndarray], *,
         epochs: int, batch_size: int, lr: float, seed: int, progress: bool) -> None:
    """Adam with a one-cycle schedule (deterministic data order)."""
    x = torch.from_numpy(np.array(images.transpose(0, 3, 1, 2)))  # uint8, writable
    t = {k: torch.from_numpy(v) for k, v in targets.items()}
    fit_one_cycle(model, torch.optim.Adam(model.parameters(), lr=lr),
                  lambda idx: _loss(model(x[idx].float() / 127.5 - 1.0), {k: v[idx] for k, v in t.items()}),
                  len(x), epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, desc=NAME,
                  progress=progress)  # fmt: skip


def train_recognizer(out_dir: str | Path | None = None, *, num_train: int = NUM_TRAIN,
                     epochs: int = EPOCHS, seed: int = 0, batch_size: int = 128,
                     lr: float = 3e-3, data_dir: str | None = None, progress: bool = True,
                     check: bool = True, eval_num: int | None = None) -> dict:  # fmt: skip
    """Train on ``num_train`` all-pairs renders, measure the ceiling (on the first
    ``eval_num`` scenes of each split, default all), save weights + card; ``check``: fail
    (UserError) below MIN_ALL all-attributes accuracy on real test renders.
    The card's ``train_cpu_seconds`` (``time.process_time``, all threads) covers rendering
    the training scenes and fitting."""
    from condnoise.data.scenes.dataset import eval_train_scenes

    start = time.process_time()
    data = eval_train_scenes(num_train, seed=seed, data_dir=data_dir)
    torch.manual_seed(seed)
    model = SceneRecognizer()
    _fit(model, data.images, layout_targets(data.layout), epochs=epochs, batch_size=batch_size,
         lr=lr, seed=seed, progress=progress)  # fmt: skip
    train_cpu = time.process_time() - start
    acc = ceiling(model, data_dir=data_dir, seed=seed, num=eval_num)
    if check and acc["test"]["all"] < MIN_ALL:
        raise UserError(f"{NAME} reached only {acc['test']['all']:.3f} all-attributes accuracy "
                        f"on real test renders (< {MIN_ALL}); train longer with --epochs")
    return save_network(model, out_dir, NAME, {
        "accuracy": acc, "num_train": num_train, "epochs": epochs, "seed": seed,
        "batch_size": batch_size, "lr": lr, "train_cpu_seconds": round(train_cpu, 1),
        "eval_num": eval_num,
        "training_data": "scenes/eval-train: Fashion-MNIST train items, every (class, colour) pair",
    })  # fmt: skip


def load_recognizer(folder: str | Path | None = None, *, train_if_missing: bool = True
                    ) -> tuple[SceneRecognizer, dict]:
    """Load the cached recognizer (training it first, with a message, if missing)."""
    return load_network(SceneRecognizer, folder, NAME, train_recognizer,  # type: ignore[return-value]
                        train_if_missing=train_if_missing, cost="a few CPU-minutes")
