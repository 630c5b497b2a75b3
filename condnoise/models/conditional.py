"""The conditional diffusion model: condition encoder -> perturbation -> denoiser.

``build_model(model_cfg, *, in_channels, image_size, num_classes)`` from a plain config dict;
the schema (documented in docs/architecture.md, section models/) is::

    family: dit | unet
    size: DiT "<T|S|B|L|XL>/<2|4|8>" or U-Net preset "ldm" | "fmnist" | "tiny"
    # optional overrides. DiT: hidden, depth, heads, patch, mlp_ratio.
    #                     U-Net: channels, attention, layers_per_block, heads, norm_groups
    learn_sigma: false      # eps only (true doubles the output channels, as official DiT)
    checkpointing: false    # activation checkpointing: true = every block, k = the first k blocks
    cond_dim: null          # embedding size; null = DiT hidden / U-Net preset context size
    embed_init_std: null    # null = 0.02 (DiT) / 1.0 (LDM's nn.Embedding default)
    cfg_dropout: 0.1        # probability of the null class in training (CFG)
    perturbation: {name: none}   # plus that perturbation's fields (see perturbation_choices)
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from condnoise.conditioning.encoders import ClassEmbedder, cfg_drop
from condnoise.conditioning.perturb import Perturbation, build_perturbation, perturbation_choices
from condnoise.errors import UserError
from condnoise.models.dit import DIT_CONFIGS, DIT_PATCHES, DiT, dit_sizes
from condnoise.models.unet import UNET_PRESETS, UNet

FAMILIES = ("dit", "unet")
COMMON_KEYS = ("family", "size", "learn_sigma", "checkpointing", "cond_dim", "embed_init_std",
               "cfg_dropout", "perturbation")  # fmt: skip
OVERRIDES = {
    "dit": ("hidden", "depth", "heads", "patch", "mlp_ratio"),
    "unet": ("channels", "attention", "layers_per_block", "heads", "norm_groups"),
}
DEFAULT_SIZE = {"dit": "S/4", "unet": "fmnist"}


def model_choices() -> dict[str, Any]:
    """Valid values of every choice field of the model config (for error messages / docs)."""
    return {
        "family": list(FAMILIES),
        "size": {"dit": dit_sizes(), "unet": list(UNET_PRESETS)},
        "overrides": {k: list(v) for k, v in OVERRIDES.items()},
        "perturbation": perturbation_choices(),
    }


def _positive_int(cfg: dict, key: str) -> None:
    v = cfg[key]
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise UserError(f"model config field {key!r} must be a positive integer, got {v!r}")


def resolve_model_config(model_cfg: dict) -> dict[str, Any]:
    """Validate ``model_cfg`` and return it with every default filled in (UserError on bad input)."""
    if not isinstance(model_cfg, dict):
        raise UserError(f"model config must be a mapping, got {type(model_cfg).__name__}")
    family = model_cfg.get("family", "dit")
    if family not in FAMILIES:
        raise UserError(f"model config field 'family': {family!r} unknown; choose one of {', '.join(FAMILIES)}")
    unknown = sorted(set(model_cfg) - set(COMMON_KEYS) - set(OVERRIDES[family]))
    if unknown:
        raise UserError(
            f"model config: unknown field(s) {', '.join(unknown)} for family {family}; valid: "
            f"{', '.join(COMMON_KEYS + OVERRIDES[family])}"
        )
    size = str(model_cfg.get("size", DEFAULT_SIZE[family]))
    cfg: dict[str, Any] = {"family": family, "size": size}
    if family == "dit":
        name, _, patch = size.partition("/")
        if name not in DIT_CONFIGS or not patch.isdigit() or int(patch) not in DIT_PATCHES:
            raise UserError(f"model config field 'size': {size!r} unknown for dit; choose one of {', '.join(dit_sizes())}")
        hidden, depth, heads = DIT_CONFIGS[name]
        cfg.update(hidden=hidden, depth=depth, heads=heads, patch=int(patch), mlp_ratio=4.0)
    else:
        if size not in UNET_PRESETS:
            raise UserError(f"model config field 'size': {size!r} unknown for unet; choose one of {', '.join(UNET_PRESETS)}")
        cfg.update(copy.deepcopy({k: v for k, v in UNET_PRESETS[size].items() if k != "cond_dim"}))
    for key in OVERRIDES[family]:
        if model_cfg.get(key) is not None:
            cfg[key] = copy.deepcopy(model_cfg[key])
    for key in ("hidden", "depth", "heads", "patch", "layers_per_block", "norm_groups"):
        if key in cfg:
            _positive_int(cfg, key)
    if family == "unet":
        if not isinstance(cfg["channels"], list) or not all(isinstance(c, int) and c > 0 for c in cfg["channels"]):
            raise UserError(f"model config field 'channels' must be a list of positive integers, got {cfg['channels']!r}")
        if not isinstance(cfg["attention"], list) or not all(isinstance(a, bool) for a in cfg["attention"]):
            raise UserError(f"model config field 'attention' must be a list of booleans, got {cfg['attention']!r}")
    cfg["learn_sigma"] = bool(model_cfg.get("learn_sigma", False))
    ckpt = model_cfg.get("checkpointing", False)
    if not isinstance(ckpt, bool | int) or (not isinstance(ckpt, bool) and ckpt < 0):
        raise UserError(
            f"model config field 'checkpointing' must be true, false or a block count >= 0, got {ckpt!r}"
        )
    if not isinstance(ckpt, bool) and family == "unet":
        ckpt = ckpt > 0  # diffusers' U-Net checkpoints all of its blocks or none
    cfg["checkpointing"] = ckpt
    cond_dim = model_cfg.get("cond_dim")
    if cond_dim is None:
        cond_dim = cfg["hidden"] if family == "dit" else UNET_PRESETS[size]["cond_dim"]
    cfg["cond_dim"] = cond_dim
    _positive_int(cfg, "cond_dim")
    std = model_cfg.get("embed_init_std")
    cfg["embed_init_std"] = float((0.02 if family == "dit" else 1.0) if std is None else std)
    p = model_cfg.get("cfg_dropout", 0.1)
    if isinstance(p, bool) or not isinstance(p, int | float) or not 0.0 <= p < 1.0:
        raise UserError(f"model config field 'cfg_dropout' must be in [0, 1), got {p!r}")
    cfg["cfg_dropout"] = float(p)
    pert = model_cfg.get("perturbation") or {"name": "none"}
    if isinstance(pert, str):
        pert = {"name": pert}
    if not isinstance(pert, dict):
        raise UserError(f"model config field 'perturbation' must be a mapping with 'name', got {pert!r}")
    pert = dict(pert)
    name = pert.pop("name", "none")
    built = build_perturbation(name, **pert)  # validates
    cfg["perturbation"] = {"name": name, **(built.params() if name != "ip" else {"ip": built.input_perturbation})}
    return cfg


class ConditionalDiffusionModel(nn.Module):
    """``forward(x_t, t, labels, *, sample_index=None, step=None) -> eps``.

    Training mode: labels go to the null class with probability ``cfg_dropout``, then the
    embedding is perturbed (non-null rows only). Eval mode: neither (labels may hold
    ``null_index`` for the unconditional branch of CFG).
    """

    def __init__(
        self,
        encoder: ClassEmbedder,
        perturbation: Perturbation,
        denoiser: nn.Module,
        *,
        cfg_dropout: float = 0.1,
        config: dict | None = None,
    ) -> None:
        super().__init__()
        self.encoder, self.perturbation, self.denoiser = encoder, perturbation, denoiser
        self.cfg_dropout = cfg_dropout
        self.config = config or {}

    @property
    def num_classes(self) -> int:
        return self.encoder.num_classes

    @property
    def null_index(self) -> int:
        return self.encoder.null_index

    @property
    def input_perturbation(self) -> float:
        """xi of input perturbation (read by ``diffusion_loss``)."""
        return self.perturbation.input_perturbation

    def embed(
        self, labels: torch.Tensor, *, sample_index: torch.Tensor | None = None, step: int | None = None
    ) -> torch.Tensor:
        """Condition embedding ``[B, cond_dim]`` (CFG dropout and perturbation in training)."""
        if labels.device.type == "cpu":
            self.encoder.check_labels(labels)
        if self.training:
            labels = cfg_drop(labels, self.cfg_dropout, self.null_index)
        c = self.encoder.encode(labels)
        return self.perturbation(c, labels, encoder=self.encoder, sample_index=sample_index, step=step)

    def forward(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        labels: torch.Tensor,
        *,
        sample_index: torch.Tensor | None = None,
        step: int | None = None,
    ) -> torch.Tensor:
        if labels.shape[0] != x_t.shape[0]:
            raise UserError(f"model input: {x_t.shape[0]} images but {labels.shape[0]} labels")
        c = self.embed(labels, sample_index=sample_index, step=step)
        return self.denoiser(x_t, t, c)


def build_model(
    model_cfg: dict, *, in_channels: int, image_size: int, num_classes: int
) -> ConditionalDiffusionModel:
    """Build encoder + perturbation + denoiser from a model config (schema: module docstring).

    The resolved config (every default filled in) is kept as ``model.config``.
    """
    cfg = resolve_model_config(model_cfg)
    if num_classes < 1:
        raise UserError(f"build_model: num_classes must be >= 1, got {num_classes}")
    common = dict(in_channels=in_channels, image_size=image_size, cond_dim=cfg["cond_dim"],
                  learn_sigma=cfg["learn_sigma"], checkpointing=cfg["checkpointing"])  # fmt: skip
    if cfg["family"] == "dit":
        denoiser: nn.Module = DiT(**common, **{k: cfg[k] for k in OVERRIDES["dit"]})
    else:
        denoiser = UNet(**common, **{k: cfg[k] for k in OVERRIDES["unet"]})
    encoder = ClassEmbedder(num_classes, cfg["cond_dim"], init_std=cfg["embed_init_std"])
    pert = dict(cfg["perturbation"])
    perturbation = build_perturbation(pert.pop("name"), **pert)
    return ConditionalDiffusionModel(encoder, perturbation, denoiser, cfg_dropout=cfg["cfg_dropout"], config=cfg)
