"""Do a text model's samples show the attributes their captions ask for? (issue 13 acceptance)

A quick multi-head attribute classifier (a small CNN: per position left / right / top /
bottom / centre, whether an item is there and its class, colour and size; the background)
is trained on real ``scenes`` train renders and checked on real test renders (its ceiling).
It then reads the samples of ``condnoise sample RUN --captions-from test`` (each with its
caption) and reports per-attribute accuracy against the caption's record:

* ``position``: every captioned item's position is occupied, ``layout``: exactly the
  captioned positions are; ``count``: number of occupied positions;
* ``class`` / ``colour`` / ``size``: of each captioned item, at its position;
* ``background``.

Chance is measured, not assumed: the same classifier on the real test renders paired with
a random permutation of the captions. The proper recognizer (cached, all-attributes
accuracy) is ``condnoise evaluate --metrics caption-accuracy`` of the next issue::

    python benchmarks/scenes_attributes.py SAMPLE_DIR [SAMPLE_DIR ...] --out result.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from condnoise.data.scenes import Scenes, parse_caption
from condnoise.data.scenes.vocab import BACKGROUNDS, COLOURS, POSITIONS, SIZES

P = len(POSITIONS)
HEADS = {"occupied": 2, "class": 10, "colour": len(COLOURS), "size": len(SIZES)}


class AttributeNet(nn.Module):
    """32x32 RGB -> per-position logits of every head, plus the background's."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.GELU(), nn.Conv2d(32, 32, 3, padding=1), nn.GELU(),
            nn.MaxPool2d(2), nn.Conv2d(32, 64, 3, padding=1), nn.GELU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1), nn.GELU(), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(64 * 16, 256), nn.GELU(),
        )  # fmt: skip
        self.heads = nn.ModuleDict({k: nn.Linear(256, P * n) for k, n in HEADS.items()})
        self.background = nn.Linear(256, len(BACKGROUNDS))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.body(x)
        out = {k: head(h).view(len(x), P, HEADS[k]) for k, head in self.heads.items()}
        return out | {"background": self.background(h)}


def targets(records: list[dict]) -> dict[str, torch.Tensor]:
    """Per-position targets (-100 where no item) from scenes records."""
    n = len(records)
    t = {k: torch.full((n, P), -100, dtype=torch.long) for k in HEADS}
    t["occupied"].zero_()
    t["background"] = torch.tensor([BACKGROUNDS.index(r["background"]) for r in records])
    for i, r in enumerate(records):
        for it in r["items"]:
            p = POSITIONS.index(it["position"])
            t["occupied"][i, p] = 1
            t["class"][i, p] = it["class"]
            t["colour"][i, p] = COLOURS.index(it["colour"])
            t["size"][i, p] = SIZES.index(it["size"])
    return t


def to_input(images_u8: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images_u8.transpose(0, 3, 1, 2))).float() / 127.5 - 1


def train_classifier(n: int, epochs: int, seed: int = 0) -> AttributeNet:
    data = Scenes("train")
    x, t = to_input(data.images_uint8()[:n]), targets(data.records()[:n])
    torch.manual_seed(seed)
    net = AttributeNet()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3)
    loss_fn = nn.CrossEntropyLoss(ignore_index=-100)
    steps = epochs * (n // 128)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=steps)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, n, (128,), generator=g)
        out = net(x[idx])
        loss = loss_fn(out["background"], t["background"][idx])
        for k, c in HEADS.items():
            loss = loss + loss_fn(out[k].reshape(-1, c), t[k][idx].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return net.eval()


@torch.no_grad()
def accuracies(net: AttributeNet, images_u8: np.ndarray, records: list[dict]) -> dict[str, float]:
    """Per-attribute accuracy of ``images`` against the ``records`` they should show."""
    pred = {k: [] for k in (*HEADS, "background")}
    for s in range(0, len(images_u8), 512):
        out = net(to_input(images_u8[s : s + 512]))
        for k, v in out.items():
            pred[k].append(v.argmax(-1))
    pred = {k: torch.cat(v) for k, v in pred.items()}
    t = targets(records)
    item = t["occupied"] == 1
    out = {
        "position": float(pred["occupied"][item].eq(1).float().mean()),
        "layout": float((pred["occupied"] == t["occupied"]).all(1).float().mean()),
        "count": float((pred["occupied"].sum(1) == t["occupied"].sum(1)).float().mean()),
        "background": float((pred["background"] == t["background"]).float().mean()),
    }
    for k in ("class", "colour", "size"):
        out[k] = float((pred[k][item] == t[k][item]).float().mean())
    return out


def sample_records(folder: Path) -> tuple[np.ndarray, list[dict], str]:
    """A sample folder's images and the records of their captions."""
    with np.load(folder / "samples.npz") as z:
        images, captions = z["images"], [str(c) for c in z["captions"]]
    return images, [parse_caption(c) for c in captions], folder.name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("samples", nargs="*", type=Path, help="sample folders (OUT/s{scale}) with captions")
    ap.add_argument("--train", type=int, default=20000, help="real train renders for the classifier")
    ap.add_argument("--epochs", type=int, default=4, help="classifier epochs")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    ap.add_argument("--classifier", type=Path, default=None,
                    help="weights file: loaded when it exists, else written after training")
    args = ap.parse_args()
    torch.set_num_threads(1)
    start = time.process_time()
    if args.classifier is not None and args.classifier.is_file():
        net = AttributeNet()
        net.load_state_dict(torch.load(args.classifier))
        net.eval()
    else:
        net = train_classifier(args.train, args.epochs)
        if args.classifier is not None:
            torch.save(net.state_dict(), args.classifier)
    test = Scenes("test")
    n = 2000
    real = accuracies(net, test.images_uint8()[:n], test.records()[:n])
    perm = np.random.default_rng(0).permutation(n)
    chance = accuracies(net, test.images_uint8()[:n], [test.records()[i] for i in perm])
    result = {"classifier": {"train_images": args.train, "epochs": args.epochs,
                             "cpu_seconds": round(time.process_time() - start, 1)},
              "real_test_renders": real, "chance_shuffled_captions": chance, "samples": {}}  # fmt: skip
    for folder in args.samples:
        images, records, name = sample_records(folder)
        result["samples"][str(folder)] = {"num": len(images), **accuracies(net, images, records)}
    keys = ["position", "layout", "count", "class", "colour", "size", "background"]
    rows = [("real test renders", real), ("chance (shuffled captions)", chance)]
    rows += [(k, v) for k, v in result["samples"].items()]
    print("| images | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys))
    for name, acc in rows:
        print(f"| {name} | " + " | ".join(f"{acc[k]:.3f}" for k in keys) + " |")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
