"""Evaluation metrics of paper §5, as plain functions on feature arrays (numpy).

Every function validates its inputs and raises ``UserError`` with a one-line message
(shape mismatch, NaN/inf, too few samples). Covariance-based metrics (FID, sFID, RMD)
need more samples than feature dimensions unless a ``shrinkage`` in (0, 1] is given:
``Sigma <- (1 - s) Sigma + s * trace(Sigma) / d * I`` (:func:`condnoise.stats.shrink_covariance`).
The Gaussian W2^2 of FID and the top-1% mean of RMD are :mod:`condnoise.stats`'.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from condnoise import stats
from condnoise.errors import UserError
from condnoise.evaluation import neighbors
from condnoise.evaluation.entropy import sample_entropy  # noqa: F401  (paper Sec. 5, with code usage)

# --------------------------------------------------------------------------- validation


def check_features(x: np.ndarray, name: str = "features", *, min_rows: int = 1) -> np.ndarray:
    """Return ``x`` as a 2-D finite float array, or raise a UserError naming ``name``."""
    x = np.asarray(x)
    if x.ndim != 2:
        raise UserError(f"{name}: expected a 2-D array [N, D], got shape {tuple(x.shape)}")
    if len(x) < min_rows:
        raise UserError(f"{name}: needs at least {min_rows} samples, got {len(x)}")
    if not np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float64)
    bad = ~np.isfinite(x).all(1)
    if bad.any():
        raise UserError(f"{name}: {int(bad.sum())} rows contain NaN/inf (first: row {int(np.argmax(bad))})")
    return x


def _pair(real: np.ndarray, fake: np.ndarray, min_rows: int = 1) -> tuple[np.ndarray, np.ndarray]:
    real = check_features(real, "real features", min_rows=min_rows)
    fake = check_features(fake, "fake features", min_rows=min_rows)
    if real.shape[1] != fake.shape[1]:
        raise UserError(f"feature dimensions differ: real {real.shape[1]} vs fake {fake.shape[1]}")
    return real, fake


# --------------------------------------------------------------------------- FID / sFID


def gaussian_stats(x: np.ndarray, *, shrinkage: float = 0.0, name: str = "features"
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased, optionally shrunk) covariance in float64."""
    x = check_features(x, name, min_rows=2)
    n, d = x.shape
    if n <= d and shrinkage == 0.0:
        raise UserError(
            f"{name}: {n} samples for {d}-d features give a singular covariance; "
            "use more samples or pass a shrinkage in (0, 1] (--shrinkage)"
        )
    x = x.astype(np.float64, copy=False)
    return x.mean(0), stats.shrink_covariance(np.cov(x, rowvar=False), shrinkage)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
                     ) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2) (Heusel et al.): the Gaussian W2^2."""
    return stats.gaussian_w2_squared(mu1, sigma1, mu2, sigma2)


def fid(real: np.ndarray, fake: np.ndarray, *, shrinkage: float = 0.0) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (paper §5: FID)."""
    real, fake = _pair(real, fake, 2)
    return frechet_distance(*gaussian_stats(real, shrinkage=shrinkage, name="real features"),
                            *gaussian_stats(fake, shrinkage=shrinkage, name="fake features"))


def sfid(real_spatial: np.ndarray, fake_spatial: np.ndarray, *, shrinkage: float = 0.0) -> float:
    """sFID (Nash et al. 2021): FID on mid-level spatial features (``inception-spatial``)."""
    return fid(real_spatial, fake_spatial, shrinkage=shrinkage)


# --------------------------------------------------------------------------- IS


