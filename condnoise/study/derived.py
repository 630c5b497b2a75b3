"""Variants with a parent: models made from another variant's trained model.

A plain variant's model is trained from data (method ``train``). A derived variant names
its method by a field of that name and its parent variant inside it::

    variants:
      - name: clean
      - {name: lcm-cepu, distill: {teacher: clean, perturbation: {name: cep-u, gamma: 1}}}

For every architecture and seed of the parent, its cell (stage = the method's name) depends
on the parent's model cell (``train/ARCH/PARENT/seedS``, or the parent's own derived cell),
whose key is part of its config, so retraining the parent redoes the child. A top-level
section named like the method (``distill: {...}``) gives defaults for every variant of that
method (the variant's own fields win). A method is one :class:`Method` entry of
:data:`METHODS`: its fields, the one that names the parent, the methods a parent may have,
and how its models are sampled; ``distill`` (latent consistency distillation, Luo et al.
2023; paper Sec. 4, Table 1) is the first. Few-step methods (``Method.sampler`` set) are
sampled over the study's ``step_sweep`` (sampler steps x guidance) instead of the guidance
sweep, and so are their parents, with the study's sampler, for the comparison.

``finetune`` (paper Sec. 5, downstream personalization: ControlNet / T2I-Adapter on a
frozen base, with or without CEP during fine-tuning)::

      - {name: cn-clean, finetune: {base: clean, adapter: controlnet, control: canny}}

is a controlled method (``Method.controlled``): its models are sampled over the guidance
sweep with the controls (and conditions) of the evaluation's reference split, and evaluated
for control fidelity (edge F1 / mask IoU) too; each parent is also sampled once with the
same controls recorded but not applied (the "base without control" reference).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from condnoise.errors import UserError

if TYPE_CHECKING:
    from condnoise.study.spec import Variant

TRAINED = "train"  # the method of a plain variant


@dataclass(frozen=True)
class Method:
    """One way to make a model from a parent variant's model."""

    name: str  # the variant field, the top-level defaults section and the cell stage
    parent_field: str | None  # the field that names the parent variant (None: no parent)
    fields: tuple[str, ...]  # the other fields of the mapping
    check: Callable[[dict[str, Any], str], dict[str, Any]]  # raw fields -> resolved settings
    parent_methods: tuple[str, ...] = (TRAINED,)  # what the parent's model may be made by
    sampler: str | None = None  # few-step models: their sampler over the step sweep
    per_seed: bool = True  # one model per seed (False: one for every seed, e.g. a given run)
    controlled: bool = False  # sampled with spatial controls (``settings['control']``)


def _method_perturbation(raw: dict[str, Any], allowed: tuple[str, ...], where: str, method: str,
                         what: str) -> dict[str, Any]:  # fmt: skip
    """``raw['perturbation']`` (a name or mapping, default none) among ``allowed``, checked by
    the study's perturbation check."""
    pert = raw.get("perturbation") or {"name": "none"}
    pert = {"name": pert} if isinstance(pert, str) else dict(pert)
    if pert.get("name") not in allowed:
        raise UserError(f"{where}: {method}.perturbation {pert!r} must name one of {allowed} ({what})")
    from condnoise.study.spec import _check_perturbation

    return _check_perturbation(pert, where)


def _method_train(raw: dict[str, Any], where: str, method: str) -> dict[str, Any]:
    """``raw['train']``: train settings without ``seed`` (the study's seeds), checked by the
    training stage's TrainConfig."""
    from condnoise import schema
    from condnoise.training.config import TrainConfig

    train = raw.get("train") or {}
    if not isinstance(train, dict) or "seed" in train:
        raise UserError(f"{where}: {method}.train must be a mapping of train settings without "
                        "'seed' (the study's seeds)")  # fmt: skip
    schema.build(TrainConfig, train, where, f"{method}.train.")
    return copy.deepcopy(train)


def _check_distill(raw: dict[str, Any], where: str) -> dict[str, Any]:
    """The student settings of a ``distill`` variant, with every default filled in (the
    options of ``condnoise distill lcm``), checked by the training stage's typed configs."""
    from condnoise import schema
    from condnoise.models.config import LCMConfig
    from condnoise.training.config import DistillConfig, check_distill
    from condnoise.training.distill import PERTURBATIONS

    pert = _method_perturbation(raw, PERTURBATIONS, where, "distill", "CEP on the student's condition")
    lcm = dataclasses.asdict(LCMConfig.from_dict(
        {k: raw[k] for k in ("w_embed_dim", "solver_steps") if k in raw}, origin=where,
        prefix="distill."))  # fmt: skip
    keys = ("guidance_min", "guidance_max", "loss", "huber_c", "teacher_weights")
    d = schema.build(DistillConfig, {k: raw[k] for k in keys if k in raw}, where, "distill.")
    check_distill(d, where)
    return {"perturbation": pert, "lcm": lcm, "distill": {k: getattr(d, k) for k in keys},
            "train": _method_train(raw, where, "distill")}  # fmt: skip


