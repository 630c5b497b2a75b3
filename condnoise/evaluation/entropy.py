"""Sample entropy over a VQ codebook (paper Sec. 5) and the entropy of code usage.

- ``sample_entropy``: for each latent vector ``x_ij`` of a generated latent, the softmax
  over the codebook ``p_k = softmax_k(-||x_ij - C_k||^2 / tau)`` (near codes likely; the
  paper prints the sign loosely), its entropy ``-sum_k p_k log p_k`` in nats, averaged
  over positions and samples. ``tau`` (default 1, in squared latent units) sets how soft the
  assignment is: for tau -> 0 every vector picks its nearest code (entropy 0), for large tau
  every code is equally likely (entropy log K). A vector between several codes scores
  higher than one sitting on a code (when codes lie further apart than about sqrt(tau));
  far outside the codebook the nearest code dominates again.
- ``code_usage``: the entropy (nats), perplexity ``exp(H)`` and used fraction of the
  histogram of nearest codes over a *fixed-size pool* of latent vectors (the first ``pool``
  vectors in sample order). The plug-in entropy of a histogram grows with the number of
  draws, so a fixed pool makes values comparable between runs, whatever the number of
  samples or the batch size they were generated with.

Latents are the denoiser's output divided by the autoencoder's ``scaling_factor``, i.e. in
the space of ``VQModel.encode(x).latents`` where the codebook lives (before quantisation).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from condnoise.errors import UserError

DEFAULT_POOL = 32768  # latent vectors: 512 Fashion-MNIST samples at 8x8, 8 ImageNet at 64x64
_BLOCK = 4096


def _codebook(codebook: Any) -> np.ndarray:
    c = np.asarray(codebook, np.float64)
    if c.ndim != 2 or len(c) < 1 or not np.isfinite(c).all():
        raise UserError(f"codebook: expected finite [K, D] codes, got shape {c.shape}")
    return c


def latent_vectors(latents: Any, dim: int, *, channels_first: bool = True) -> np.ndarray:
    """``[N, D, h, w]`` (or ``[N, h, w, D]`` with ``channels_first=False``) -> ``[N*h*w, D]``
    float64, ordered by (sample, row, column)."""
    z = np.asarray(latents, np.float64)
    if channels_first:
        if z.ndim != 4:
            raise UserError(f"latents: expected [N, D, h, w], got shape {z.shape}")
        z = z.transpose(0, 2, 3, 1)
    if z.shape[-1] != dim:
        raise UserError(f"latent dim {z.shape[-1]} != codebook dim {dim}")
    z = z.reshape(-1, dim)
    if len(z) == 0 or not np.isfinite(z).all():
        raise UserError(f"latents: expected finite, non-empty vectors, got {z.shape}")
    return z


def _sq_distances(z: np.ndarray, c: np.ndarray) -> np.ndarray:
    return np.maximum((z**2).sum(1)[:, None] + (c**2).sum(1)[None] - 2 * z @ c.T, 0.0)


def sample_entropy(latents: Any, codebook: Any, tau: float = 1.0) -> float:
    """Mean entropy (nats) of ``softmax_k(-||x_ij - C_k||^2 / tau)`` over all vectors.

    ``latents``: ``[..., D]`` vectors (channels last, e.g. ``[N, h, w, D]``); ``codebook``:
    ``[K, D]``. Use :func:`latent_vectors` for diffusers' ``[N, D, h, w]``.
    """
    c = _codebook(codebook)
    if not tau > 0:
        raise UserError(f"tau must be positive, got {tau}")
    z = np.asarray(latents, np.float64)
    z = latent_vectors(z, c.shape[1], channels_first=False)
    total = 0.0
    for s in range(0, len(z), _BLOCK):
        logits = -_sq_distances(z[s:s + _BLOCK], c) / tau
        logits -= logits.max(1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
        total += float(-(np.exp(logp) * logp).sum())
    return total / len(z)


def nearest_codes(vectors: np.ndarray, codebook: Any) -> np.ndarray:
    """Index of the nearest code (squared L2) of every row of ``vectors`` [M, D]; int64."""
    c = _codebook(codebook)
    out = [_sq_distances(vectors[s:s + _BLOCK], c).argmin(1) for s in range(0, len(vectors), _BLOCK)]
    return np.concatenate(out).astype(np.int64)


def code_usage(codes: Any, num_codes: int, pool: int | None = DEFAULT_POOL) -> dict[str, float]:
    """Entropy (nats), perplexity and used fraction of the code histogram of the first
    ``pool`` codes (``None``: all). Fewer codes than ``pool`` is an error: values from
    different pool sizes are not comparable."""
    codes = np.asarray(codes, np.int64).reshape(-1)
    if pool is not None:
        if pool < 1:
            raise UserError(f"entropy pool must be >= 1 latent vectors, got {pool}")
        if len(codes) < pool:
            raise UserError(f"code usage needs a pool of {pool} latent vectors but the samples "
                            f"hold {len(codes)}; generate more samples or lower the pool size")
        codes = codes[:pool]
    if len(codes) == 0 or codes.min() < 0 or codes.max() >= num_codes:
        raise UserError(f"codes must be non-empty indices in [0, {num_codes})")
    counts = np.bincount(codes, minlength=num_codes).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    h = float(-(p * np.log(p)).sum())
    return {"code_entropy": h, "code_perplexity": float(np.exp(h)),
            "code_usage": float((counts > 0).mean()), "pool": int(len(codes))}


def vq_entropy_metrics(latents: Any, codebook: Any, *, tau: float = 1.0,
                       pool: int | None = DEFAULT_POOL) -> dict[str, float]:
    """``entropy`` (sample entropy) and the code-usage values of diffusers-layout latents
    ``[N, D, h, w]`` in codebook space."""
    c = _codebook(codebook)
    z = latent_vectors(latents, c.shape[1])
    usage = code_usage(nearest_codes(z, c), len(c), pool)
    return {"entropy": sample_entropy(z, c, tau), **usage}


def encode_images(autoencoder: Any, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Codebook-space latents ``[N, D, h, w]`` of uint8 ``[N, H, W, C]`` images (re-encoded)."""
    import torch

    out = []
    with torch.no_grad():
        for s in range(0, len(images), batch_size):
            x = torch.from_numpy(np.asarray(images[s:s + batch_size], np.float32))
            x = x.permute(0, 3, 1, 2) / 127.5 - 1.0
            out.append((autoencoder.encode(x) / autoencoder.scale).numpy())
    return np.concatenate(out)


