"""Study specification: load a preset or YAML file, validate it, expand the variants.

A study trains one model per (variant, architecture, seed), where a variant is a data
corruption (paper section 2) and / or a training-side perturbation (section 3), samples
each model over a guidance sweep and evaluates every sample set (section 5). Presets live
in ``condnoise/study/presets/*.yaml``; the README's "Study files" paragraph lists every
field. An architecture may name a training preset (``{preset: in1k-dit-xl2}``): the
study then takes that preset's ``model`` section and its ``diffusion`` / ``train``
sections as the architecture's trainer defaults, so a recipe is written once.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from condnoise.errors import UserError
from condnoise.locks import DEFAULT_STALE_AFTER
from condnoise.study import derived
from condnoise.study.derived import METHODS, TRAINED
from condnoise.study.text import CAPTION_KINDS, CLASS_KINDS
from condnoise.training.config import apply_overrides

CORRUPTION_KINDS = (*CLASS_KINDS, *CAPTION_KINDS)
TOP_LEVEL = {
    "name", "description", "data", "seeds", "architectures", "variants", "corruption_grid",
    "ablation", "train", "sample", "evaluate", "report", "cost", "out_dir", "slurm",
    "lock_timeout", "step_sweep", "autoencoder", *METHODS,
}  # fmt: skip
SAMPLE_KEYS = {"sampler", "steps", "num_samples", "guidance", "batch_size", "clip_x0",
               "captions_from", "captions_data"}  # the last two: text studies (study/text.py)
EVALUATE_KEYS = {
    "extractors", "metrics", "reference_split", "reference_samples", "train_samples", "shrinkage",
    "reference", "entropy_tau", "entropy_pool",
}  # fmt: skip
REPORT_KEYS = {"walks", "theory", "grid_per_class", "walk_frames"}
DATA_KEYS = {"source", "image_size", "data_dir", "max_samples"}


@dataclass(frozen=True)
class Variant:
    """One recipe: a model trained from data (optional fixed data corruption + perturbation +
    overrides), or made from a parent variant's model by a derived method
    (:mod:`condnoise.study.derived`: ``distill``)."""

    name: str
    corruption: dict[str, Any] | None = None  # {"kind": "symmetric", "eta": 0.05, ...}
    perturbation: dict[str, Any] = field(default_factory=lambda: {"name": "none"})
    train: dict[str, Any] = field(default_factory=dict)  # trainer config sections to merge
    architectures: tuple[str, ...] | None = None  # None: every architecture of the study
    method: str = TRAINED  # how its model is made: "train" or a derived method ("distill")
    parent: str | None = None  # derived: the variant whose model it starts from (the teacher)
    settings: dict[str, Any] = field(default_factory=dict)  # derived: the method's settings

    @property
    def eta(self) -> float:
        return float(self.corruption["eta"]) if self.corruption else 0.0

    @property
    def kind(self) -> str:
        """``clean``, a corruption kind, the perturbation name (IP is ``ip``) or, for a
        derived variant, its method (``distill``)."""
        if self.method != TRAINED:
            return self.method
        if self.corruption:
            return str(self.corruption["kind"])
        return str(self.perturbation["name"]) if self.perturbation["name"] != "none" else "clean"

    def as_dict(self) -> dict[str, Any]:
        out = {
            "name": self.name,
            "corruption": self.corruption,
            "perturbation": self.perturbation,
            "train": self.train,
        }
        if self.method != TRAINED:
            out.update(method=self.method, parent=self.parent, settings=self.settings)
        return out


@dataclass
class StudySpec:
    name: str
    description: str
    data: dict[str, Any]
    seeds: list[int]
    architectures: dict[str, dict[str, Any]]
    variants: list[Variant]
    train: dict[str, Any]
    sample: dict[str, Any]
    evaluate: dict[str, Any]
    report: dict[str, Any]
    cost: dict[str, float]
    source: str  # the preset name or file it came from
    out_dir: str | None = None
    raw: dict[str, Any] = field(default_factory=dict)
    #: architecture -> trainer sections of the training preset it names (may be empty)
    arch_train: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: stage (or ``default``) -> SLURM resources (``study.slurm``); never part of cell keys
    slurm: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: seconds without a heartbeat after which another worker takes a cell's lock over
    lock_timeout: float = DEFAULT_STALE_AFTER
    #: few-step models and their parents: ``{steps: [...], guidance: [...]}`` (derived.py)
    step_sweep: dict[str, Any] | None = None
    #: the study's autoencoder cell (``condnoise.study.latent``): ``{config, quantize}``
    autoencoder: dict[str, Any] | None = None
    #: architectures whose model.autoencoder is the study's (``autoencoder: study``)
    latent_archs: tuple[str, ...] = ()

    def resolved(self) -> dict[str, Any]:
        """The fully expanded study, as written to ``STUDY_DIR/study.yaml``."""
        return {
            "name": self.name,
            "description": self.description,
            "data": self.data,
            "seeds": self.seeds,
            "architectures": self.architectures,
            "architecture_train": self.arch_train,
            "variants": [
                {**v.as_dict(), "architectures": list(v.architectures or self.architectures)}
                for v in self.variants
            ],
            "train": self.train,
            "sample": self.sample,
            "evaluate": self.evaluate,
            "report": self.report,
            "cost": self.cost,
            "slurm": self.slurm,
            "lock_timeout": self.lock_timeout,
            "step_sweep": self.step_sweep,
            "autoencoder": self.autoencoder,
        }


def preset_names() -> list[str]:
    folder = resources.files("condnoise.study") / "presets"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _read_yaml(text: str, where: str) -> dict[str, Any]:
    try:
        obj = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise UserError(f"{where}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{where}: a study file must be a YAML mapping at the top level")
    return obj


def load_study(preset_or_path: str, overrides: list[str] | None = None) -> StudySpec:
    """Load a preset by name (``fmnist-quick``) or a YAML file path, apply dotted
    ``field.path=value`` overrides (YAML values, as ``condnoise train``), then validate it."""
    path = Path(preset_or_path)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise UserError(f"study file {path} does not exist")
        raw, where = _read_yaml(path.read_text(), str(path)), str(path)
    else:
        names = preset_names()
        if preset_or_path not in names:
            raise UserError(
                f"unknown study preset {preset_or_path!r}; choose one of {', '.join(names)} "
                "or give a path to a .yaml file"
            )
        res = resources.files("condnoise.study") / "presets" / f"{preset_or_path}.yaml"
        raw, where = _read_yaml(res.read_text(), f"preset {preset_or_path}"), preset_or_path
    return validate(apply_overrides(raw, overrides), where)


def _need(cond: bool, where: str, msg: str) -> None:
    if not cond:
        raise UserError(f"{where}: {msg}")


def _mapping(raw: dict[str, Any], key: str, where: str, allowed: set[str] | None) -> dict:
    val = raw.get(key) or {}
    _need(isinstance(val, dict), where, f"field '{key}' must be a mapping")
    if allowed is not None:
        unknown = sorted(set(val) - allowed)
        _need(not unknown, where, f"unknown field(s) {unknown} in '{key}'; allowed: {sorted(allowed)}")
    return copy.deepcopy(val)


def _check_corruption(c: Any, where: str) -> dict[str, Any]:
    _need(isinstance(c, dict), where, f"corruption must be a mapping, got {c!r}")
    _need(c.get("kind") in CORRUPTION_KINDS, where,
          f"corruption.kind {c.get('kind')!r} must be one of {CORRUPTION_KINDS}")  # fmt: skip
    eta = c.get("eta")
    _need(isinstance(eta, int | float) and 0 <= eta < 1, where,
          f"corruption.eta {eta!r} must be a fraction in [0, 1) (5% is 0.05)")  # fmt: skip
    return dict(c)


def _check_perturbation(p: Any, where: str) -> dict[str, Any]:
    """A perturbation mapping, checked by the conditioning stage's own registry."""
    from condnoise.conditioning.perturb import build_perturbation, perturbation_choices

    if p is None:
        return {"name": "none"}
    if isinstance(p, str):
        p = {"name": p}
    names = tuple(perturbation_choices())
    _need(isinstance(p, dict) and p.get("name") in names, where,
          f"perturbation {p!r} must name one of {names}")  # fmt: skip
    try:
        build_perturbation(**p)
    except UserError as e:
        raise UserError(f"{where}: {e}") from None
    return dict(p)


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge (``over`` wins); inputs are not modified."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _fmt_pct(eta: float) -> str:
    return f"{eta * 100:g}%"


