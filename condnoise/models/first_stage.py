"""First-stage autoencoders of latent diffusion: diffusers ``VQModel`` / ``AutoencoderKL``.

The paper's LDM-4 runs on a VQ-f4 autoencoder (latent 64x64x3, codebook 8,192) and DiT-XL/2
on the SD KL-f8 VAE (32x32x4) (paper Sec. 4; Rombach et al. 2022, Table 8). Both are built
here from a few numbers in the style of LDM's configs (``ch``, ``ch_mult``): a base
``width`` and one multiplier per resolution level. A diffusers encoder with ``L`` blocks
downsamples ``L - 1`` times, so downsampling ``f`` needs ``log2(f) + 1`` levels.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from condnoise.errors import UserError

KINDS = ("vq", "kl")
DOWNSAMPLES = (4, 8)
#: diffusers class name (``_class_name`` in config.json) per kind
CLASS_NAMES = {"vq": "VQModel", "kl": "AutoencoderKL"}
#: LDM's channel multipliers: vq-f4 ch_mult (1,2,4), kl-f8 (1,2,4,4)
DEFAULT_MULT = {4: (1, 2, 4), 8: (1, 2, 4, 4)}


def levels(downsample: int) -> int:
    """Resolution levels (encoder blocks) of a downsampling factor ``f``: ``log2(f) + 1``."""
    if downsample not in DOWNSAMPLES:
        raise UserError(f"model.downsample: invalid value {downsample!r}; valid options: "
                        + ", ".join(map(str, DOWNSAMPLES)))
    return int(math.log2(downsample)) + 1


def block_channels(width: int, channel_mult: list[int] | None, downsample: int) -> tuple[int, ...]:
    """``width * m`` per level; ``channel_mult`` null takes LDM's for ``downsample``."""
    n = levels(downsample)
    mult = tuple(channel_mult) if channel_mult else DEFAULT_MULT[downsample]
    if len(mult) != n:
        raise UserError(f"model.channel_mult {list(mult)} has {len(mult)} levels but "
                        f"model.downsample={downsample} needs {n} (log2(f) + 1); give {n} "
                        "multipliers or null for LDM's")
    if width < 1 or any(m < 1 for m in mult):
        raise UserError(f"model.width and model.channel_mult must be positive, got {width}, {list(mult)}")
    return tuple(width * m for m in mult)


def build_first_stage(
    kind: str,
    *,
    in_channels: int,
    image_size: int,
    downsample: int = 4,
    width: int = 128,
    channel_mult: list[int] | None = None,
    layers_per_block: int = 2,
    latent_channels: int = 3,
    codebook_size: int = 8192,
    embed_dim: int | None = None,
    norm_groups: int = 32,
    mid_attention: bool = True,
) -> nn.Module:
    """A randomly initialised ``VQModel`` (``kind="vq"``) or ``AutoencoderKL`` (``"kl"``)."""
    from diffusers import AutoencoderKL, VQModel

    if kind not in KINDS:
        raise UserError(f"model.kind: invalid value {kind!r}; valid options: " + ", ".join(KINDS))
    channels = block_channels(width, channel_mult, downsample)
    if any(c % norm_groups for c in channels):
        raise UserError(f"model.norm_groups={norm_groups} must divide every level's width {list(channels)}")
    if image_size % downsample:
        raise UserError(f"data.image_size={image_size} is not divisible by model.downsample={downsample}")
    common = dict(
        in_channels=in_channels, out_channels=in_channels,
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        block_out_channels=channels, layers_per_block=layers_per_block,
        latent_channels=latent_channels, norm_num_groups=norm_groups, sample_size=image_size,
        mid_block_add_attention=mid_attention, scaling_factor=1.0,
    )  # fmt: skip
    if kind == "vq":
        return VQModel(**common, num_vq_embeddings=codebook_size, vq_embed_dim=embed_dim)
    return AutoencoderKL(**common)


def folder_kind(path: str | Path) -> str:
    """``vq`` or ``kl`` from a diffusers folder's ``config.json`` (``_class_name``)."""
    cfg_path = Path(path) / "config.json"
    if not cfg_path.is_file():
        raise UserError(f"{path} is not a diffusers autoencoder folder (no config.json)")
    try:
        name = json.loads(cfg_path.read_text(encoding="utf-8")).get("_class_name")
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {cfg_path}: {e}") from None
    for kind, cls in CLASS_NAMES.items():
        if name == cls:
            return kind
    raise UserError(f"{cfg_path}: _class_name {name!r} is not an autoencoder "
                    f"({', '.join(CLASS_NAMES.values())})")


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

    folder = resolve_folder(path)
    if kind == "auto":
        kind = folder_kind(folder)
    elif kind not in KINDS:
        raise UserError(f"--kind: invalid value {kind!r}; valid options: auto, vq, kl")
    check_folder_kind(folder, kind)
    cls = VQModel if kind == "vq" else AutoencoderKL
    try:
        model = cls.from_pretrained(str(folder))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load {kind} autoencoder from {folder}: {e}") from None
    return model.to(device).eval().requires_grad_(False), kind, folder


def check_folder_kind(path: str | Path, kind: str, what: str = "autoencoder") -> None:
    """UserError when the folder holds the other kind (e.g. a VQModel read as ``kl``)."""
    found = folder_kind(path)
    if found != kind:
        raise UserError(f"{what} folder {path} holds a {CLASS_NAMES[found]} (kind {found}), "
                        f"not a {CLASS_NAMES[kind]} (kind {kind}); set kind: {found}")


def codebook_of(model: Any) -> Any:
    """The VQ codebook ``[K, D]`` (a parameter) of a diffusers ``VQModel``."""
    quantize = getattr(model, "quantize", None)
    if quantize is None or not hasattr(quantize, "embedding"):
        raise UserError(f"{type(model).__name__} has no VQ codebook (a KL autoencoder?); sample "
                        "entropy and codebook usage need a VQ autoencoder")
    return quantize.embedding.weight


def latent_channels_of(model: Any) -> int:
    """Channels of ``encode(x)``: ``vq_embed_dim`` for VQ models (after ``quant_conv``)."""
    cfg = model.config
    return int(getattr(cfg, "vq_embed_dim", None) or cfg.latent_channels)


@torch.no_grad()
def reconstruct(model: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Deterministic reconstruction and (VQ) code indices ``[B, h*w]`` of images ``x``.

    VQ: ``decode(quantize(encode(x)))`` (what ``VQModel.decode`` does); KL: the posterior
    mean is decoded (LDM's evaluation)."""
    if hasattr(model, "quantize"):
        h = model.encode(x).latents
        z_q, _, (_, _, idx) = model.quantize(h)
        return model.decode(z_q, force_not_quantize=True).sample, idx.reshape(len(x), -1)
    return model.decode(model.encode(x).latent_dist.mean).sample, None