def entropy_of_samples(images: np.ndarray, latents: np.ndarray | None, autoencoder: Any, *,
                       tau: float = 1.0, pool: int | None = DEFAULT_POOL
                       ) -> tuple[dict[str, float], dict[str, Any]]:
    """Entropy values of a sample folder and how they were obtained.

    ``latents`` (``samples.npz``'s ``latents``: the sampler's output in the denoiser's scaled
    space, [N, D, h, w]) are used when present; otherwise the decoded images are encoded
    again, an approximation (``encode(decode(z))`` is not ``z``) recorded in the details.
    ``autoencoder``: the run's frozen VQ autoencoder (``DiffusersAutoencoder``: ``encode``,
    ``scale``, ``model.quantize``), e.g. ``training.runtime.load_vq_autoencoder(run_dir)``.
    """
    ae = autoencoder
    if ae is None or not hasattr(getattr(ae, "model", None), "quantize"):
        raise UserError("sample entropy needs the samples' VQ autoencoder (paper Sec. 5: entropy "
                        "over a VQ codebook); the run of these samples has none")
    codebook = ae.model.quantize.embedding.weight.detach().cpu().numpy()
    if latents is not None:
        z, origin = np.asarray(latents, np.float64) / ae.scale, "sampled latents"
    else:
        z, origin = encode_images(ae, images), "re-encoded images"
    values = vq_entropy_metrics(z, codebook, tau=tau, pool=pool)
    used_pool = values.pop("pool")
    return values, {"latents": origin, "tau": tau, "pool": used_pool, "codebook_size": len(codebook)}
