"""``scenes-clip``: a small CLIP-style dual encoder for ``scenes`` (Radford et al. 2021,
"Learning Transferable Visual Models From Natural Language Supervision", section 2.3:
symmetric InfoNCE over a batch, learnable temperature initialised at 0.07 and clipped so
the logit scale stays <= 100).

No CLIP weights can be had offline, so the text-image measures of the paper (CLIP score;
top-1% RMD, average top-5 L2 and memorization in CLIP space, paper section 5) get this
network as their embedded default. Image tower: a CNN on 32 x 32 RGB (64 x 64 samples
are 2 x 2 average-pooled); text tower: the text models' own ``bert-embed`` encoder
(``conditioning.text``: the same BERT uncased WordPiece tokenizer and ``tokenize``, a
two-layer transformer of width 64), masked mean pooling. Trained once on clean renders (``data.scenes.dataset.eval_train_scenes``:
Fashion-MNIST train items, every (class, colour) pair), frozen and cached (safetensors +
JSON card with its R-precision on real ``test`` / ``test-novel`` pairs) in the cache
directory.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from condnoise.errors import UserError
from condnoise.evaluation.netcache import fit_one_cycle, load_network, save_network

NAME = "scenes-clip"
WEIGHTS_NAME = f"{NAME}.safetensors"
CARD_NAME = f"{NAME}.json"
EMBED_DIM = 128
MAX_TOKENS = 48  # scenes captions need at most 41 WordPiece tokens with [CLS] / [SEP]
TEXT_WIDTH, TEXT_LAYERS, TEXT_HEADS = 64, 2, 4
MIN_R_PRECISION = 0.9  # training fails below this R-precision on real test pairs
MAX_LOGIT_SCALE = 100.0
NUM_TRAIN, EPOCHS = 40_000, 2  # defaults of train_scenes_clip (see the card for its cost)


class ImageTower(nn.Module):
    """Conv 5x5/48 -> 3x3/96 -> 3x3/128, each stride 2 (ReLU) -> 256 -> EMBED_DIM (about
    6M multiply-adds per image)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 48, 5, stride=2, padding=2), nn.ReLU(),
            nn.Conv2d(48, 96, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(96, 128, 3, stride=2, padding=1), nn.ReLU(),
            nn.Flatten(), nn.Linear(128 * 4 * 4, 256), nn.ReLU(), nn.Linear(256, EMBED_DIM),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, 3, 32, 32] in [-1, 1]
        return self.net(x)


class TextTower(nn.Module):
    """The text models' ``bert-embed`` encoder (``conditioning.text.BertEmbedder``: BERT
    WordPiece tokens, trainable token + position embeddings, a pre-norm transformer), its
    masked mean (``CondEmbedding.pooled``) projected to EMBED_DIM."""

    def __init__(self) -> None:
        super().__init__()
        from condnoise.conditioning.text import BertEmbedder, bert_tokenizer

        self.encoder = BertEmbedder(bert_tokenizer(None, MAX_TOKENS), TEXT_WIDTH,
                                    depth=TEXT_LAYERS, heads=TEXT_HEADS)  # fmt: skip
        self.proj = nn.Linear(TEXT_WIDTH, EMBED_DIM)

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        """Token ids int64 ``[B, MAX_TOKENS]`` (the text models' tokenizer; over-long
        captions truncated with a counted warning)."""
        return self.encoder.tokenize(captions)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.proj(self.encoder.embed(ids).pooled)


