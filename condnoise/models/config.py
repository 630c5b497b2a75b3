"""The typed ``model:`` section: shared fields plus one dataclass per denoiser family.

YAML stays flat (every key has a default; the run's ``config.yaml`` holds them all)::

    family: dit | unet | conv-unet
    size: DiT "<T|S|B|L|XL>/<2|4|8>", U-Net preset "ldm" | "fmnist" | "tiny",
          conv U-Net "tiny" | "xs" | "s" | "m"
    hidden, depth, heads, patch, mlp_ratio                     # dit overrides (null: from size)
    channels, attention, layers_per_block, heads, norm_groups  # unet overrides (null: from size)
    channels, layers_per_block, norm_groups, class_embed       # conv-unet overrides
    learn_sigma: false      # eps only (true doubles the output channels, as official DiT)
    checkpointing: false    # activation checkpointing: true = every block, k = the first k blocks
    cond_dim: null          # embedding size; null = DiT hidden / U-Net preset context size
    embed_init_std: null    # null = 0.02 (DiT) / 1.0 (LDM's nn.Embedding default)
    cfg_dropout: 0.1        # probability of the null condition in training (CFG)
    encoder: null           # {name: class | bert-embed | minilm | clip, path, max_length, depth,
                            #  heads, cache_size}; null = class labels
    perturbation: {name: none}   # plus that perturbation's fields (see perturbation_choices)
    autoencoder: null       # {kind: identity | kl | vq, path, scaling_factor}; null = pixels
    latent_shape: null      # [C, H, W] the denoiser sees (lets latent configs validate offline)
    lcm: null               # {w_embed_dim, solver_steps}: a latent consistency student (guidance
                            #  embedding; `condnoise distill lcm` sets it); null = a diffusion model
    adapter: null           # {kind: controlnet | t2i-adapter, control_channels, downscale, t2i_type,
                            #  num_res_blocks}: a spatial-control adapter (`condnoise finetune`)

Every bad key raises one :class:`~condnoise.errors.UserError` naming the key and the valid
keys or values (:mod:`condnoise.schema`). A new family is one subclass of
:class:`ModelConfig` (its override fields, ``DEFAULT_SIZE``, :meth:`sizes`,
:meth:`architecture`, :meth:`build_denoiser`) plus its entry in :data:`FAMILIES`; a new
shared field is one line in :class:`ModelConfig` and its check in :meth:`validate`.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from torch import nn

from condnoise import schema
from condnoise.conditioning.perturb import build_perturbation, perturbation_choices
from condnoise.conditioning.text import ENCODERS
from condnoise.errors import UserError
from condnoise.models.conv_unet import CONV_UNET_PRESETS, ConvUNet, time_embed_dim
from condnoise.models.dit import DIT_CONFIGS, DiT, dit_sizes
from condnoise.models.unet import UNET_PRESETS, UNet


@dataclass
class AutoencoderConfig:
    """The frozen autoencoder of a latent model (paper Sec. 4: SD-VAE for DiT, VQ-f4 for
    LDM-4); ``identity`` is pixel space."""

    kind: Literal["identity", "kl", "vq"] = "identity"
    path: str | None = None  # a local diffusers model folder
    scaling_factor: float | None = None  # null: the model's own (SD VAE: 0.18215)
    # VQ only: the denoiser sees quantised latents (codebook vectors); false: LDM's
    # pre-quantisation latents (the decoder quantises)
    quantize: bool = False

    @classmethod
    def from_dict(cls, raw: Any, *, origin: str = "autoencoder", prefix: str = "autoencoder."
                  ) -> AutoencoderConfig:  # fmt: skip
        cfg = raw if isinstance(raw, cls) else schema.build(cls, raw, origin, prefix)
        if cfg.kind == "identity" and (cfg.path or cfg.scaling_factor is not None):
            raise UserError(f"{origin}: {prefix}kind identity (pixel space) takes no path or "
                            "scaling_factor")  # fmt: skip
        if cfg.quantize and cfg.kind != "vq":
            raise UserError(f"{origin}: {prefix}quantize needs kind vq, got kind {cfg.kind}")
        return cfg


@dataclass
class EncoderConfig:
    """The condition encoder ``c_theta`` (paper Sec. 3): class labels or captions
    (:mod:`condnoise.conditioning.text`)."""

    name: str = "class"  # class | bert-embed | minilm | clip
    path: str | None = None  # bert-embed: vocab.txt (or its folder); minilm / clip: model folder (clip: or hub id)
    max_length: int = 77  # token ids per caption (LDM / CLIP: 77)
    depth: int = 2  # bert-embed transformer layers (width = cond_dim)
    heads: int = 4  # bert-embed attention heads
    cache_size: int = 0  # minilm / clip: captions whose token states are kept (LRU)

    @classmethod
    def from_dict(cls, raw: Any, *, origin: str = "encoder", prefix: str = "encoder.") -> EncoderConfig:
        cfg = raw if isinstance(raw, cls) else schema.build(cls, raw, origin, prefix)
        if cfg.name not in ENCODERS:
            raise UserError(f"{origin}: {prefix}name: unknown encoder {cfg.name!r}; choose one of "
                            f"{', '.join(ENCODERS)}")  # fmt: skip
        for key in ("max_length", "depth", "heads"):
            if getattr(cfg, key) < (2 if key == "max_length" else 1):
                raise UserError(f"{origin}: {prefix}{key} must be >= {2 if key == 'max_length' else 1}, "
                                f"got {getattr(cfg, key)}")  # fmt: skip
        if cfg.cache_size < 0:
            raise UserError(f"{origin}: {prefix}cache_size must be >= 0, got {cfg.cache_size}")
        return cfg

    @property
    def is_text(self) -> bool:
        return self.name != "class"


@dataclass
class LCMConfig:
    """A latent consistency student (Luo et al. 2023; ``condnoise distill lcm``): the width of
    its guidance embedding (:mod:`condnoise.models.guidance`; diffusers' ``time_cond_proj_dim``)
    and the N of the skipping-step grid it was distilled on (timesteps ``k-1, 2k-1, ..., T-1``,
    ``k = T // N``; the sampler's ``original_inference_steps``)."""

    w_embed_dim: int = 256  # diffusers' train_lcm_distill_sd_wds.py default
    solver_steps: int = 50  # LCM paper: skipping step k = 20 of T = 1000

    @classmethod
    def from_dict(cls, raw: Any, *, origin: str = "lcm", prefix: str = "lcm.") -> LCMConfig:
        cfg = raw if isinstance(raw, cls) else schema.build(cls, raw, origin, prefix)
        if cfg.w_embed_dim < 4:
            raise UserError(f"{origin}: {prefix}w_embed_dim must be >= 4, got {cfg.w_embed_dim}")
        if cfg.solver_steps < 1:
            raise UserError(f"{origin}: {prefix}solver_steps must be >= 1, got {cfg.solver_steps}")
        return cfg


@dataclass
class AdapterConfig:
    """A spatial-control adapter on the frozen base (``condnoise finetune``;
    :mod:`condnoise.models.adapters`): ControlNet or T2I-Adapter, the control's input
    channels and the image-to-denoiser downscale factor (1 in pixel space, f for an
    autoencoder of factor f)."""

    kind: Literal["controlnet", "t2i-adapter"] = "controlnet"
    control_channels: int = 1
    downscale: int = 1
    t2i_type: Literal["full", "light"] = "full"  # diffusers' full_adapter / light_adapter
    num_res_blocks: int = 2  # T2I-Adapter residual blocks per level (diffusers' default)

    @classmethod
    def from_dict(cls, raw: Any, *, origin: str = "adapter", prefix: str = "adapter.") -> AdapterConfig:
        cfg = raw if isinstance(raw, cls) else schema.build(cls, raw, origin, prefix)
        for key in ("control_channels", "downscale", "num_res_blocks"):
            if getattr(cfg, key) < 1:
                raise UserError(f"{origin}: {prefix}{key} must be >= 1, got {getattr(cfg, key)}")
        if cfg.downscale & (cfg.downscale - 1):
            raise UserError(f"{origin}: {prefix}downscale must be a power of 2, got {cfg.downscale}")
        return cfg


@dataclass
class ModelConfig:
    """Fields every family has; :meth:`from_dict` builds the family's subclass."""

    family: str = "dit"
    size: str | None = None  # null: the family's DEFAULT_SIZE
    learn_sigma: bool = False
    checkpointing: bool | int = False
    cond_dim: int | None = None
    embed_init_std: float | None = None
    cfg_dropout: float = 0.1
    encoder: EncoderConfig | None = None  # null: class labels
    perturbation: dict[str, Any] = field(default_factory=lambda: {"name": "none"})
    autoencoder: AutoencoderConfig | None = None
    latent_shape: list[int] | None = None
    lcm: LCMConfig | None = None  # null: a diffusion model; set: an LCM student
    adapter: AdapterConfig | None = None  # null: no adapter; set: a fine-tuned ControlNet / T2I-Adapter

    DEFAULT_SIZE: ClassVar[str] = ""
    DEFAULT_EMBED_STD: ClassVar[float] = 0.02

    @classmethod
    def from_dict(cls, raw: Any, *, origin: str = "model config", prefix: str = "model."
                  ) -> ModelConfig:  # fmt: skip
        """Build and validate the family's config from a flat mapping (or pass one through)."""
        if isinstance(raw, ModelConfig):
            return raw.validate(origin, prefix)
        raw = dict(raw or {}) if isinstance(raw, dict) or raw is None else raw
        if not isinstance(raw, dict):
            raise UserError(f"{origin}: section '{prefix.rstrip('.')}' must be a mapping, got {raw!r}")
        family = raw.get("family", "dit")
        if family not in FAMILIES:
            raise UserError(f"{origin}: model config field 'family': {family!r} unknown; choose "
                            f"one of {', '.join(FAMILIES)}")  # fmt: skip
        if raw.get("perturbation") is None or isinstance(raw.get("perturbation"), str):
            raw["perturbation"] = {"name": raw.get("perturbation") or "none"}
        label = f"{prefix.rstrip('.')} (family {family})"
        cfg = schema.build(FAMILIES[family], raw, origin, prefix, label=label)
        return cfg.validate(origin, prefix)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # ------------------------------------------------------------------ per family

    @staticmethod
    def sizes() -> list[str]:
        raise NotImplementedError

    def architecture(self) -> dict[str, Any]:
        """The denoiser's architecture settings: ``size``'s, then the overrides."""
        raise NotImplementedError

    def default_cond_dim(self, arch: dict[str, Any]) -> int:
        raise NotImplementedError

    def build_denoiser(self, *, in_channels: int, image_size: int, cond_dim: int | None = None) -> nn.Module:
        """The denoiser; ``cond_dim`` overrides the width (a frozen text encoder's)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ shared

    @property
    def size_name(self) -> str:
        return self.size or self.DEFAULT_SIZE

    def validate(self, origin: str = "model config", prefix: str = "model.") -> ModelConfig:
        """Range and choice checks (types were checked when building); returns self."""

        def bad(key: str, what: str) -> UserError:
            return UserError(f"{origin}: {prefix}{key} must be {what}, got {getattr(self, key)!r}")

        if self.size_name not in self.sizes():
            raise UserError(f"{origin}: {prefix}size: {self.size_name!r} unknown for "
                            f"{self.family}; choose one of {', '.join(self.sizes())}")  # fmt: skip
        if not 0.0 <= self.cfg_dropout < 1.0:
            raise bad("cfg_dropout", "in [0, 1)")
        if not isinstance(self.checkpointing, bool) and self.checkpointing < 0:
            raise bad("checkpointing", "true, false or a block count >= 0")
        if self.cond_dim is not None and self.cond_dim < 1:
            raise bad("cond_dim", "a positive integer or null")
        if self.latent_shape is not None and (len(self.latent_shape) != 3
                                              or min(self.latent_shape) < 1):  # fmt: skip
            raise bad("latent_shape", "[C, H, W] positive integers")
        if self.autoencoder is not None:
            AutoencoderConfig.from_dict(self.autoencoder, origin=origin, prefix=f"{prefix}autoencoder.")
        if self.encoder is not None:
            EncoderConfig.from_dict(self.encoder, origin=origin, prefix=f"{prefix}encoder.")
        if self.lcm is not None:
            LCMConfig.from_dict(self.lcm, origin=origin, prefix=f"{prefix}lcm.")
        if self.adapter is not None:
            from condnoise.models.adapters import check_family

            AdapterConfig.from_dict(self.adapter, origin=origin, prefix=f"{prefix}adapter.")
            try:
                check_family(self.family, f"{prefix}adapter: the model")
            except UserError as e:
                raise UserError(f"{origin}: {e}") from None
        if self.is_text and self.perturbation["name"] == "label-smoothing":
            raise UserError(f"{origin}: {prefix}perturbation label-smoothing needs class labels; "
                            f"{prefix}encoder.name is {self.encoder.name}")  # fmt: skip
        for key, value in self.architecture().items():
            if key in ("hidden", "depth", "heads", "patch", "layers_per_block", "norm_groups") \
                    and value < 1:  # fmt: skip
                raise bad(key, "a positive integer")
        if "name" not in self.perturbation:
            raise bad("perturbation", "a mapping with 'name'")
        try:
            build_perturbation(**self.perturbation)
        except UserError as e:
            raise UserError(f"{origin}: {prefix}perturbation: {e}") from None
        return self

    def resolved(self) -> dict[str, Any]:
        """Every setting with its default filled in (``model.config`` of a built model)."""
        arch = self.architecture()
        pert = dict(self.perturbation)
        built = build_perturbation(**pert)
        params = {"ip": built.input_perturbation} if pert["name"] == "ip" else built.params()
        return {
            "family": self.family, "size": self.size_name, **arch,
            "learn_sigma": self.learn_sigma, "checkpointing": self.resolved_checkpointing(),
            "cond_dim": self.cond_dim or self.default_cond_dim(arch),
            "embed_init_std": float(self.DEFAULT_EMBED_STD if self.embed_init_std is None
                                    else self.embed_init_std),
            "cfg_dropout": float(self.cfg_dropout),
            **({"encoder": dataclasses.asdict(self.encoder)} if self.encoder is not None else {}),
            "perturbation": {"name": pert["name"], **params},
            "autoencoder": None if self.autoencoder is None else dataclasses.asdict(self.autoencoder),
            "latent_shape": self.latent_shape,
            **({"lcm": dataclasses.asdict(self.lcm)} if self.lcm is not None else {}),
            **({"adapter": dataclasses.asdict(self.adapter)} if self.adapter is not None else {}),
        }  # fmt: skip

    def resolved_checkpointing(self) -> bool | int:
        return self.checkpointing

    @property
    def is_text(self) -> bool:
        """Whether the model conditions on captions (a text encoder)."""
        return self.encoder is not None and self.encoder.is_text

    def _common_kwargs(self, in_channels: int, image_size: int) -> dict[str, Any]:
        arch = self.architecture()
        return dict(in_channels=in_channels, image_size=image_size,
                    cond_dim=self.cond_dim or self.default_cond_dim(arch), text=self.is_text,
                    learn_sigma=self.learn_sigma, checkpointing=self.resolved_checkpointing(),
                    guidance_dim=self.lcm.w_embed_dim if self.lcm is not None else None)  # fmt: skip


@dataclass
class DiTConfig(ModelConfig):
    """Own DiT (adaLN-Zero on the condition vector, Peebles & Xie 2023; text models add a
    cross-attention layer on the tokens to every block)."""

    family: str = "dit"
    hidden: int | None = None
    depth: int | None = None
    heads: int | None = None
    patch: int | None = None
    mlp_ratio: float | None = None

    DEFAULT_SIZE: ClassVar[str] = "S/4"
    DEFAULT_EMBED_STD: ClassVar[float] = 0.02

    @staticmethod
    def sizes() -> list[str]:
        return dit_sizes()

    def architecture(self) -> dict[str, Any]:
        name, _, patch = self.size_name.partition("/")
        hidden, depth, heads = DIT_CONFIGS[name]
        arch: dict[str, Any] = dict(hidden=hidden, depth=depth, heads=heads, patch=int(patch),
                                    mlp_ratio=4.0)  # fmt: skip
        return arch | {k: getattr(self, k) for k in arch if getattr(self, k) is not None}

    def default_cond_dim(self, arch: dict[str, Any]) -> int:
        return arch["hidden"]

    def build_denoiser(self, *, in_channels: int, image_size: int, cond_dim: int | None = None) -> nn.Module:
        kw = self._common_kwargs(in_channels, image_size) | ({"cond_dim": cond_dim} if cond_dim else {})
        return DiT(**kw, **self.architecture())


@dataclass
class UNetConfig(ModelConfig):
    """diffusers ``UNet2DConditionModel`` cross-attending to the condition's tokens (LDM;
    a class is a one-token context)."""

    family: str = "unet"
    channels: list[int] | None = None
    attention: list[bool] | None = None
    layers_per_block: int | None = None
    heads: int | None = None
    norm_groups: int | None = None

    DEFAULT_SIZE: ClassVar[str] = "fmnist"
    DEFAULT_EMBED_STD: ClassVar[float] = 1.0

    @staticmethod
    def sizes() -> list[str]:
        return list(UNET_PRESETS)

    def architecture(self) -> dict[str, Any]:
        arch = {k: copy.deepcopy(v) for k, v in UNET_PRESETS[self.size_name].items() if k != "cond_dim"}
        return arch | {k: copy.deepcopy(getattr(self, k)) for k in arch if getattr(self, k) is not None}

    def validate(self, origin: str = "model config", prefix: str = "model.") -> ModelConfig:
        if self.channels is not None and (not self.channels or min(self.channels) < 1):
            raise UserError(f"{origin}: {prefix}channels must be a list of positive integers, "
                            f"got {self.channels!r}")  # fmt: skip
        return super().validate(origin, prefix)

    def resolved_checkpointing(self) -> bool | int:
        # diffusers' U-Net checkpoints all of its blocks or none
        return self.checkpointing if isinstance(self.checkpointing, bool) else self.checkpointing > 0

    def default_cond_dim(self, arch: dict[str, Any]) -> int:
        return UNET_PRESETS[self.size_name]["cond_dim"]

    def build_denoiser(self, *, in_channels: int, image_size: int, cond_dim: int | None = None) -> nn.Module:
        kw = self._common_kwargs(in_channels, image_size) | ({"cond_dim": cond_dim} if cond_dim else {})
        return UNet(**kw, **self.architecture())


@dataclass
class ConvUNetConfig(ModelConfig):
    """Convolutional U-Net (diffusers ``UNet2DConditionModel`` without attention), the class
    vector added to the time embedding (``models/conv_unet.py``)."""

    family: str = "conv-unet"
    channels: list[int] | None = None
    layers_per_block: int | None = None
    norm_groups: int | None = None
    class_embed: Literal["projection", "identity"] = "projection"

    DEFAULT_SIZE: ClassVar[str] = "xs"
    DEFAULT_EMBED_STD: ClassVar[float] = 1.0  # nn.Embedding's N(0, 1), as LDM's class embedder

    @staticmethod
    def sizes() -> list[str]:
        return list(CONV_UNET_PRESETS)

    def architecture(self) -> dict[str, Any]:
        arch = copy.deepcopy(CONV_UNET_PRESETS[self.size_name])
        arch |= {k: copy.deepcopy(getattr(self, k)) for k in arch if getattr(self, k) is not None}
        return arch | {"class_embed": self.class_embed}

    def validate(self, origin: str = "model config", prefix: str = "model.") -> ModelConfig:
        if self.channels is not None and (not self.channels or min(self.channels) < 1):
            raise UserError(f"{origin}: {prefix}channels must be a list of positive integers, "
                            f"got {self.channels!r}")  # fmt: skip
        cfg = super().validate(origin, prefix)
        arch = self.architecture()
        if self.class_embed == "identity" and self.cond_dim not in (None, time_embed_dim(arch["channels"])):
            raise UserError(f"{origin}: {prefix}cond_dim must be {time_embed_dim(arch['channels'])} "
                            f"(4 x channels[0]) with class_embed identity, got {self.cond_dim}")  # fmt: skip
        return cfg

    def resolved_checkpointing(self) -> bool | int:
        return self.checkpointing if isinstance(self.checkpointing, bool) else self.checkpointing > 0

    def default_cond_dim(self, arch: dict[str, Any]) -> int:
        return time_embed_dim(arch["channels"])

    def build_denoiser(self, *, in_channels: int, image_size: int, cond_dim: int | None = None) -> nn.Module:
        kw = self._common_kwargs(in_channels, image_size) | ({"cond_dim": cond_dim} if cond_dim else {})
        return ConvUNet(**kw, **self.architecture())


#: family name -> its config class (the one registry of denoiser families)
FAMILIES: dict[str, type[ModelConfig]] = {"dit": DiTConfig, "unet": UNetConfig,
                                          "conv-unet": ConvUNetConfig}  # fmt: skip


def resolve_model_config(model_cfg: dict[str, Any] | ModelConfig) -> dict[str, Any]:
    """Validate a model config and return it with every default filled in (UserError on bad input)."""
    return ModelConfig.from_dict(model_cfg).resolved()


def model_choices() -> dict[str, Any]:
    """Valid values of every choice field of the model config (for error messages / docs)."""
    shared = {f.name for f in dataclasses.fields(ModelConfig)}
    return {
        "family": list(FAMILIES),
        "size": {name: cls.sizes() for name, cls in FAMILIES.items()},
        "overrides": {name: [f.name for f in dataclasses.fields(cls) if f.name not in shared]
                      for name, cls in FAMILIES.items()},  # fmt: skip
        "perturbation": perturbation_choices(),
        "encoder": list(ENCODERS),
        "autoencoder": ["identity", "kl", "vq"],
    }