def _expand_variants(raw: dict[str, Any], where: str) -> list[Variant]:
    """``variants``, then the ``corruption_grid`` and ``ablation`` expansions, de-duplicated."""
    out = _listed_variants(raw, where) + _grid_variants(raw, where) + _ablation_variants(raw, where)
    # Identical recipes listed twice (e.g. gamma=1 in the ablation and in the headline
    # variants) are trained once, under the first name; one name for two recipes is an error.
    seen: dict[str, Variant] = {}
    recipes: set[str] = set()
    for v in out:
        if v.name in seen and seen[v.name].as_dict() != v.as_dict():
            raise UserError(f"{where}: variant name {v.name!r} is used for two different recipes")
        recipe = repr({k: x for k, x in v.as_dict().items() if k != "name"})
        if recipe in recipes:
            continue
        recipes.add(recipe)
        seen.setdefault(v.name, v)
    _need(bool(seen), where, "no variants: give 'variants', 'corruption_grid' or 'ablation'")
    return list(seen.values())


def _listed_variants(raw: dict[str, Any], where: str) -> list[Variant]:
    out = []
    for i, v in enumerate(raw.get("variants") or []):
        w = f"{where}: variants[{i}]"
        if isinstance(v, str):
            v = {"name": v}
        _need(isinstance(v, dict) and isinstance(v.get("name"), str), w, "needs a 'name'")
        unknown = sorted(set(v) - {"name", "corruption", "perturbation", "train", "architectures",
                                   *METHODS})  # fmt: skip
        _need(not unknown, w, f"unknown field(s) {unknown}")
        archs = v.get("architectures")
        method = derived.method_of(v, w)
        if method is not None:
            parent, settings = derived.parse(v, method, raw.get(method.name), w)
            out.append(Variant(name=v["name"], method=method.name, parent=parent, settings=settings,
                               architectures=tuple(archs) if archs else None))  # fmt: skip
            continue
        corr = _check_corruption(v["corruption"], w) if v.get("corruption") else None
        tr = v.get("train") or {}
        _need(isinstance(tr, dict) and set(tr) <= {"diffusion", "train"}, w,
              f"'train' {tr!r} may only hold the trainer sections 'diffusion' and 'train'")  # fmt: skip
        out.append(Variant(
            name=v["name"], corruption=corr if corr and corr["eta"] != 0 else None,
            perturbation=_check_perturbation(v.get("perturbation"), w), train=dict(tr),
            architectures=tuple(archs) if archs else None,
        ))  # fmt: skip
    return out


