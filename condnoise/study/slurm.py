"""SLURM resources per stage: the study file's ``slurm`` section, checked and resolved.

The section maps a stage (``autoencoder``, ``corrupt``, ``train``, ``distill``, ``finetune``, ``sample``,
``evaluate``, ``walk``, ``theory``, ``report``) or ``default`` to sbatch resources; a stage takes the built-in
defaults, then ``default``, then its own entry::

    slurm:
      default: {partition: cpu, time: "4:00:00", mem: 32G}
      train: {partition: gpu, nodes: 2, gpus_per_node: 8, time: "7-00:00:00", mem: 0}
      sample: {partition: gpu, gpus_per_node: 1, time: "1-00:00:00"}

``time`` takes SLURM's formats (minutes, ``MM:SS``, ``HH:MM:SS``, ``D-HH``, ``D-HH:MM``,
``D-HH:MM:SS``); ``mem`` an sbatch ``--mem`` value (``64G``; ``0`` is the whole node). A
training cell runs ``gpus_per_node`` tasks per node over ``nodes`` nodes, one process
group (see :mod:`condnoise.study.submit`), and so does a distillation or fine-tuning cell; other cells
run one task. The section never
enters a cell's config, so changing resources never invalidates a finished cell.
"""

from __future__ import annotations

import math
import re
from typing import Any

from condnoise.errors import UserError
from condnoise.study.grid import STAGES as STAGE_SECTIONS

TEXT_KEYS = ("partition", "account", "qos", "constraint")
INT_KEYS = ("nodes", "gpus_per_node", "cpus_per_task")
SLURM_KEYS = (*TEXT_KEYS, *INT_KEYS, "mem", "time")
BUILTIN = {"nodes": 1, "gpus_per_node": 0, "cpus_per_task": 2, "time": "1-00:00:00"}
MULTI_TASK = ("train", "distill", "finetune")  # trainers: one process group over the allocation
_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")
_MEM = re.compile(r"^\d+[KMGT]?B?$", re.IGNORECASE)


def time_minutes(value: Any, where: str) -> int:
    """A SLURM ``--time`` value in whole minutes (rounded up)."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    m = _TIME.match(str(value).strip())
    if not m or isinstance(value, bool):
        raise UserError(f"{where} {value!r} is not a SLURM time (minutes, HH:MM:SS, "
                        "D-HH:MM:SS, ...)")  # fmt: skip
    days, a, b, c = (int(x) if x else None for x in m.groups())
    if days is not None:  # D-HH[:MM[:SS]]
        seconds = days * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    elif c is not None:  # HH:MM:SS
        seconds = a * 3600 + b * 60 + c
    elif b is not None:  # MM:SS
        seconds = a * 60 + b
    else:  # MM
        seconds = a * 60
    if seconds <= 0:
        raise UserError(f"{where} {value!r} must be a positive duration")
    return math.ceil(seconds / 60)


def _check_entry(entry: Any, where: str) -> dict[str, Any]:
    if not isinstance(entry, dict):
        raise UserError(f"{where} must be a mapping of {', '.join(SLURM_KEYS)}")
    unknown = sorted(set(entry) - set(SLURM_KEYS))
    if unknown:
        raise UserError(f"{where}: unknown key(s) {unknown}; allowed: {', '.join(SLURM_KEYS)}")
    for k in TEXT_KEYS:
        if k in entry and not (isinstance(entry[k], str) and entry[k].strip()):
            raise UserError(f"{where}.{k} {entry[k]!r} must be a non-empty string")
    for k in INT_KEYS:
        v = entry.get(k)
        low = 0 if k == "gpus_per_node" else 1
        if k in entry and not (isinstance(v, int) and not isinstance(v, bool) and v >= low):
            raise UserError(f"{where}.{k} {v!r} must be an integer >= {low}")
    if "mem" in entry and not _MEM.match(str(entry["mem"])):
        raise UserError(f"{where}.mem {entry['mem']!r} is not an sbatch --mem value (e.g. 64G)")
    if "time" in entry:
        time_minutes(entry["time"], f"{where}.time")
    return dict(entry)


def check_slurm(raw: Any, where: str) -> dict[str, dict[str, Any]]:
    """The validated ``slurm`` section (``{}`` when absent); UserError naming a bad key."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UserError(f"{where}: 'slurm' must map stages (or 'default') to resources")
    out = {}
    for section, entry in raw.items():
        if section not in (*STAGE_SECTIONS, "default"):
            raise UserError(f"{where}: slurm.{section}: unknown stage; use one of "
                            f"{', '.join(STAGE_SECTIONS)} or default")  # fmt: skip
        out[section] = _check_entry(entry, f"{where}: slurm.{section}")
    for stage in STAGE_SECTIONS:
        if stage not in MULTI_TASK and int(resources(out, stage)["nodes"]) > 1:
            raise UserError(f"{where}: slurm: nodes > 1 for {stage} cells; only "
                            f"{' / '.join(MULTI_TASK)} cells run over several nodes")  # fmt: skip
    return out


def resources(slurm: dict[str, dict[str, Any]], stage: str) -> dict[str, Any]:
    """A stage's resources: built-in defaults, then ``default``, then the stage's entry."""
    return {**BUILTIN, **slurm.get("default", {}), **slurm.get(stage, {})}


def tasks_per_node(stage: str, res: dict[str, Any]) -> int:
    """Processes per node: one per GPU for training and distillation (one process group),
    else one."""
    return max(1, int(res["gpus_per_node"])) if stage in MULTI_TASK else 1


def executor_parameters(stage: str, res: dict[str, Any]) -> dict[str, Any]:
    """submitit ``SlurmExecutor.update_parameters`` keywords for a stage's resources."""
    params: dict[str, Any] = {k: res[k] for k in TEXT_KEYS if res.get(k)}
    params.update(nodes=int(res["nodes"]), ntasks_per_node=tasks_per_node(stage, res),
                  cpus_per_task=int(res["cpus_per_task"]), time=time_minutes(res["time"], "time"))
    if int(res["gpus_per_node"]):
        params["gpus_per_node"] = int(res["gpus_per_node"])
    if res.get("mem") is not None:
        params["mem"] = str(res["mem"])
    return params
