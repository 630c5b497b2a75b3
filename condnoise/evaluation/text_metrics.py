"""Text-image alignment metrics on embeddings of a dual encoder (scenes-clip or a real CLIP).

- CLIP score (Hessel et al. 2021, "CLIPScore", eq. 1 with w = 100; paper section 5):
  ``max(100 cos(E_I, E_C), 0)`` per (image, caption) pair, averaged. torchmetrics'
  ``CLIPScore`` clips the *mean* instead of each pair; the two agree whenever no cosine
  is negative (and exactly for one pair).
- R-precision (Xu et al. 2018, AttnGAN, section 4.1, with R = 1): the share of images
  whose own caption is ranked first, by cosine, among itself and 99 distractor captions.
  Distractor j of sample i is caption ``floor(u * M)`` of the pool of M captions (the
  reference split's), ``u = condnoise.rng.uniform(seed, "r-precision/distractor", i, j)``;
  a draw whose text equals the sample's own caption is drawn again with one more counter
  (``..., i, j, attempt``). Drawn with replacement; a tie counts as a miss.
"""

from __future__ import annotations

import numpy as np
import torch

from condnoise import rng
from condnoise.errors import UserError

DISTRACTORS = 99
DISTRACTOR_STREAM = "r-precision/distractor"


def _unit(x: np.ndarray, what: str) -> np.ndarray:
    x = np.asarray(x, np.float64)
    if x.ndim < 2 or not np.isfinite(x).all():
        raise UserError(f"{what}: expected finite embeddings [..., D], got shape {x.shape}")
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norm, 1e-12)


def _paired(images: np.ndarray, texts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = _unit(images, "image embeddings"), _unit(texts, "text embeddings")
    if a.shape != b.shape:
        raise UserError(f"image embeddings {a.shape} and text embeddings {b.shape} do not pair")
    return a, b


def clip_scores(image_emb: np.ndarray, text_emb: np.ndarray) -> np.ndarray:
    """``100 cos`` of each (image, caption) pair, float64 [N] (not clipped)."""
    a, b = _paired(image_emb, text_emb)
    return 100.0 * (a * b).sum(-1)


def clip_score(image_emb: np.ndarray, text_emb: np.ndarray) -> float:
    """Mean over pairs of ``max(100 cos, 0)``."""
    return float(np.maximum(clip_scores(image_emb, text_emb), 0.0).mean())


def distractor_indices(captions: list[str], pool: list[str], *, seed: int = 0,
                       k: int = DISTRACTORS) -> np.ndarray:  # fmt: skip
    """int64 [N, k]: for sample i, k indices into ``pool`` whose text differs from
    ``captions[i]`` (the deterministic draw of the module docstring)."""
    if len(set(pool)) < 2:
        raise UserError(f"R-precision needs a pool of distinct captions, got {len(set(pool))}")
    n, m = len(captions), len(pool)
    rows = torch.arange(n, dtype=torch.int64)[:, None]
    cols = torch.arange(k, dtype=torch.int64)[None, :]
    idx = (rng.uniform(seed, DISTRACTOR_STREAM, rows, cols) * m).long().clamp_(max=m - 1).numpy()
    pool_arr = np.asarray(pool, dtype=object)
    true = np.asarray(captions, dtype=object)[:, None]
    attempt = 0
    while (same := pool_arr[idx] == true).any():
        attempt += 1
        i, j = np.nonzero(same)
        u = rng.uniform(seed, DISTRACTOR_STREAM, torch.from_numpy(i), torch.from_numpy(j), attempt)
        idx[i, j] = np.minimum((u.numpy() * m).astype(np.int64), m - 1)
    return idx


def r_precision_hits(image_emb: np.ndarray, text_emb: np.ndarray,
                     distractor_emb: np.ndarray) -> np.ndarray:  # fmt: skip
    """bool [N]: image i's cosine to its caption ``text_emb[i]`` beats every distractor
    ``distractor_emb[i, j]`` ([N, k, D])."""
    a, b = _paired(image_emb, text_emb)
    d = _unit(distractor_emb, "distractor embeddings")
    if d.ndim != 3 or d.shape[0] != a.shape[0] or d.shape[2] != a.shape[1]:
        raise UserError(f"distractor embeddings {d.shape} do not match images {a.shape}")
    true = (a * b).sum(-1)
    other = np.einsum("nd,nkd->nk", a, d).max(1)
    return true > other


def r_precision(image_emb: np.ndarray, text_emb: np.ndarray, pool_emb: np.ndarray,
                indices: np.ndarray) -> float:  # fmt: skip
    """R-precision with distractors ``pool_emb[indices]`` (``indices`` [N, k] from
    :func:`distractor_indices`)."""
    return float(r_precision_hits(image_emb, text_emb, np.asarray(pool_emb)[indices]).mean())