class ScenesCLIP(nn.Module):
    """The dual encoder; ``encode_*`` return L2-normalised embeddings."""

    def __init__(self) -> None:
        super().__init__()
        self.image = ImageTower()
        self.text = TextTower()
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.image(x), dim=-1)

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.text(ids), dim=-1)

    def loss(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Symmetric InfoNCE of a batch of matching (image, caption) pairs."""
        logits = self.logit_scale.exp() * self.encode_image(x) @ self.encode_text(ids).T
        target = torch.arange(len(x))
        ce = nn.functional.cross_entropy
        return (ce(logits, target) + ce(logits.T, target)) / 2


# -- embedding helpers ----------------------------------------------------------------------
def image_input(images: np.ndarray) -> torch.Tensor:
    """uint8 ``[N, 32 or 64, same, 3]`` -> float ``[N, 3, 32, 32]`` in [-1, 1]: the
    scenes-recognizer's input (``recognizer.to_input``)."""
    from condnoise.evaluation.recognizer import to_input

    return to_input(images, NAME)


@torch.no_grad()
def embed_images(model: ScenesCLIP, images: np.ndarray, batch_size: int = 1000) -> np.ndarray:
    """L2-normalised image embeddings float32 ``[N, EMBED_DIM]`` of uint8 images."""
    model.eval()
    out = [model.encode_image(image_input(images[s:s + batch_size]))
           for s in range(0, len(images), batch_size)]  # fmt: skip
    return torch.cat(out).numpy().astype(np.float32)


@torch.no_grad()
def embed_texts(model: ScenesCLIP, captions: list[str], batch_size: int = 1000) -> np.ndarray:
    """L2-normalised caption embeddings float32 ``[N, EMBED_DIM]``."""
    model.eval()
    out = [model.encode_text(model.text.tokenize(captions[s:s + batch_size]))
           for s in range(0, len(captions), batch_size)]  # fmt: skip
    return torch.cat(out).numpy().astype(np.float32)


# -- training and the cache -----------------------------------------------------------------
def real_pair_scores(model: ScenesCLIP, *, data_dir: str | None = None, seed: int = 0,
                     num: int | None = None) -> dict[str, dict[str, float]]:  # fmt: skip
    """Per split (``test``, ``test-novel``; ``num``: its first scenes, default all): R-precision
    of the real pairs (99 distractors from those captions, ``text_metrics.distractor_indices``
    with ``seed``), CLIP score of the real pairs and of shuffled pairs (each image with the
    next scene's caption)."""
    from condnoise.data.scenes import Scenes
    from condnoise.evaluation import text_metrics as T

    out = {}
    for split in ("test", "test-novel"):
        ds = Scenes(split, data_dir=data_dir, num_samples=num)  # all: cached
        caps = ds.conditions()[:num]
        img, txt = embed_images(model, ds.images_uint8()[:num]), embed_texts(model, caps)
        out[split] = {
            "r_precision": T.r_precision(img, txt, txt, T.distractor_indices(caps, caps, seed=seed)),
            "clip_score": T.clip_score(img, txt),
            "clip_score_shuffled": T.clip_score(img, np.roll(txt, 1, axis=0)),
        }  # fmt: skip
    return out


def _optimizer(model: ScenesCLIP, lr: float) -> torch.optim.Optimizer:
    """AdamW, weight decay 0.1 on every matrix and kernel (embedding tables included), none
    on biases, norms and the logit scale."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                              {"params": rest, "weight_decay": 0.0}], lr=lr)  # fmt: skip


def _fit(model: ScenesCLIP, images: np.ndarray, captions: list[str], *, epochs: int,
         batch_size: int, lr: float, seed: int, progress: bool) -> None:
    """Contrastive training, one-cycle schedule (deterministic data order); the logit
    scale clamped at MAX_LOGIT_SCALE after every step (CLIP, Radford et al. 2021)."""
    x = torch.from_numpy(np.array(images.transpose(0, 3, 1, 2)))  # uint8, writable
    ids = model.text.tokenize(captions)

    def clamp() -> None:
        with torch.no_grad():
            model.logit_scale.clamp_(max=math.log(MAX_LOGIT_SCALE))

    fit_one_cycle(model, _optimizer(model, lr),
                  lambda idx: model.loss(x[idx].float() / 127.5 - 1.0, ids[idx]), len(x),
                  epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, desc=NAME,
                  progress=progress, pct_start=0.1, after_step=clamp)  # fmt: skip


def train_scenes_clip(out_dir: str | Path | None = None, *, num_train: int = NUM_TRAIN,
                      epochs: int = EPOCHS, seed: int = 0, batch_size: int = 256,
                      lr: float = 2e-3, data_dir: str | None = None, progress: bool = True,
                      check: bool = True, eval_num: int | None = None) -> dict:  # fmt: skip
    """Train on ``num_train`` all-pairs renders with their captions, score the real pairs
    (the first ``eval_num`` of each split, default all), save weights + card; ``check``:
    fail (UserError) below MIN_R_PRECISION on real test pairs. ``train_cpu_seconds`` (``time.process_time``) covers rendering and fitting."""
    from condnoise.data.scenes.dataset import eval_train_scenes

    start = time.process_time()
    data = eval_train_scenes(num_train, seed=seed, data_dir=data_dir)
    torch.manual_seed(seed)
    model = ScenesCLIP()
    _fit(model, data.images, data.captions, epochs=epochs, batch_size=batch_size, lr=lr,
         seed=seed, progress=progress)  # fmt: skip
    train_cpu = time.process_time() - start
    scores = real_pair_scores(model, data_dir=data_dir, seed=seed, num=eval_num)
    if check and scores["test"]["r_precision"] < MIN_R_PRECISION:
        raise UserError(f"{NAME} reached only {scores['test']['r_precision']:.3f} R-precision on "
                        f"real test pairs (< {MIN_R_PRECISION}); train longer with --epochs")
    return save_network(model, out_dir, NAME, {
        "real_pairs": scores, "num_train": num_train, "epochs": epochs, "seed": seed,
        "batch_size": batch_size, "lr": lr, "train_cpu_seconds": round(train_cpu, 1),
        "logit_scale": model.logit_scale.exp().item(), "embed_dim": EMBED_DIM,
        "eval_num": eval_num,
        "training_data": "scenes/eval-train: Fashion-MNIST train items, every (class, colour) pair",
    })  # fmt: skip


def load_scenes_clip(folder: str | Path | None = None, *, train_if_missing: bool = True
                     ) -> tuple[ScenesCLIP, dict]:
    """Load the cached scenes-clip (training it first, with a message, if missing)."""
    return load_network(ScenesCLIP, folder, NAME, train_scenes_clip,  # type: ignore[return-value]
                        train_if_missing=train_if_missing, cost="a few CPU-minutes")