def _check_finetune(raw: dict[str, Any], where: str) -> dict[str, Any]:
    """The adapter settings of a ``finetune`` variant (the options of ``condnoise finetune``),
    checked by the model and training stages' typed configs: ``adapter`` (controlnet /
    t2i-adapter; ``t2i_type``, ``num_res_blocks``), ``control`` (canny / mask),
    ``canny_low`` / ``canny_high``, ``base_weights``, ``perturbation`` (none / cep-u /
    cep-g), ``epochs`` (sets train.steps from the data size) and ``train``."""
    from condnoise import schema
    from condnoise.models.config import AdapterConfig
    from condnoise.training.config import FinetuneConfig
    from condnoise.training.finetune import PERTURBATIONS

    pert = _method_perturbation(raw, PERTURBATIONS, where, "finetune",
                                "CEP on the condition embedding during fine-tuning")  # fmt: skip
    kind = raw.get("adapter", "controlnet")
    a = {"kind": kind, **{k: raw[k] for k in ("t2i_type", "num_res_blocks") if k in raw}}
    cfg = AdapterConfig.from_dict(a, origin=where, prefix="finetune.")
    adapter = {"kind": cfg.kind}
    if cfg.kind == "t2i-adapter":  # as `condnoise finetune t2i-adapter` writes it
        adapter |= {"t2i_type": cfg.t2i_type, "num_res_blocks": cfg.num_res_blocks}
    keys = ("control", "canny_low", "canny_high", "base_weights")
    f = schema.build(FinetuneConfig, {k: raw[k] for k in keys if k in raw}, where, "finetune.")
    epochs = raw.get("epochs")
    if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, int | float) or epochs <= 0):
        raise UserError(f"{where}: finetune.epochs {epochs!r} must be a number > 0 (the paper: 10)")
    train = _method_train(raw, where, "finetune")
    if epochs is not None and "steps" in train:
        raise UserError(f"{where}: finetune has both epochs and train.steps; give one")
    return {"adapter": adapter, "control": f.control, "perturbation": pert,
            "finetune": {k: getattr(f, k) for k in keys[1:]},
            "epochs": None if epochs is None else float(epochs), "train": train}  # fmt: skip


def _check_pretrained(raw: dict[str, Any], where: str) -> dict[str, Any]:
    """``pretrained: {path: RUN}``: a model trained outside the study (checked when its cell
    runs, so that plans validate without it)."""
    path = raw.get("path")
    if not isinstance(path, str) or not path:
        raise UserError(f"{where}: pretrained.path must name a condnoise run folder")
    return {"path": path}


DISTILL = Method(
    name="distill", parent_field="teacher", check=_check_distill, sampler="lcm",
    fields=("perturbation", "solver_steps", "w_embed_dim", "guidance_min", "guidance_max",
            "loss", "huber_c", "teacher_weights", "train"),
    parent_methods=(TRAINED, "pretrained"),
)  # fmt: skip
#: a model from outside the study (no parent): e.g. the teacher of a distillation recipe
PRETRAINED = Method(name="pretrained", parent_field=None, fields=("path",), check=_check_pretrained,
                    per_seed=False)  # fmt: skip
FINETUNE = Method(
    name="finetune", parent_field="base", check=_check_finetune, controlled=True,
    fields=("adapter", "control", "perturbation", "t2i_type", "num_res_blocks", "canny_low",
            "canny_high", "base_weights", "epochs", "train"),
    parent_methods=(TRAINED, "pretrained"),
)  # fmt: skip
#: in cell-stage order (a method's parents before it)
METHODS: dict[str, Method] = {PRETRAINED.name: PRETRAINED, DISTILL.name: DISTILL, FINETUNE.name: FINETUNE}


def method_of(v: dict[str, Any], where: str) -> Method | None:
    """The derived method a raw variant mapping uses (None: a trained variant)."""
    found = [METHODS[k] for k in METHODS if k in v]
    if len(found) > 1:
        raise UserError(f"{where}: a variant has one method; got {[m.name for m in found]}")
    return found[0] if found else None


def parse(v: dict[str, Any], method: Method, defaults: Any, where: str
          ) -> tuple[str | None, dict[str, Any]]:  # fmt: skip
    """``(parent name or None, resolved settings)`` of a raw derived variant; ``defaults``
    is the study's top-level section of the method's name (or None)."""
    clash = sorted(k for k in ("corruption", "perturbation", "train") if v.get(k))
    if clash:
        raise UserError(f"{where}: a {method.name} variant takes no {clash} of its own (the "
                        f"{method.name} mapping has {', '.join(method.fields)})")  # fmt: skip
    mine = v[method.name]
    if defaults is not None and not isinstance(defaults, dict):
        raise UserError(f"{where}: the top-level '{method.name}' section must be a mapping of defaults")
    if not isinstance(mine, dict):
        raise UserError(f"{where}: '{method.name}' must be a mapping of {', '.join(method.fields)}")
    from condnoise.study.spec import deep_merge

    raw = deep_merge(defaults or {}, mine)
    allowed = {*([method.parent_field] if method.parent_field else []), *method.fields}
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise UserError(f"{where}: unknown field(s) {unknown} in '{method.name}'; allowed: {sorted(allowed)}")
    if method.parent_field is None:
        return None, method.check(raw, where)
    parent = raw.pop(method.parent_field, None)
    if not isinstance(parent, str) or not parent:
        raise UserError(f"{where}: '{method.name}' needs '{method.parent_field}': the name of "
                        "another variant")  # fmt: skip
    return parent, method.check(raw, where)