def inception_score(probs: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """IS = exp(E_x KL(p(y|x) || p(y))), mean and std over ``splits`` (Salimans et al.)."""
    p = check_features(probs, "class probabilities")
    if (p < 0).any() or not np.allclose(p.sum(1), 1.0, atol=1e-4):
        raise UserError("class probabilities must be non-negative rows summing to 1")
    if not 1 <= splits <= len(p):
        raise UserError(f"splits={splits} must lie in [1, number of samples={len(p)}]")
    p = p.astype(np.float64)
    scores = []
    for part in np.array_split(p, splits):
        py = part.mean(0, keepdims=True)
        kl = np.where(part > 0, part * (np.log(np.where(part > 0, part, 1)) - np.log(py + 1e-300)), 0)
        scores.append(math.exp(kl.sum(1).mean()))
    return float(np.mean(scores)), float(np.std(scores))


def condition_accuracy(probs_or_pred: np.ndarray, requested: np.ndarray) -> float:
    """Share of samples classified as the class they were asked for (small-scale fidelity)."""
    arr = np.asarray(probs_or_pred)
    pred = arr.argmax(1) if arr.ndim == 2 else arr
    requested = np.asarray(requested)
    if pred.shape != requested.shape:
        raise UserError(f"condition_accuracy: {len(pred)} predictions vs {requested.shape} labels")
    if len(pred) == 0:
        raise UserError("condition_accuracy: no samples")
    return float((pred == requested).mean())


# --------------------------------------------------------------------------- P/R, D/C


def manifold_metrics(real: np.ndarray, fake: np.ndarray, *, pr_k: int | None = 3,
                     dc_k: int | None = 5) -> dict[str, float]:
    """Improved precision / recall (Kynkaanniemi et al. 2019) at ``pr_k`` and density /
    coverage (Naeem et al. 2020) at ``dc_k``, exact, in bounded memory (chunked nearest
    neighbours). The real features' k-NN radii for both k come from one pass; ``None``
    skips a pair of metrics."""
    ks = sorted({k for k in (pr_k, dc_k) if k})
    if not ks:
        return {}
    real, fake = _pair(real, fake, max(ks) + 1)
    round_to = np.float32 if real.dtype == np.float32 and fake.dtype == np.float32 else None
    r_real = neighbors.neighbour_radii(real, ks, round_to=round_to)
    out: dict[str, float] = {}
    if pr_k:
        r_fake = neighbors.kth_neighbour_radii(fake, pr_k, round_to=round_to)
        count, recall_hit, cover_hit = neighbors.cross_counts(real, fake, r_real[pr_k], r_fake,
                                                              round_to=round_to)
        out.update(precision=float((count > 0).mean()), recall=float(recall_hit.mean()))
        if dc_k == pr_k:
            out.update(density=float(count.mean() / pr_k), coverage=float(cover_hit.mean()))
    if dc_k and dc_k != pr_k:
        count, _, cover_hit = neighbors.cross_counts(real, fake, r_real[dc_k], None,
                                                     round_to=round_to)
        out.update(density=float(count.mean() / dc_k), coverage=float(cover_hit.mean()))
    return out


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> dict[str, float]:
    """Precision, recall, density and coverage at one ``k`` (as ``prdc.compute_prdc``)."""
    return manifold_metrics(real, fake, pr_k=k, dc_k=k)


def density_coverage(real: np.ndarray, fake: np.ndarray, k: int = 5) -> dict[str, float]:
    """Density and coverage (Naeem et al. 2020); k = 5 is their recommended default."""
    return manifold_metrics(real, fake, pr_k=None, dc_k=k)


# --------------------------------------------------------------------------- TopP&R


def _top_projection(dim: int, out_dim: int = 32) -> torch.Tensor:
    """The public implementation's projection: xavier-normal [32, d] drawn after seed 99."""
    w = torch.empty(out_dim, dim)
    torch.nn.init.xavier_normal_(w, generator=torch.Generator().manual_seed(99))
    return w


def _upper_kth(x: torch.Tensor, k: int, chunk: int) -> np.ndarray:
    """Balloon bandwidths as in the public TopP&R code: for row i < n-k, the k-th smallest
    distance to the rows *after* i; returns their sorted values."""
    n = len(x)
    sq = (x * x).sum(1)
    out = []
    for a in range(0, n - k, chunk):
        b = min(a + chunk, n - k)
        d2 = torch.addmm(sq[a:b, None] + sq[None, a:], x[a:b], x[a:].T, alpha=-2.0)
        idx = torch.arange(b - a)[:, None] >= torch.arange(n - a)[None, :]
        d2[idx] = float("inf")
        out.append(torch.kthvalue(d2, k, dim=1).values.clamp_min(0).sqrt())
    return np.sort(torch.cat(out).numpy())


def _kde_sums(data: torch.Tensor, pos: torch.Tensor, h: float, weights: torch.Tensor,
              chunk: int) -> torch.Tensor:
    """sum_j w_jk cos(pi/2 d(pos_i, data_j)/h) 1[d <= h] for each weight column k (cosine
    kernel; the (pi/4h)^d factor of the reference cancels in every comparison)."""
    sq_d, sq_p = (data * data).sum(1), (pos * pos).sum(1)
    out = torch.empty(len(pos), weights.shape[1], dtype=torch.float64)
    for a in range(0, len(pos), chunk):
        b = min(a + chunk, len(pos))
        d2 = torch.addmm(sq_p[a:b, None] + sq_d[None, :], pos[a:b], data.T, alpha=-2.0)
        d2.clamp_(min=0)
        inside = d2 <= h * h
        kern = torch.where(inside, torch.cos((math.pi / 2) * d2.sqrt_() / h), 0.0)
        out[a:b] = kern @ weights
    return out


def top_pr(real: np.ndarray, fake: np.ndarray, *, alpha: float = 0.1, repeats: int = 10,
           random_proj: bool = True, seed: int = 0, chunk: int = 1024) -> dict[str, float]:
    """TopP&R (Kim et al. 2023): topological precision / recall / F1.

    Follows the public ``top-pr`` implementation: random projection to 32-d (d > 32),
    balloon bandwidth (median k-th neighbour distance, k = 5 x dim, over later rows),
    cosine-kernel KDE, bootstrap confidence band (``repeats`` resamples, 1 - alpha
    quantile of sup |p_hat - p_boot|). Bootstrap resamples are multinomial weights, so
    memory stays O(chunk x n) instead of the reference's n x n matrices.
    """
    real, fake = _pair(real, fake, 2)
    r = torch.from_numpy(np.asarray(real, np.float32))
    f = torch.from_numpy(np.asarray(fake, np.float32))
    if random_proj and r.shape[1] > 32:
        w = _top_projection(r.shape[1])
        r, f = r @ w.T, f @ w.T
    r, f = r.double(), f.double()
    k = r.shape[1] * 5
    if min(len(r), len(f)) <= 2 * k:
        raise UserError(f"TopP&R needs more than {2 * k} samples per set for {r.shape[1]}-d "
                        f"features, got {len(r)} real / {len(f)} fake")
    gen = np.random.default_rng(seed)

    def band(x: torch.Tensor) -> tuple[float, float, torch.Tensor]:
        balloon = _upper_kth(x, k, chunk)
        h = float(balloon[int(len(balloon) * 0.5) - 1])
        n = len(x)
        counts = gen.multinomial(n, np.full(n, 1.0 / n), size=repeats).T.astype(np.float64)
        weights = torch.from_numpy(np.concatenate([np.ones((n, 1)), counts], 1)) / n
        sums = _kde_sums(x, x, h, weights, chunk)
        p_hat = sums[:, 0]
        theta = (sums[:, 1:] - p_hat[:, None]).abs().amax(0).numpy()
        c = float(np.quantile(theta, 1 - alpha)) if repeats else 0.0
        return h, c, p_hat

    h_r, c_r, score_rr = band(r)
    h_f, c_f, score_ff = band(f)
    ones_f = torch.full((len(f), 1), 1.0 / len(f), dtype=torch.float64)
    ones_r = torch.full((len(r), 1), 1.0 / len(r), dtype=torch.float64)
    score_rg = _kde_sums(f, r, h_f, ones_f, chunk)[:, 0]  # fake density at real points
    score_gr = _kde_sums(r, f, h_r, ones_r, chunk)[:, 0]  # real density at fake points
    sig_r, sig_f = score_rr > c_r, score_ff > c_f
    precision = float((sig_f & (score_gr > c_r)).sum() / max(int(sig_f.sum()), 1))
    recall = float((sig_r & (score_rg > c_f)).sum() / max(int(sig_r.sum()), 1))
    f1 = 2 / (1 / precision + 1 / recall) if precision > 1e-4 and recall > 1e-4 else 0.0
    return {"top_precision": precision, "top_recall": recall, "top_f1": f1,
            "bandwidth_real": h_r, "bandwidth_fake": h_f, "band_real": c_r, "band_fake": c_f}


def top_pr_f1(real: np.ndarray, fake: np.ndarray, **kwargs) -> float:
    """TopP&R F1 score (Kim et al. 2023, alpha 0.1, 32-d random projection)."""
    return top_pr(real, fake, **kwargs)["top_f1"]


# --------------------------------------------------------------------------- RMD


class RMDModel:
    """Class Gaussians with one shared covariance plus one class-agnostic Gaussian (§5)."""

    def __init__(self, features: np.ndarray, labels: np.ndarray, *, shrinkage: float = 0.0):
        x = check_features(features, "RMD fit features", min_rows=2).astype(np.float64)
        y = np.asarray(labels)
        if y.shape != (len(x),):
            raise UserError(f"RMD: {len(x)} features but labels of shape {y.shape}")
        self.classes = np.unique(y)
        self.means = np.stack([x[y == c].mean(0) for c in self.classes])
        centred = x - self.means[np.searchsorted(self.classes, y)]
        d = x.shape[1]
        if len(x) - len(self.classes) < d and not shrinkage:
            raise UserError(f"RMD: {len(x)} samples for {d}-d features give a singular "
                            "covariance; use more samples or a shrinkage in (0, 1]")
        shared = centred.T @ centred / len(x)
        self.mean0 = x.mean(0)
        agnostic = np.cov(x, rowvar=False, bias=True)
        shared = stats.shrink_covariance(shared, shrinkage)
        agnostic = stats.shrink_covariance(agnostic, shrinkage)
        self.prec = np.linalg.pinv(shared, hermitian=True)
        self.prec0 = np.linalg.pinv(agnostic, hermitian=True)

    def scores(self, features: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """RMD(x, y) = M(x, y) - M_agn(x), M = -(f - mu)^T Sigma^-1 (f - mu)."""
        x = check_features(features, "RMD features").astype(np.float64)
        y = np.asarray(labels)
        if y.shape != (len(x),):
            raise UserError(f"RMD: {len(x)} features but labels of shape {y.shape}")
        if x.shape[1] != self.means.shape[1]:
            raise UserError(f"RMD: features are {x.shape[1]}-d, fit was {self.means.shape[1]}-d")
        pos = np.searchsorted(self.classes, y)
        known = (pos < len(self.classes)) & (self.classes[np.minimum(pos, len(self.classes) - 1)] == y)
        if not known.all():
            raise UserError(f"RMD: label {y[~known][0]} has no class in the fit data")
        dc = x - self.means[pos]
        d0 = x - self.mean0
        m = -np.einsum("ij,jk,ik->i", dc, self.prec, dc)
        m0 = -np.einsum("ij,jk,ik->i", d0, self.prec0, d0)
        return m - m0


def rmd_scores(features: np.ndarray, labels: np.ndarray, *, fit_features: np.ndarray | None = None,
               fit_labels: np.ndarray | None = None, shrinkage: float = 0.0) -> np.ndarray:
    """Relative Mahalanobis distance per sample; Gaussians fit on ``fit_*`` (default: the
    features themselves). The evaluate command fits on real reference features."""
    if fit_features is None:
        fit_features, fit_labels = features, labels
    return RMDModel(fit_features, fit_labels, shrinkage=shrinkage).scores(features, labels)


# --------------------------------------------------------------------------- memorization


def train_distances(fake: np.ndarray, train: np.ndarray, k: int = 5) -> np.ndarray:
    """Exact distances of each sample to its ``k`` nearest training features, sorted [N, k]."""
    fake, train = _pair(train, fake)[::-1]
    if k > len(train):
        raise UserError(f"k={k} nearest training features requested, only {len(train)} given")
    return neighbors.knn_distances(fake, train, k)


def avg_topk_l2(fake: np.ndarray, train: np.ndarray, k: int = 5) -> float:
    """Mean L2 distance of each sample to its k nearest training features (§5)."""
    return float(train_distances(fake, train, k).mean())


def memorization_threshold(heldout: np.ndarray, train: np.ndarray, percentile: float = 1.0
                           ) -> float:
    """Default threshold: the ``percentile`` of held-out real -> train nearest distances."""
    return float(np.percentile(train_distances(heldout, train, 1)[:, 0], percentile))


def share_below(nearest: np.ndarray, threshold: float) -> float:
    """Share of nearest-training-feature distances below ``threshold`` (memorization, §5)."""
    if not threshold > 0:
        raise UserError(f"memorization threshold must be positive, got {threshold}")
    return float((np.asarray(nearest) < threshold).mean())


def memorization_ratio(fake: np.ndarray, train: np.ndarray, threshold: float) -> float:
    """Share of samples whose nearest training feature is closer than ``threshold`` (§5)."""
    return share_below(train_distances(fake, train, 1)[:, 0], threshold)