def _expansion(raw: dict[str, Any], key: str, lists: tuple[str, str], where: str
               ) -> tuple[dict[str, Any], str] | None:  # fmt: skip
    """The mapping ``raw[key]`` (None when absent) and its place for messages; it must
    hold both ``lists``."""
    block = raw.get(key)
    if not block:
        return None
    w = f"{where}: {key}"
    _need(isinstance(block, dict) and set(lists) <= set(block), w,
          f"needs '{lists[0]}' and '{lists[1]}' lists")  # fmt: skip
    return block, w


def _grid_variants(raw: dict[str, Any], where: str) -> list[Variant]:
    """``corruption_grid: {kinds, etas, ...}``: one variant per kind and non-zero eta."""
    found = _expansion(raw, "corruption_grid", ("kinds", "etas"), where)
    if found is None:
        return []
    grid, w = found
    extra = {k: v for k, v in grid.items() if k not in ("kinds", "etas")}
    out = []
    for kind in grid["kinds"]:
        for eta in grid["etas"]:
            c = _check_corruption({"kind": kind, "eta": eta, **extra}, w)
            if eta != 0:  # the clean model is its own variant
                short = kind if kind in CAPTION_KINDS else kind[:4]  # caption kinds in full
                out.append(Variant(name=f"{short}-{_fmt_pct(eta)}", corruption=c))
    return out