def order(variants: list[Variant], archs: list[str], where: str) -> list[Variant]:
    """Variants with every parent before its children, derived ones restricted to (and by
    default given) their parent's architectures; UserError for an unknown parent, a parent
    of the wrong method or a cycle."""
    by_name = {v.name: v for v in variants}
    for v in variants:
        if v.parent is None:
            continue
        m, parent = METHODS[v.method], by_name.get(v.parent)
        if parent is None:
            raise UserError(f"{where}: variant {v.name!r}: {v.method}.{m.parent_field} {v.parent!r} is "
                            f"not a variant of this study ({', '.join(by_name)})")  # fmt: skip
        if parent.method not in m.parent_methods:
            raise UserError(f"{where}: variant {v.name!r}: its {m.parent_field} {parent.name!r} is a "
                            f"{parent.method} variant; a {v.method} needs a {' or '.join(m.parent_methods)} "
                            "variant's model")  # fmt: skip
    out: list[Variant] = []
    placed: set[str] = set()

    def place(v: Variant, chain: tuple[str, ...]) -> None:
        if v.name in placed:
            return
        if v.name in chain:
            raise UserError(f"{where}: variants {' -> '.join((*chain, v.name))} form a cycle")
        parent = by_name[v.parent] if v.parent else None
        if parent is not None:
            place(parent, (*chain, v.name))
            mine = parent_archs = _resolved_archs(out, parent.name, archs)
            if v.architectures is not None:
                extra = sorted(set(v.architectures) - set(parent_archs))
                if extra:
                    raise UserError(f"{where}: variant {v.name!r} names architecture(s) {extra} "
                                    f"its parent {parent.name!r} is not trained on")  # fmt: skip
                mine = v.architectures
            v = dataclasses.replace(v, architectures=tuple(mine))
        out.append(v)
        placed.add(v.name)

    for v in variants:
        place(v, ())
    return out


def _resolved_archs(placed: list[Variant], name: str, archs: list[str]) -> tuple[str, ...]:
    v = next(p for p in placed if p.name == name)
    return tuple(v.architectures or archs)


def few_step(v: Variant) -> bool:
    """Whether ``v``'s models are sampled over the step sweep with their own sampler."""
    return v.method in METHODS and METHODS[v.method].sampler is not None


def controlled(v: Variant) -> bool:
    """Whether ``v``'s models are sampled with spatial controls (a ``finetune`` variant)."""
    return v.method in METHODS and METHODS[v.method].controlled


def check_step_sweep(raw: Any, variants: list[Variant], sample: dict[str, Any], where: str
                     ) -> dict[str, Any] | None:  # fmt: skip
    """``step_sweep: {steps: [1, 2, 4, 8], guidance: [2]}``: required by few-step variants
    (and only then allowed); ``guidance`` defaults to the middle of ``sample.guidance``;
    every step count within each student's solver grid."""
    students = [v for v in variants if few_step(v)]
    if raw is None:
        if students:
            raise UserError(f"{where}: variant {students[0].name!r} is a few-step model: give "
                            "'step_sweep: {steps: [1, 2, 4, 8], guidance: [2]}'")  # fmt: skip
        return None
    if not students:
        raise UserError(f"{where}: step_sweep is set but no variant is a few-step model "
                        f"({', '.join(m.name for m in METHODS.values() if m.sampler)})")  # fmt: skip
    if not isinstance(raw, dict) or set(raw) - {"steps", "guidance"}:
        raise UserError(f"{where}: step_sweep must be a mapping of 'steps' and 'guidance', got {raw!r}")
    steps = raw.get("steps")
    if not (isinstance(steps, list) and steps and all(isinstance(s, int) and not isinstance(s, bool)
                                                      and s > 0 for s in steps)):  # fmt: skip
        raise UserError(f"{where}: step_sweep.steps {steps!r} must be a non-empty list of step counts > 0")
    g = sorted(sample["guidance"])
    guidance = raw.get("guidance", [g[len(g) // 2]])
    if not (isinstance(guidance, list) and guidance
            and all(isinstance(s, int | float) and not isinstance(s, bool) and s >= 0 for s in guidance)):
        raise UserError(f"{where}: step_sweep.guidance {guidance!r} must be a non-empty list of scales >= 0")
    for v in students:
        n = int(v.settings["lcm"]["solver_steps"])
        if max(steps) > n:
            raise UserError(f"{where}: step_sweep.steps {max(steps)} > variant {v.name!r}'s solver_steps "
                            f"{n}: a student samples in at most its grid's steps")  # fmt: skip
    return {"steps": sorted(set(steps)), "guidance": [float(s) for s in guidance]}
