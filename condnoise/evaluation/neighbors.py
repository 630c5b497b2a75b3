"""Exact nearest-neighbour queries in bounded memory (paper §5: k-NN manifold metrics).

Distances are computed block by block with a float32 matrix product (fast), and every
comparison the float32 value cannot decide (within a rigorous-enough error band) is
recomputed exactly in float64. Results therefore equal a float64 computation on the
full n x n matrix, which is never held in memory.

Rounding rule (matches ``sklearn.metrics.pairwise_distances`` used by ``prdc``): when
``round_to=np.float32`` exact distances are rounded to float32 before being compared.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

_EPS32 = float(np.finfo(np.float32).eps)
_GATHER = 4096  # pairs recomputed in float64 at a time


def _tol(dim: int) -> float:
    """Relative error band of the float32 |x|^2 + |y|^2 - 2 x.y (scaled by |x|^2 + |y|^2).

    The worst error measured on 2048-d Inception-like features was about 4 eps32; the band
    is 16 sqrt(d + 64) eps32 (about 180x that at d = 2048). ``benchmarks/metrics.py``
    (case ``exact``) re-checks equality with a full float64 computation.
    """
    return 16.0 * (dim + 64) ** 0.5 * _EPS32


def _exact_pairs(x64: _Rows, y64: _Rows, ii: torch.Tensor, jj: torch.Tensor,
                 round_to: type | None) -> torch.Tensor:
    """Exact float64 distances between rows ``x64[ii]`` and ``y64[jj]`` (optionally rounded)."""
    out = torch.empty(len(ii), dtype=torch.float64)
    for s in range(0, len(ii), _GATHER):
        a, b = ii[s:s + _GATHER], jj[s:s + _GATHER]
        out[s:s + _GATHER] = torch.linalg.vector_norm(x64[a] - y64[b], dim=1)
    if round_to is np.float32:
        out = out.to(torch.float32).to(torch.float64)
    return out


class _Rows:
    """Rows of a feature array, centred, as exact float64 on demand (no full float64 copy)."""

    def __init__(self, x: np.ndarray, mean: np.ndarray) -> None:
        self.x, self.mean = x, torch.from_numpy(mean)

    def __getitem__(self, idx: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.asarray(self.x[idx.numpy()], np.float64)) - self.mean

    def all(self) -> torch.Tensor:
        return torch.from_numpy(np.asarray(self.x, np.float64)) - self.mean


def _prepare(*arrays: np.ndarray) -> tuple[list[_Rows], list[torch.Tensor]]:
    """Centre all arrays on their joint mean (distance-preserving, better float32 conditioning)."""
    total = sum(np.asarray(a).sum(0, dtype=np.float64) for a in arrays)
    mean = total / sum(len(a) for a in arrays)
    exact = [_Rows(a, mean) for a in arrays]
    fast = [torch.from_numpy(np.asarray(a, np.float32) - mean.astype(np.float32)) for a in arrays]
    return exact, fast


def kth_neighbour_radii(x: np.ndarray, k: int, *, chunk: int = 2048, margin: int = 8,
                        round_to: type | None = None) -> np.ndarray:
    """Distance of each row of ``x`` to its k-th nearest other row (prdc's radii).

    Equals the (k+1)-th smallest entry of the row of the full distance matrix, self
    (distance 0) included. Symmetric blocks are computed once.
    """
    return neighbour_radii(x, (k,), chunk=chunk, margin=margin, round_to=round_to)[k]


def neighbour_radii(x: np.ndarray, ks: Sequence[int], *, chunk: int = 2048, margin: int = 8,
                    round_to: type | None = None) -> dict[int, np.ndarray]:
    """:func:`kth_neighbour_radii` for several ``k`` from one pass over the distances
    (precision / recall at k = 3 and density / coverage at k = 5 share it)."""
    n, dim = x.shape
    for k in ks:
        if not 0 < k < n:
            raise ValueError(f"k={k} needs 0 < k < number of samples ({n})")
    (x64,), (x32,) = _prepare(x)
    sq = (x32 * x32).sum(1)
    best_v, best_i = _nearest_candidates(x32, sq, min(max(ks) + 1 + margin, n), chunk)
    out = {}
    for k in ks:
        radii = _exact_radii(x64, sq, best_v, best_i, k, dim).numpy()
        out[k] = radii.astype(np.float32).astype(np.float64) if round_to is np.float32 else radii
    return out


def _nearest_candidates(x32: torch.Tensor, sq: torch.Tensor, K: int, chunk: int
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``K`` smallest float32 squared distances of every row (self included) and their
    column indices, block by block (symmetric blocks computed once)."""
    n = len(x32)
    best_v = torch.full((n, K), float("inf"))
    best_i = torch.zeros((n, K), dtype=torch.long)

    def merge(rows: slice, v: torch.Tensor, i: torch.Tensor) -> None:
        cv = torch.cat([best_v[rows], v], 1)
        ci = torch.cat([best_i[rows], i], 1)
        tv, ti = torch.topk(cv, K, dim=1, largest=False)
        best_v[rows], best_i[rows] = tv, torch.gather(ci, 1, ti)

    for a in range(0, n, chunk):
        ra = slice(a, min(a + chunk, n))
        for b in range(a, n, chunk):
            rb = slice(b, min(b + chunk, n))
            d2 = torch.addmm(sq[ra, None] + sq[None, rb], x32[ra], x32[rb].T, alpha=-2.0)
            v, i = torch.topk(d2, min(K, d2.shape[1]), dim=1, largest=False)
            merge(ra, v, i + b)
            if b != a:
                v, i = torch.topk(d2, min(K, d2.shape[0]), dim=0, largest=False)
                merge(rb, v.T.contiguous(), (i + a).T.contiguous())
    return best_v, best_i


def _exact_radii(x64: _Rows, sq: torch.Tensor, best_v: torch.Tensor, best_i: torch.Tensor,
                 k: int, dim: int) -> torch.Tensor:
    """Exact float64 value of each row's (k+1)-th candidate; rows whose order near k is
    ambiguous within the float32 error band get all candidates recomputed."""
    n, K = best_v.shape
    band = _tol(dim) * (sq[:, None] + sq[best_i])
    lo, hi = best_v - band, best_v + band
    clear = torch.ones(n, dtype=torch.bool)
    if k >= 1:
        clear &= hi[:, k - 1] < lo[:, k]
    if k + 1 < K:
        clear &= hi[:, k] < lo[:, k + 1]
    rows = torch.arange(n)
    radii = torch.empty(n, dtype=torch.float64)
    radii[clear] = _exact_pairs(x64, x64, rows[clear], best_i[clear, k], None)
    amb = rows[~clear]
    if len(amb):
        exact = _exact_pairs(x64, x64, amb.repeat_interleave(K), best_i[amb].reshape(-1), None)
        radii[amb] = torch.sort(exact.reshape(-1, K), dim=1).values[:, k]
    if K < n:  # candidates provably contain the k+1 nearest unless the band overlaps
        bound = _tol(dim) * (sq.double() + sq.double().max())
        unsafe = (best_v[:, -1].double() - bound) <= radii**2
        if unsafe.any():  # rare (many near-ties): brute force in float64
            every = x64.all()
            for r in torch.nonzero(unsafe).flatten().tolist():
                radii[r] = torch.sort(torch.linalg.vector_norm(every - every[r], dim=1)).values[k]
    return radii


def cross_counts(real: np.ndarray, fake: np.ndarray, r_real: np.ndarray,
                 r_fake: np.ndarray | None, *, chunk: int = 2048, round_to: type | None = None
                 ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Compare every real/fake distance d(i, j) with the radii, exactly.

    Returns ``(inside_real_count [n_fake], fake_ball_hit [n_real], real_ball_hit [n_real])``:
    per fake j the number of real i with d(i, j) < r_real[i] (precision, density); per
    real i whether some fake j has d(i, j) < r_fake[j] (recall); per real i whether some
    fake j has d(i, j) < r_real[i] (coverage). Without ``r_fake`` (density / coverage
    only) the recall comparison is skipped and returned as None.
    """
    (r64, f64), (r32, f32) = _prepare(real, fake)
    dim = real.shape[1]
    sq_r, sq_f = (r32 * r32).sum(1), (f32 * f32).sum(1)
    rr = torch.from_numpy(np.asarray(r_real, np.float64))
    rf = torch.from_numpy(np.asarray(r_real[:0] if r_fake is None else r_fake, np.float64))
    rr2, rf2 = (rr**2).float(), (rf**2).float()
    sides = ("real",) if r_fake is None else ("real", "fake")
    count = torch.zeros(len(fake), dtype=torch.long)
    recall_hit = torch.zeros(len(real), dtype=torch.bool)
    cover_hit = torch.zeros(len(real), dtype=torch.bool)
    tol = _tol(dim)
    for a in range(0, len(real), chunk):
        ra = slice(a, min(a + chunk, len(real)))
        for b in range(0, len(fake), chunk):
            rb = slice(b, min(b + chunk, len(fake)))
            norms = sq_r[ra, None] + sq_f[None, rb]
            d2 = torch.addmm(norms, r32[ra], f32[rb].T, alpha=-2.0)
            band = tol * norms + 1e-30
            for which in sides:
                thr = rr2[ra, None] if which == "real" else rf2[None, rb]
                less = d2 < thr - band
                unsure = torch.nonzero((d2 - thr).abs() <= band)
                if len(unsure):
                    ii, jj = unsure[:, 0] + a, unsure[:, 1] + b
                    d = _exact_pairs(r64, f64, ii, jj, round_to)
                    radius = rr[ii] if which == "real" else rf[jj]
                    less[unsure[:, 0], unsure[:, 1]] = d < radius
                if which == "real":
                    count[rb] += less.sum(0)
                    cover_hit[ra] |= less.any(1)
                else:
                    recall_hit[ra] |= less.any(1)
    return count.numpy(), None if r_fake is None else recall_hit.numpy(), cover_hit.numpy()


def knn_distances(query: np.ndarray, ref: np.ndarray, k: int, *, chunk: int = 2048,
                  margin: int = 8) -> np.ndarray:
    """Exact (float64) distances from each query row to its k nearest rows of ``ref``, sorted."""
    if not 0 < k <= len(ref):
        raise ValueError(f"k={k} needs 0 < k <= number of reference samples ({len(ref)})")
    (q64, f64), (q32, f32) = _prepare(query, ref)
    dim = query.shape[1]
    sq_q, sq_f = (q32 * q32).sum(1), (f32 * f32).sum(1)
    K = min(k + margin, len(ref))
    out = np.empty((len(query), k))
    for a in range(0, len(query), chunk):
        ra = slice(a, min(a + chunk, len(query)))
        best_v = torch.full((ra.stop - a, K), float("inf"))
        best_i = torch.zeros((ra.stop - a, K), dtype=torch.long)
        for b in range(0, len(ref), chunk * 4):
            rb = slice(b, min(b + chunk * 4, len(ref)))
            d2 = torch.addmm(sq_q[ra, None] + sq_f[None, rb], q32[ra], f32[rb].T, alpha=-2.0)
            v, i = torch.topk(d2, min(K, d2.shape[1]), dim=1, largest=False)
            cv, ci = torch.cat([best_v, v], 1), torch.cat([best_i, i + b], 1)
            tv, ti = torch.topk(cv, K, dim=1, largest=False)
            best_v, best_i = tv, torch.gather(ci, 1, ti)
        rows = torch.arange(a, ra.stop).repeat_interleave(K)
        exact = _exact_pairs(q64, f64, rows, best_i.reshape(-1), None).reshape(-1, K)
        exact = torch.sort(exact, dim=1).values
        if K < len(ref):
            bound = _tol(dim) * (sq_q[ra].double() + sq_f.double().max())
            unsafe = (best_v[:, -1].double() - bound) <= exact[:, k - 1] ** 2
            every = f64.all() if unsafe.any() else None
            for r in torch.nonzero(unsafe).flatten().tolist():
                full = torch.linalg.vector_norm(every - q64[torch.tensor([a + r])], dim=1)
                exact[r, :k] = torch.sort(full).values[:k]
        out[ra] = exact[:, :k].numpy()
    return out
