"""``metrics.json`` records: merging successive ``condnoise evaluate`` calls on one folder.

A folder is often evaluated in steps (the cheap classifier first, Inception or sFID later).
A new call merges its values into the existing ``metrics.json`` when both were computed
on the same samples (content hash) with the same value-affecting settings (reference,
limits, k, shrinkage, ...); otherwise the file is replaced and the reason is reported,
so one file never mixes numbers from different samples or settings.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from condnoise.io import write_json

# EvalConfig fields that change a metric's value (extractors / metrics only choose which).
VALUE_SETTINGS = ("ref", "train_ref", "max_ref", "max_train", "k", "dc_k", "shrinkage",
                  "memorization_threshold", "memorization_percentile", "top_pr_seed", "is_splits",
                  "entropy_tau", "entropy_pool")


def samples_hash(images: np.ndarray, labels: np.ndarray, prompts: list[str] | None = None) -> str:
    """SHA-256 of the evaluated arrays (shape, dtype and bytes) and prompts, as hex."""
    h = hashlib.sha256()
    for a in (images, labels):
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(a.tobytes())
    if prompts is not None:
        h.update(json.dumps(prompts).encode())
    return h.hexdigest()


def value_settings(cfg: Any) -> dict[str, Any]:
    """The value-affecting part of an :class:`~condnoise.evaluation.evaluate.EvalConfig`."""
    d = asdict(cfg)
    return {k: d[k] for k in VALUE_SETTINGS}


def _differences(old: dict, new: dict) -> list[str]:
    if old.get("schema") != new.get("schema"):
        return [f"schema {old.get('schema')} -> {new.get('schema')}"]
    if "samples_sha256" not in old or "settings" not in old:
        return ["it records no samples hash or settings (older condnoise)"]
    if old.get("samples_sha256") != new.get("samples_sha256"):
        return ["samples.npz changed"]
    a, b = old.get("settings") or {}, new.get("settings") or {}
    return [f"{k} {a.get(k)!r} -> {b.get(k)!r}" for k in VALUE_SETTINGS if a.get(k) != b.get(k)]


def merge(old: dict, new: dict) -> dict:
    """``new`` with the (metric, extractor) values and details of ``old`` it does not recompute."""
    out = dict(new)
    for section in ("metrics", "details"):
        merged = {k: dict(v) for k, v in old.get(section, {}).items()}
        for key, per_extractor in new.get(section, {}).items():
            merged.setdefault(key, {}).update(per_extractor)
        out[section] = merged
    fresh = new.get("metrics", {})
    out["kept_from_earlier"] = sorted(f"{m}@{e}" for m, d in out["metrics"].items()
                                      for e in d if e not in fresh.get(m, {}))
    return out


def write_metrics(folder: Path, result: dict, *, replace: bool = False) -> tuple[dict, str]:
    """Write ``folder/metrics.json`` (merged with a compatible earlier one unless ``replace``).

    Returns the record written and a one-line note on what happened to the earlier file.
    """
    path = folder / "metrics.json"
    note = ""
    if path.is_file() and not replace:
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError):
            old, why = None, ["unreadable"]
        else:
            why = _differences(old, result)
        if old is not None and not why:
            result = merge(old, result)
            note = f"merged with earlier values ({len(result['kept_from_earlier'])} kept)"
        else:
            note = f"replaced earlier metrics.json ({'; '.join(why)})"
    elif path.is_file():
        note = "replaced earlier metrics.json (--replace)"
    write_json(path, result)
    return result, note
