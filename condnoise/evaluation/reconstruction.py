"""Reconstruction quality of a first-stage autoencoder (LDM Table 8: PSNR, SSIM, rFID).

``evaluate_autoencoder(path, source=..., split=..., features=..., out_dir=...)`` reconstructs
a data split deterministically (VQ: quantised ``decode(encode(x))``; KL: posterior mean),
then writes ``out_dir/metrics.json`` with

- ``psnr`` (dB, mean over images of the per-image PSNR, images mapped to [0, 1]) and
  ``ssim`` (torchmetrics, Gaussian window 11, mean over images); with ``crop`` also on the
  central ``crop x crop`` pixels (e.g. the 28 x 28 of Fashion-MNIST padded to 32);
- ``rfid`` per feature extractor: the FID between reconstructions and originals;
- VQ only: ``code_usage`` (share of codes used on the split), ``code_perplexity`` and
  ``code_entropy`` of the code histogram, ``code_counts`` and the histogram figure
  ``code_usage.png`` (codes sorted by frequency);

plus ``reconstructions.png`` (originals above reconstructions) and ``provenance.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from condnoise.errors import UserError
from condnoise.io import write_bytes, write_json


def resolve_folder(path: str | Path) -> Path:
    """A diffusers folder, or an autoencoder run directory holding ``autoencoder/``."""
    p = Path(path)
    if (p / "config.json").is_file():
        return p
    if (p / "autoencoder" / "config.json").is_file():
        return p / "autoencoder"
    raise UserError(f"{path}: neither a diffusers autoencoder folder (config.json) nor an "
                    "autoencoder run directory (autoencoder/config.json)")


def load_first_stage(path: str | Path, kind: str = "auto", device: str | torch.device = "cpu"
                     ) -> tuple[Any, str, Path]:
    """``(model in eval mode, kind, folder)``; ``kind`` ``vq``/``kl`` is checked, ``auto`` read."""
    from diffusers import AutoencoderKL, VQModel

    from condnoise.models.first_stage import check_folder_kind, folder_kind

    folder = resolve_folder(path)
    if kind == "auto":
        kind = folder_kind(folder)
    elif kind not in ("vq", "kl"):
        raise UserError(f"--kind: invalid value {kind!r}; valid options: auto, vq, kl")
    check_folder_kind(folder, kind)
    cls = VQModel if kind == "vq" else AutoencoderKL
    try:
        model = cls.from_pretrained(str(folder))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load {kind} autoencoder from {folder}: {e}") from None
    return model.to(device).eval().requires_grad_(False), kind, folder


@torch.no_grad()
def reconstruct_split(model: Any, kind: str, images: torch.Tensor, *, batch_size: int = 64,
                      progress: Any = None) -> tuple[torch.Tensor, np.ndarray | None]:
    """Reconstructions float [N,C,H,W] in [-1,1] (clamped) and VQ codes [N, h*w] (else None)."""
    device = next(model.parameters()).device
    recs, codes = [], []
    for s in range(0, len(images), batch_size):
        x = images[s:s + batch_size].to(device)
        if kind == "vq":
            h = model.encode(x).latents
            z_q, _, (_, _, idx) = model.quantize(h)
            codes.append(idx.reshape(len(x), -1).cpu().numpy())
            rec = model.decode(z_q, force_not_quantize=True).sample
        else:
            rec = model.decode(model.encode(x).latent_dist.mean).sample
        recs.append(rec.float().clamp(-1, 1).cpu())
        if progress is not None:
            progress.update(len(x))
    return torch.cat(recs), (np.concatenate(codes) if codes else None)


def quality(originals: torch.Tensor, recs: torch.Tensor, crop: int | None = None,
            batch_size: int = 256) -> dict[str, float]:
    """Mean per-image PSNR (dB) and SSIM of float images in [-1, 1] (mapped to [0, 1])."""
    from torchmetrics.functional.image import (
        peak_signal_noise_ratio,
        structural_similarity_index_measure,
    )

    if crop is not None:
        h, w = originals.shape[-2:]
        if crop > min(h, w) or crop < 11:
            raise UserError(f"--crop {crop}: must lie in [11, {min(h, w)}] (SSIM window 11)")
        t, left = (h - crop) // 2, (w - crop) // 2
        originals = originals[..., t:t + crop, left:left + crop]
        recs = recs[..., t:t + crop, left:left + crop]
    psnr, ssim = [], []
    for s in range(0, len(originals), batch_size):
        a = (originals[s:s + batch_size].double() + 1) / 2
        b = (recs[s:s + batch_size].double() + 1) / 2
        psnr.append(peak_signal_noise_ratio(b, a, data_range=1.0, reduction="none", dim=(1, 2, 3)))
        ssim.append(structural_similarity_index_measure(b, a, data_range=1.0, reduction="none"))
    return {"psnr": float(torch.cat(psnr).mean()), "ssim": float(torch.cat(ssim).mean())}


def usage_figure(counts: np.ndarray, title: str) -> bytes:
    """Code histogram, codes sorted by frequency (log y), as PNG bytes."""
    from condnoise.plotting import png_bytes, pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ordered = np.sort(counts)[::-1]
    ax.bar(np.arange(len(ordered)), np.maximum(ordered, 0.5), width=1.0, color="tab:blue")
    ax.set_yscale("log")
    ax.set_xlabel("code rank (sorted by frequency)")
    ax.set_ylabel("assignments")
    ax.set_title(title, fontsize=9)
    return png_bytes(fig)


def code_statistics(codes: np.ndarray, num_codes: int) -> dict[str, Any]:
    from condnoise.evaluation.entropy import code_usage

    counts = np.bincount(codes.reshape(-1), minlength=num_codes)
    stats = code_usage(codes, num_codes, pool=None)
    return {"code_usage": stats["code_usage"], "code_perplexity": stats["code_perplexity"],
            "code_entropy": stats["code_entropy"], "code_counts": counts.tolist()}


def feature_rfid(originals: torch.Tensor, recs: torch.Tensor, extractors: list[str]) -> dict[str, float]:
    """rFID per extractor: FID between reconstructions and originals (same images)."""
    from condnoise.diffusion.grids import to_uint8
    from condnoise.evaluation.features import get_extractor
    from condnoise.evaluation.metrics import fid

    real, fake = to_uint8(originals), to_uint8(recs)
    out = {}
    for name in extractors:
        ex = get_extractor(name)
        out[name] = fid(ex.extract(real), ex.extract(fake))
    return out


def load_images(source: str, split: str, image_size: int | None, max_samples: int | None,
                data_dir: str | None = None) -> tuple[torch.Tensor, str]:
    """The first ``max_samples`` images of a split (float [N,C,H,W] in [-1,1]) and its name."""
    from condnoise.data.sources import open_source
    from condnoise.training.image_stream import ImageBatches

    src = open_source(source, split, data_dir=data_dir, image_size=image_size)
    batches = ImageBatches(src, 0, max_samples=max_samples)
    return batches.first(batches.num_samples), f"{src.meta.name}:{split}"


def evaluate_autoencoder(
    path: str | Path, *, source: str, split: str = "test", out_dir: str | Path,
    features: tuple[str, ...] = ("fmnist-classifier",), kind: str = "auto",
    image_size: int | None = None, max_samples: int | None = None, crop: int | None = None,
    batch_size: int = 64, device: str = "cpu", data_dir: str | None = None, progress: Any = None,
) -> dict[str, Any]:
    """Reconstruct ``source:split`` and write the metrics (see module docstring); return them."""
    from condnoise.diffusion.grids import save_grid
    from condnoise.provenance import write_provenance

    model, kind, folder = load_first_stage(path, kind, device)
    size = image_size or int(model.config.sample_size)
    images, data_name = load_images(source, split, size, max_samples, data_dir)
    if images.shape[1] != model.config.in_channels:
        raise UserError(f"{data_name} has {images.shape[1]} channels but the autoencoder in "
                        f"{folder} takes {model.config.in_channels}")
    recs, codes = reconstruct_split(model, kind, images, batch_size=batch_size, progress=progress)
    out = Path(out_dir)
    result: dict[str, Any] = {"schema": "condnoise.autoencoder-eval/1", "autoencoder": str(folder),
                              "kind": kind, "data": data_name, "num_images": len(images),
                              "image_shape": list(images.shape[1:]), **quality(images, recs)}
    if crop is not None:
        result.update({f"{k}_crop{crop}": v for k, v in quality(images, recs, crop).items()})
    if features:
        result["rfid"] = feature_rfid(images, recs, list(features))
    if codes is not None:
        k = int(model.config.num_vq_embeddings)
        result.update(code_statistics(codes, k))
        title = (f"{folder.parent.name}/{folder.name}: {result['code_usage']:.1%} of {k} codes used, "
                 f"perplexity {result['code_perplexity']:.0f} ({data_name})")
        write_bytes(out / "code_usage.png", usage_figure(np.asarray(result["code_counts"]), title))
    n = min(16, len(images))
    save_grid(torch.cat([images[:n], recs[:n]]), out / "reconstructions.png", nrow=n)
    write_json(out / "metrics.json", result)
    write_provenance(out, {"autoencoder": str(folder), "source": source, "split": split,
                           "features": list(features), "image_size": size,
                           "max_samples": max_samples, "crop": crop}, None)
    return result