def _ablation_variants(raw: dict[str, Any], where: str) -> list[Variant]:
    """``ablation: {perturbations, gammas}``: one variant per perturbation and gamma."""
    found = _expansion(raw, "ablation", ("perturbations", "gammas"), where)
    if found is None:
        return []
    abl, w = found
    return [Variant(name=f"{p}-g{g:g}", perturbation=_check_perturbation({"name": p, "gamma": g}, w))
            for p in abl["perturbations"] for g in abl["gammas"]]  # fmt: skip


def _architectures(raw: dict[str, Any], where: str, autoencoder: dict[str, Any] | None
                   ) -> tuple[dict, dict, tuple[str, ...]]:  # fmt: skip
    """``architectures`` resolved (training-preset references expanded, ``autoencoder:
    study`` replaced by the study's autoencoder, :mod:`condnoise.study.latent`) and
    validated by the models stage's typed config; each one's trainer sections from its
    preset; the names of those on the study's autoencoder."""
    from condnoise.models.config import ModelConfig
    from condnoise.study import latent

    archs = _mapping(raw, "architectures", where, None)
    _need(bool(archs), where, "'architectures' must map a name to a model config (e.g. dit: {...})")
    models, trainer, on_study_ae = {}, {}, []
    for a, cfg in archs.items():
        w = f"{where}: architectures.{a}"
        _need(isinstance(cfg, dict), w, "must be a model config mapping or {preset: NAME}")
        _need("perturbation" not in cfg, w, "set perturbations in 'variants', not in the model config")
        models[a], trainer[a] = _from_training_preset(cfg)
        if models[a].get("autoencoder") == latent.STUDY:
            models[a].update(latent.model_autoencoder(autoencoder, a, where))
            on_study_ae.append(a)
        ModelConfig.from_dict(models[a], origin=w, prefix="")
    _need(autoencoder is None or bool(on_study_ae), where,
          "the study trains an 'autoencoder' but no architecture uses it (autoencoder: study)")  # fmt: skip
    return models, trainer, tuple(on_study_ae)


