"""Training configuration: presets, YAML files, dotted ``key=value`` overrides, validation.

A config has five sections (``data``, ``model``, ``diffusion``, ``train``, ``run``), plus
``distill`` in a distilled student's run (``condnoise distill lcm``) and ``finetune`` in a
ControlNet / T2I-Adapter run (``condnoise finetune``; null otherwise), each a
typed dataclass with defaults built by :func:`condnoise.schema.build`; the ``model``
section's classes belong to :mod:`condnoise.models.config` (one per denoiser family).
Every error is a one-line :class:`~condnoise.errors.UserError` naming the field and the
valid options.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from condnoise import schema
from condnoise.errors import UserError
from condnoise.models.config import DiTConfig, ModelConfig

PRESET_PACKAGE = "condnoise.presets"


@dataclass
class DataConfig:
    """Where the training images and conditions come from (``condnoise.data``)."""

    source: str = "fashion-mnist"  # open_source spec: fashion-mnist, digits, imagefolder:..., wds:...
    split: str = "train"
    image_size: int | None = 32
    data_dir: str | None = None
    corruption: str | None = None  # manifest folder written by `condnoise corrupt`
    max_samples: int | None = None  # use only the first N samples (quick experiments)
    latents: str | None = None  # latent cache folder (`condnoise latents extract`): read, not encode


@dataclass
class DiffusionConfig:
    """Forward process and loss (paper section 4: linear betas, 1000 steps, eps-prediction)."""

    schedule: str = "linear"  # condnoise.diffusion.schedule.SCHEDULES: linear, scaled-linear, cosine
    num_steps: int = 1000
    beta_start: float | None = None  # null: the schedule's default
    beta_end: float | None = None
    prediction: Literal["eps", "v"] = "eps"  # the model's output (v: Salimans & Ho 2022)
    loss_weighting: Literal["none", "min-snr"] = "none"  # min-snr: Hang et al. 2023
    min_snr_gamma: float = 5.0  # gamma of min-SNR weighting (their default)
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
class DistillConfig:
    """Latent consistency distillation of a student run (Luo et al. 2023; ``training/distill.py``).

    The student's other settings are its ``model`` (``lcm``: guidance-embedding width and
    skipping-step grid; ``perturbation``: CEP on the student's condition) and ``train``
    (optimizer, ``ema_decay`` = the target network's EMA rate) sections."""

    method: Literal["lcm"] = "lcm"
    teacher: str = ""  # the teacher's run directory (absolute)
    teacher_step: int | None = None  # the teacher checkpoint (resolved when the run starts)
    teacher_weights: Literal["ema", "model"] = "ema"
    guidance_min: float = 1.0  # CFG scale s drawn uniformly from [min, max] (LCM's w = s - 1)
    guidance_max: float = 3.0
    loss: Literal["l2", "huber"] = "l2"
    huber_c: float = 0.001  # pseudo-Huber c (diffusers' default)


@dataclass
class FinetuneConfig:
    """Spatial-control fine-tuning of a frozen base run (``condnoise finetune``;
    ``training/finetune.py``): which base checkpoint and which control. The adapter's
    architecture is ``model.adapter``; CEP during fine-tuning is ``model.perturbation``."""

    base: str = ""  # the base run directory (absolute)
    base_step: int | None = None  # the base checkpoint (resolved when the run starts)
    base_weights: Literal["ema", "model"] = "ema"
    control: Literal["canny", "mask"] = "canny"
    canny_low: float = 100.0  # OpenCV Canny thresholds (the paper: 100 / 200)
    canny_high: float = 200.0


@dataclass
class Config:
    """The resolved training config (what ``config.yaml`` in a run directory holds)."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=DiTConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)
    distill: DistillConfig | None = None  # a distilled student's run (condnoise distill)
    finetune: FinetuneConfig | None = None  # a ControlNet / T2I-Adapter run (condnoise finetune)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self, origin: str = "config") -> Config:
        """Check value ranges and cross-field choices (and the model section); return self."""
        _check_ranges(self, origin)
        self.model.validate(origin)
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @property
    def perturbation_name(self) -> str:
        return str(self.model.perturbation.get("name", "none"))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], *, origin: str = "config") -> Config:
        """Validate a nested mapping; unknown keys / wrong types raise ``UserError``. The
        model section has defaults, but a config must name its model."""
        if isinstance(raw, dict) and not raw.get("model"):
            raise UserError(f"{origin}: the 'model' section is missing or empty")
        return schema.build(cls, raw, origin, "")


# --------------------------------------------------------------------------- validation


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
    nonneg = {"train.warmup": t.warmup, "train.sample_every": t.sample_every, "train.seed": t.seed,
              "train.num_workers": t.num_workers, "train.weight_decay": t.weight_decay}  # fmt: skip
    for key, value in nonneg.items():
        if value < 0:
            raise UserError(f"{origin}: {key} must be >= 0, got {value}")
    if not t.lr > 0:
        raise UserError(f"{origin}: train.lr must be > 0, got {t.lr}")
    if not cfg.diffusion.min_snr_gamma > 0:
        raise UserError(f"{origin}: diffusion.min_snr_gamma must be > 0, got {cfg.diffusion.min_snr_gamma}")
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
    if t.sample_sampler == "lcm" and cfg.model.lcm is None:
        raise UserError(f"{origin}: train.sample_sampler lcm samples LCM students only (model.lcm); "
                        "choose ddpm, ddim or dpm++")  # fmt: skip
    if t.sample_sampler == "lcm" and t.sample_steps > cfg.model.lcm.solver_steps:  # type: ignore[union-attr]
        raise UserError(f"{origin}: train.sample_steps {t.sample_steps} > model.lcm.solver_steps "
                        f"{cfg.model.lcm.solver_steps}: an LCM student samples in at most that many "  # type: ignore[union-attr]
                        "steps")  # fmt: skip
    if cfg.model.lcm is not None and cfg.model.lcm.solver_steps > cfg.diffusion.num_steps:
        raise UserError(f"{origin}: model.lcm.solver_steps must be <= diffusion.num_steps "
                        f"{cfg.diffusion.num_steps}, got {cfg.model.lcm.solver_steps}")  # fmt: skip
    if cfg.distill is not None:
        check_distill(cfg.distill, origin)
    if cfg.finetune is not None:
        f = cfg.finetune
        if not 0 <= f.canny_low <= f.canny_high:
            raise UserError(f"{origin}: finetune.canny_low / canny_high must satisfy 0 <= low <= high, "
                            f"got {f.canny_low:g} and {f.canny_high:g}")  # fmt: skip
        if f.base_step is not None and f.base_step < 0:
            raise UserError(f"{origin}: finetune.base_step must be >= 0, got {f.base_step}")
        if cfg.model.adapter is None:
            raise UserError(f"{origin}: a finetune section needs model.adapter (the adapter's architecture)")
    from condnoise.diffusion.schedule import SCHEDULES

    if cfg.diffusion.schedule not in SCHEDULES:
        raise UserError(
            f"{origin}: diffusion.schedule: invalid value {cfg.diffusion.schedule!r}; valid "
            "options: " + ", ".join(SCHEDULES)
        )


def check_distill(d: DistillConfig, origin: str) -> None:
    """Ranges of a distill section (guidance range, Huber c, teacher step)."""
    if not 0.0 <= d.guidance_min <= d.guidance_max <= 100.0:
        raise UserError(f"{origin}: distill.guidance_min / guidance_max must satisfy 0 <= min <= max "
                        f"<= 100, got {d.guidance_min:g} and {d.guidance_max:g}")  # fmt: skip
    if not d.huber_c > 0:
        raise UserError(f"{origin}: distill.huber_c must be > 0, got {d.huber_c}")
    if d.teacher_step is not None and d.teacher_step < 0:
        raise UserError(f"{origin}: distill.teacher_step must be >= 0, got {d.teacher_step}")


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
        raise UserError(f"invalid YAML in {origin}: {_yaml_message(e)}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{origin}: expected a mapping of sections at the top level")
    return raw


def _yaml_message(e: yaml.YAMLError) -> str:
    """One line: the problem and where (``line L column C``, 1-based)."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    where = f" at line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
    return f"{problem}{where}"


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


def load_config(preset_or_yaml: str, overrides: list[str] | None = None) -> Config:
    """Load a preset name or YAML file, apply ``key=value`` overrides, validate (bad model
    options fail here, with a clear message, rather than after the data is loaded)."""
    raw, origin, default_name = resolve_source(preset_or_yaml)
    raw = apply_overrides(raw, overrides)
    cfg = Config.from_dict(raw, origin=origin)
    if cfg.run.name is None:
        cfg.run.name = default_name
    return cfg.validate(origin)


def config_from_yaml_text(text: str, origin: str) -> Config:
    """Rebuild a saved (resolved) config, e.g. a run directory's ``config.yaml``."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise UserError(f"invalid YAML in {origin}: {_yaml_message(e)}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{origin}: expected a mapping of sections at the top level")
    cfg = Config.from_dict(raw, origin=origin)
    _check_ranges(cfg, origin)
    return cfg
