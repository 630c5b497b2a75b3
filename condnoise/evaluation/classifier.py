"""The ``fmnist-classifier`` feature network: a small CNN trained on Fashion-MNIST train.

Its 128-d penultimate activations give FID-style distances, its softmax an IS-style
score and the *condition accuracy* used as the fidelity measure of the small-scale
study (paper §5 adapted to Fashion-MNIST). Training is deterministic for a seed
(single process, fixed data order); weights are stored as safetensors with a JSON
card (accuracy, seed, epochs, sha256) in the cache directory.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from condnoise.errors import UserError
from condnoise.evaluation.netcache import fit_one_cycle, load_network, save_network
from condnoise.paths import cache_dir

MIN_ACCURACY = 0.90
FEATURE_DIM = 128
NAME = "fmnist-classifier"
WEIGHTS_NAME = f"{NAME}.safetensors"
CARD_NAME = f"{NAME}.json"


class FMNISTNet(nn.Module):
    """Strided conv 5x5/32 -> conv 3x3/64 (ReLU) -> 128-d features -> 10 logits.

    Input [B, 1, 28, 28] float in [-1, 1]. Strided convolutions instead of pooling keep
    training at about a minute on 2 CPU cores."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 5, stride=2, padding=2), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
            nn.Flatten(), nn.Linear(64 * 7 * 7, FEATURE_DIM), nn.ReLU(),
        )
        self.head = nn.Linear(FEATURE_DIM, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def _to_input(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(images, np.float32)[:, None] / 127.5 - 1.0)


@torch.no_grad()
def evaluate_accuracy(model: FMNISTNet, images: np.ndarray, labels: np.ndarray) -> float:
    model.eval()
    correct = 0
    for s in range(0, len(images), 1000):
        correct += int((model(_to_input(images[s:s + 1000])).argmax(1).numpy()
                        == labels[s:s + 1000]).sum())
    return correct / len(images)


def train_classifier(out_dir: str | Path | None = None, *, epochs: int = 3, seed: int = 0,
                     batch_size: int = 128, lr: float = 3e-3, data_dir: str | None = None,
                     progress: bool = True) -> dict:
    """Train on the train split, check test accuracy >= 90%, save weights + card; return card."""
    from condnoise.data.fashion_mnist import load_fashion_mnist

    out = Path(out_dir) if out_dir else cache_dir()
    x_train, y_train = load_fashion_mnist("train", data_dir)
    x_test, y_test = load_fashion_mnist("test", data_dir)
    torch.manual_seed(seed)
    model = FMNISTNet()
    xt, yt = _to_input(x_train), torch.from_numpy(np.array(y_train))
    start = time.time()
    fit_one_cycle(model, torch.optim.Adam(model.parameters(), lr=lr),
                  lambda idx: nn.functional.cross_entropy(model(xt[idx]), yt[idx]), len(xt),
                  epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, desc=NAME,
                  progress=progress)  # fmt: skip
    acc = evaluate_accuracy(model, x_test, y_test)
    if acc < MIN_ACCURACY:
        raise UserError(f"fmnist-classifier reached only {acc:.3f} test accuracy (< {MIN_ACCURACY});"
                        " train longer with --epochs")
    return save_network(model, out, NAME, {
        "test_accuracy": acc, "epochs": epochs, "seed": seed, "batch_size": batch_size, "lr": lr,
        "train_seconds": round(time.time() - start, 1), "feature_dim": FEATURE_DIM,
    })  # fmt: skip


def load_classifier(folder: str | Path | None = None, *, train_if_missing: bool = True
                    ) -> tuple[FMNISTNet, dict]:
    """Load the cached classifier (training it first, with a message, if missing)."""
    return load_network(FMNISTNet, folder, NAME, train_classifier,  # type: ignore[return-value]
                        train_if_missing=train_if_missing)


def perceptual_network(loss: Any) -> Callable[[], nn.Module] | None:
    """A loader of the classifier an autoencoder's perceptual term uses (``loss.perceptual:
    classifier`` with a positive weight; ``loss.classifier_dir``, null: the cache), or None.
    ``loss`` is an autoencoder config's loss section (``training.autoencoder_config``)."""
    if loss.perceptual != "classifier" or loss.perceptual_weight <= 0:
        return None

    def load() -> nn.Module:
        return load_classifier(loss.classifier_dir)[0]

    return load
