"""Training configuration: presets, YAML files, dotted ``key=value`` overrides, validation.

A config has five sections (``data``, ``model``, ``diffusion``, ``train``, ``run``). The
``data``/``diffusion``/``train``/``run`` sections are typed dataclasses validated here;
the ``model`` section is a plain mapping whose schema belongs to ``condnoise.models``
(it is checked by building the model on the ``meta`` device, see ``validate_model``).
Every error is a one-line :class:`~condnoise.errors.UserError` naming the field and the
valid options.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from condnoise.errors import UserError

PRESET_PACKAGE = "condnoise.presets"
#: model-section keys read by the trainer, not by ``build_model``: the frozen autoencoder
#: ({kind: identity|kl|vq, path, scaling_factor}) and the declared latent shape [C, H, W]
MODEL_TRAINER_KEYS = ("autoencoder", "latent_shape")
AE_KINDS = ("identity", "kl", "vq")


@dataclass
class DataConfig:
    """Where the training images and conditions come from (``condnoise.data``)."""

    source: str = "fashion-mnist"  # open_source spec: fashion-mnist, digits, imagefolder:..., wds:...
    split: str = "train"
    image_size: int | None = 32
    data_dir: str | None = None
    corruption: str | None = None  # manifest folder written by `condnoise corrupt`
    max_samples: int | None = None  # use only the first N samples (quick experiments)


@dataclass
class DiffusionConfig:
    """Forward process and loss (paper section 4: linear betas, 1000 steps, eps-prediction)."""

    schedule: str = "linear"  # condnoise.diffusion.schedule.SCHEDULES: linear, scaled-linear, cosine
    num_steps: int = 1000
    beta_start: float | None = None  # null: the schedule's default
    beta_end: float | None = None
    # CFG dropout (model.cfg_dropout) and input perturbation (model.perturbation.ip, or
    # --perturb ip) belong to the model section: the model applies them in training mode.


@dataclass
class TrainConfig:
    """Optimisation, EMA, precision, checkpointing and logging cadence."""

    steps: int = 2000
    batch_size: int = 128  # global batch per optimizer step (all ranks x grad_accum)
    lr: float = 1e-4
    warmup: int = 0  # linear LR warm-up steps
    lr_schedule: Literal["constant", "cosine"] = "constant"
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float | None = 1.0  # max global grad norm; null disables
    ema_decay: float = 0.9999
    ema_warmup: bool = True  # decay_t = min(ema_decay, (1 + t) / (10 + t))
    grad_accum: int = 1
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on GPU
    compile: bool = False
    seed: int = 0
    ckpt_every: int = 500
    keep_last: int = 3
    sample_every: int = 500  # 0 disables sample grids
    sample_steps: int = 50
    sample_sampler: str = "ddim"
    sample_guidance: float = 2.0
    sample_per_class: int = 8
    log_every: int = 1
    num_workers: int = 0
    threads: int | None = None  # torch CPU threads; null keeps torch's default


@dataclass
class RunConfig:
    """Run bookkeeping."""

    name: str | None = None  # defaults to the preset / YAML file name
    dir: str | None = None  # defaults to runs/<name>-<perturbation>-s<seed>
    tensorboard: bool = True  # write TensorBoard scalars when tensorboard is installed
    progress: bool = True


@dataclass
class Config:
    """The resolved training config (what ``config.yaml`` in a run directory holds)."""

    data: DataConfig = field(default_factory=DataConfig)
    model: dict[str, Any] = field(default_factory=dict)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self, origin: str = "config", *, model: bool = True) -> Config:
        """Check value ranges and cross-field choices (and the model section); return self."""
        _check_ranges(self, origin)
        if model:
            check_model_config(self, origin)
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @property
    def perturbation_name(self) -> str:
        pert = self.model.get("perturbation") or {}
        return str(pert.get("name", "none")) if isinstance(pert, dict) else str(pert)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], *, origin: str = "config") -> Config:
        """Validate a nested mapping; unknown keys / wrong types raise ``UserError``."""
        return _build(cls, raw, origin, "")


# --------------------------------------------------------------------------- validation


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        return getattr(origin, "__name__", str(tp))
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Return ``value`` checked against / converted to the annotation ``tp``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except UserError:
                continue
        raise UserError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise UserError(
                f"{where}: invalid value {value!r}; valid options: "
                + ", ".join(str(a) for a in args)
            )
        return value
    if origin is list:
        if not isinstance(value, list | tuple):
            raise UserError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"{where}: expected a mapping, got {value!r}")
        return copy.deepcopy(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise UserError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise UserError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise UserError(f"{where}: expected a string, got {value!r}")
    raise TypeError(f"unsupported config annotation {tp!r}")  # programming error


def _build(cls: type, raw: Any, origin: str, prefix: str) -> Any:
    label = prefix.rstrip(".") or "top level"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"{origin}: section '{label}' must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise UserError(
            f"{origin}: unknown key '{prefix}{unknown[0]}'; valid keys in {label}: "
            + ", ".join(fields)
        )
    kwargs = {}
    for name, value in raw.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, origin, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, tp, f"{origin}: {prefix}{name}")
    return cls(**kwargs)


def _check_ranges(cfg: Config, origin: str) -> None:
    t = cfg.train
    positive = {
        "train.steps": t.steps, "train.batch_size": t.batch_size, "train.grad_accum": t.grad_accum,
        "train.ckpt_every": t.ckpt_every, "train.keep_last": t.keep_last,
        "train.log_every": t.log_every, "train.sample_steps": t.sample_steps,
        "train.sample_per_class": t.sample_per_class, "diffusion.num_steps": cfg.diffusion.num_steps,
        "train.threads": t.threads or 1,
    }  # fmt: skip
    for key, value in positive.items():
        if value < 1:
            raise UserError(f"{origin}: {key} must be >= 1, got {value}")
    nonneg = {"train.warmup": t.warmup, "train.sample_every": t.sample_every,
              "train.num_workers": t.num_workers, "train.weight_decay": t.weight_decay}  # fmt: skip
    for key, value in nonneg.items():
        if value < 0:
            raise UserError(f"{origin}: {key} must be >= 0, got {value}")
    if not t.lr > 0:
        raise UserError(f"{origin}: train.lr must be > 0, got {t.lr}")
    if not 0.0 <= t.ema_decay < 1.0:
        raise UserError(f"{origin}: train.ema_decay must be in [0, 1), got {t.ema_decay}")
    if len(t.betas) != 2 or not all(0.0 <= b < 1.0 for b in t.betas):
        raise UserError(f"{origin}: train.betas must be two numbers in [0, 1), got {t.betas}")
    if t.grad_clip is not None and t.grad_clip <= 0:
        raise UserError(f"{origin}: train.grad_clip must be > 0 or null, got {t.grad_clip}")
    if t.batch_size % t.grad_accum:
        raise UserError(
            f"{origin}: train.batch_size={t.batch_size} is not divisible by "
            f"train.grad_accum={t.grad_accum}"
        )
    from condnoise.diffusion.samplers import SAMPLERS

    if t.sample_sampler not in SAMPLERS:
        raise UserError(
            f"{origin}: train.sample_sampler: invalid value {t.sample_sampler!r}; valid options: "
            + ", ".join(SAMPLERS)
        )
    from condnoise.diffusion.schedule import SCHEDULES

    if cfg.diffusion.schedule not in SCHEDULES:
        raise UserError(
            f"{origin}: diffusion.schedule: invalid value {cfg.diffusion.schedule!r}; valid "
            "options: " + ", ".join(SCHEDULES)
        )
    if not isinstance(cfg.model, dict) or not cfg.model:
        raise UserError(f"{origin}: the 'model' section is missing or empty")


# --------------------------------------------------------------------------- loading


def list_presets() -> list[str]:
    """Names of the training presets shipped in ``condnoise/presets/*.yaml``."""
    root = resources.files(PRESET_PACKAGE)
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))


def _read_yaml(path: Path | Any, origin: str) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise UserError(f"cannot read config {origin}: {e}") from None
    except yaml.YAMLError as e:
        msg = str(e).replace("\n", " ")
        raise UserError(f"invalid YAML in {origin}: {msg}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{origin}: expected a mapping of sections at the top level")
    return raw


def resolve_source(preset_or_yaml: str) -> tuple[dict[str, Any], str, str]:
    """Return (raw mapping, origin label, default run name) for a preset name or YAML path."""
    path = Path(preset_or_yaml)
    if preset_or_yaml.endswith((".yaml", ".yml")) or path.is_file():
        if not path.is_file():
            raise UserError(f"config file not found: {preset_or_yaml}")
        return _read_yaml(path, str(path)), str(path), path.stem
    presets = list_presets()
    if preset_or_yaml not in presets:
        raise UserError(
            f"unknown preset '{preset_or_yaml}' (and no such YAML file); presets: "
            + ", ".join(presets)
        )
    res = resources.files(PRESET_PACKAGE) / f"{preset_or_yaml}.yaml"
    return _read_yaml(res, f"preset {preset_or_yaml}"), f"preset {preset_or_yaml}", preset_or_yaml


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"train.lr=2e-4"`` -> (["train", "lr"], 2e-4); the value is parsed as YAML."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise UserError(f"bad override {item!r}: expected section.key=value, e.g. train.lr=2e-4")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    return key.split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Apply dotted overrides to a copy of ``raw`` (sections are created on demand)."""
    out = copy.deepcopy(raw)
    for item in overrides or []:
        keys, value = parse_override(item)
        node = out
        for i, k in enumerate(keys[:-1]):
            child = node.get(k)
            if child is None:
                child = node[k] = {}
            elif not isinstance(child, dict):
                where = ".".join(keys[: i + 1])
                raise UserError(f"bad override {item!r}: '{where}' is a value, not a section")
            node = child
        node[keys[-1]] = value
    return out


def load_config(
    preset_or_yaml: str, overrides: list[str] | None = None, *, validate_model: bool = True
) -> Config:
    """Load a preset name or YAML file, apply ``key=value`` overrides, validate.

    ``validate_model`` also builds the model on the ``meta`` device so that bad model
    options fail here, with a clear message, rather than after the data is loaded.
    """
    raw, origin, default_name = resolve_source(preset_or_yaml)
    raw = apply_overrides(raw, overrides)
    cfg = Config.from_dict(raw, origin=origin)
    if cfg.run.name is None:
        cfg.run.name = default_name
    return cfg.validate(origin, model=validate_model)


def config_from_yaml_text(text: str, origin: str) -> Config:
    """Rebuild a saved (resolved) config, e.g. a run directory's ``config.yaml``."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise UserError(f"invalid YAML in {origin}: {e}") from None
    cfg = Config.from_dict(raw, origin=origin)
    _check_ranges(cfg, origin)
    return cfg


def check_model_config(cfg: Config, origin: str) -> None:
    """Validate ``cfg.model`` (``condnoise.models.resolve_model_config`` and the autoencoder)."""
    from condnoise.models import resolve_model_config

    model_cfg = {k: v for k, v in cfg.model.items() if k not in MODEL_TRAINER_KEYS}
    try:
        resolve_model_config(model_cfg)
    except UserError as e:
        raise UserError(f"{origin}: model: {e}") from None
    ae = cfg.model.get("autoencoder")
    if ae is not None and (not isinstance(ae, dict) or ae.get("kind", "identity") not in AE_KINDS):
        raise UserError(
            f"{origin}: model.autoencoder must be a mapping with kind one of "
            f"{', '.join(AE_KINDS)} (and path, scaling_factor), got {ae!r}"
        )
    shape = cfg.model.get("latent_shape")
    if shape is not None and (
        not isinstance(shape, list) or len(shape) != 3
        or not all(isinstance(v, int) and v > 0 for v in shape)
    ):
        raise UserError(f"{origin}: model.latent_shape must be [C, H, W] positive integers, got {shape!r}")
