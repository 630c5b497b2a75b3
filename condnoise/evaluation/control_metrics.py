"""Control fidelity of samples generated from spatial controls (paper Sec. 5, downstream
personalization; ``condnoise evaluate --metrics edge-f1,mask-iou``).

- **Edge F1** (``edge-f1``): the Canny map of each generated image (the control's own
  thresholds) against its input edges, with a tolerance of ``tolerance`` pixels (Chebyshev
  distance, by dilation with a ``(2r+1)^2`` square as in the BSDS boundary benchmark's
  distance tolerance, Martin et al. 2004, without its one-to-one matching): precision =
  generated edge pixels within r of an input edge, recall = input edge pixels within r of
  a generated edge, F1 = 2PR / (P + R) per image (1 when both maps are empty, 0 when one
  is), averaged over the samples.
- **Mask IoU** (``mask-iou``): the foreground of the requested mask (labels > 0) against
  the foreground recovered from the generated image by the mask definition itself
  (:func:`condnoise.data.controls.silhouette`: distance from the background colour above
  the renderer's 0.1 threshold). On Fashion-MNIST silhouettes this is exactly the mask's
  definition; on ``scenes`` it recovers the items' pixels, not their classes (the
  recognizer's condition / caption accuracy checks those). Per image ``|A n B| / |A u B|``
  (1 when both are empty), averaged.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from condnoise import stats
from condnoise.data.controls import canny, silhouette
from condnoise.errors import UserError

CONTROL_METRICS = {"edge-f1": "canny", "mask-iou": "mask"}


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    import cv2

    if r == 0:
        return mask.astype(bool)
    kernel = np.ones((2 * r + 1, 2 * r + 1), np.uint8)
    return cv2.dilate(mask.astype(np.uint8), kernel).astype(bool)


def edge_f1(pred: np.ndarray, target: np.ndarray, tolerance: int = 1) -> np.ndarray:
    """Per-image F1 float64 ``[N]`` of edge maps ``[N, H, W]`` (nonzero = edge) within
    ``tolerance`` pixels (module docstring)."""
    p, t = np.asarray(pred) > 0, np.asarray(target) > 0
    if p.shape != t.shape or p.ndim != 3:
        raise UserError(f"edge F1: edge maps must both be [N, H, W], got {p.shape} and {t.shape}")
    if tolerance < 0:
        raise UserError(f"edge F1 tolerance must be >= 0 pixels, got {tolerance}")
    out = np.empty(len(p))
    for i in range(len(p)):
        np_, nt = p[i].sum(), t[i].sum()
        if np_ == 0 or nt == 0:
            out[i] = float(np_ == nt)
            continue
        precision = (p[i] & _dilate(t[i], tolerance)).sum() / np_
        recall = (t[i] & _dilate(p[i], tolerance)).sum() / nt
        out[i] = 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
    return out


def mask_iou(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Per-image IoU float64 ``[N]`` of foreground masks ``[N, H, W]`` (nonzero = foreground)."""
    p, t = np.asarray(pred) > 0, np.asarray(target) > 0
    if p.shape != t.shape or p.ndim != 3:
        raise UserError(f"mask IoU: masks must both be [N, H, W], got {p.shape} and {t.shape}")
    inter = (p & t).sum(axis=(1, 2))
    union = (p | t).sum(axis=(1, 2))
    return np.where(union == 0, 1.0, inter / np.maximum(union, 1))


def control_scores(metric: str, images: np.ndarray, controls: np.ndarray, settings: dict[str, Any],
                   tolerance: int = 1) -> np.ndarray:  # fmt: skip
    """Per-sample scores of ``metric`` (:data:`CONTROL_METRICS`) for uint8 samples
    ``[N, H, W, C]`` and their native controls ``[N, H, W]`` (``settings``: the sample
    folder's ``meta.json`` ``controls``: kind, Canny thresholds)."""
    kind = settings.get("kind")
    if CONTROL_METRICS.get(metric) != kind:
        raise UserError(f"metric {metric} needs {CONTROL_METRICS.get(metric)} controls; these samples "
                        f"were made with {kind} controls")  # fmt: skip
    if controls.shape != images.shape[:3]:
        raise UserError(f"controls of shape {controls.shape} do not match samples of shape {images.shape}")
    if metric == "edge-f1":
        edges = canny(images, settings.get("low", 100.0), settings.get("high", 200.0))
        return edge_f1(edges, controls, tolerance)
    return mask_iou(silhouette(images), controls)


def summarize(scores: np.ndarray) -> tuple[float, float]:
    """Mean and half-width of the 95% t interval of per-sample scores (:func:`condnoise.stats.t_interval`)."""
    mean, half = stats.t_interval(np.asarray(scores, np.float64))
    return float(mean), float(half)