def _from_training_preset(cfg: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``{preset: NAME, **overrides}`` -> (the preset's model section with the overrides,
    its ``diffusion`` / ``train`` sections); any other mapping is its own model config."""
    if "preset" not in cfg:
        return dict(cfg), {}
    from condnoise.training.config import resolve_source

    preset, _, _ = resolve_source(str(cfg["preset"]))
    model = {k: v for k, v in (preset.get("model") or {}).items() if k != "perturbation"}
    sections = {k: preset[k] for k in ("diffusion", "train") if preset.get(k)}
    return deep_merge(model, {k: v for k, v in cfg.items() if k != "preset"}), sections


def _check_sample(raw: dict[str, Any], where: str) -> dict[str, Any]:
    sample = _mapping(raw, "sample", where, SAMPLE_KEYS)
    guidance = sample.get("guidance")
    _need(isinstance(guidance, list) and guidance
          and all(isinstance(s, int | float) and s >= 0 for s in guidance), where,
          f"sample.guidance {guidance!r} must be a non-empty list of scales >= 0")  # fmt: skip
    sample["guidance"] = [float(s) for s in guidance]
    n = sample.get("num_samples")
    _need(isinstance(n, int) and n > 0, where, f"sample.num_samples {n!r} must be a positive int")
    steps = sample.get("steps")
    _need(isinstance(steps, int) and steps > 0, where, f"sample.steps {steps!r} must be > 0")
    return sample


def _check_evaluate_report_cost(raw: dict[str, Any], where: str) -> tuple[dict, dict, dict]:
    evaluate = _mapping(raw, "evaluate", where, EVALUATE_KEYS)
    ex = evaluate.setdefault("extractors", ["fmnist-classifier"])
    _need(isinstance(ex, list) and ex and all(isinstance(e, str) for e in ex), where,
          f"evaluate.extractors {ex!r} must be a non-empty list of names")  # fmt: skip
    report = _mapping(raw, "report", where, REPORT_KEYS)
    for key, default in (("walks", True), ("theory", True), ("grid_per_class", 8),
                         ("walk_frames", 16)):  # fmt: skip
        report.setdefault(key, default)
    cost = _mapping(raw, "cost", where, {"train_img_per_s", "forward_img_per_s", "eval_img_per_s",
                                         "train_images"})
    for k, val in cost.items():
        _need(isinstance(val, int | float) and val > 0, where, f"cost.{k} {val!r} must be > 0")
    return evaluate, report, {k: float(v) for k, v in cost.items()}


def _check_name_and_seeds(raw: dict[str, Any], where: str) -> tuple[str, list[int]]:
    unknown = sorted(set(raw) - TOP_LEVEL)
    _need(not unknown, where, f"unknown top-level field(s) {unknown}; allowed: {sorted(TOP_LEVEL)}")
    name = raw.get("name")
    _need(isinstance(name, str) and name.replace("-", "").replace("_", "").isalnum(), where,
          f"'name' {name!r} must be a short identifier (letters, digits, - and _)")  # fmt: skip
    seeds = raw.get("seeds", [0])
    _need(isinstance(seeds, list) and seeds and all(isinstance(s, int) and not isinstance(s, bool)
                                                    and s >= 0 for s in seeds), where,
          f"'seeds' {seeds!r} must be a non-empty list of integers >= 0")  # fmt: skip
    _need(len(set(seeds)) == len(seeds), where, f"'seeds' {seeds!r} has duplicates")
    return name, list(seeds)


def validate(raw: dict[str, Any], where: str) -> StudySpec:
    """Check every field of a raw study mapping; raise UserError naming the bad one."""
    name, seeds = _check_name_and_seeds(raw, where)
    data = _mapping(raw, "data", where, DATA_KEYS)
    data.setdefault("source", "fashion-mnist")
    from condnoise.study.latent import check_section
    from condnoise.study.text import apply_text_defaults

    autoencoder = check_section(raw.get("autoencoder"), data, where)
    archs, arch_train, latent_archs = _architectures(raw, where, autoencoder)
    raw = apply_text_defaults(raw, archs, where)
    variants = _expand_variants(raw, where)
    for v in variants:
        for a in v.architectures or ():
            _need(a in archs, where, f"variant {v.name!r} names unknown architecture {a!r}")
    variants = derived.order(variants, list(archs), where)
    for m in METHODS:
        _need(m not in raw or any(v.method == m for v in variants), where,
              f"top-level '{m}' gives defaults of {m} variants, but no variant has '{m}'")  # fmt: skip
    sample = _check_sample(raw, where)
    evaluate, report, cost = _check_evaluate_report_cost(raw, where)
    from condnoise.study.slurm import check_slurm

    timeout = raw.get("lock_timeout", DEFAULT_STALE_AFTER)
    _need(isinstance(timeout, int | float) and not isinstance(timeout, bool) and timeout > 0,
          where, f"lock_timeout {timeout!r} must be a number of seconds > 0 (default 600)")  # fmt: skip
    return StudySpec(
        name=name, description=str(raw.get("description", "")).strip(), data=data, seeds=seeds,
        architectures=archs, variants=variants, train=_mapping(raw, "train", where, {"diffusion", "train"}),
        sample=sample, evaluate=evaluate, report=report, cost=cost,
        source=where, out_dir=raw.get("out_dir"), raw=copy.deepcopy(raw), arch_train=arch_train,
        slurm=check_slurm(raw.get("slurm"), where), lock_timeout=float(timeout),
        step_sweep=derived.check_step_sweep(raw.get("step_sweep"), variants, sample, where),
        autoencoder=autoencoder, latent_archs=latent_archs,
    )  # fmt: skip
