"""Checkpoints of a run directory (``load_run`` in :mod:`condnoise.training.runtime` reads them).

Layout (docs/architecture.md, training/)::

    RUN/config.yaml  provenance.json  run.json  metrics.jsonl
    RUN/checkpoints/step_00001000/{model.safetensors, ema.safetensors, state.pt}
    RUN/samples/step_00001000.png

A checkpoint folder is written under a temporary name and renamed when complete, so a
``step_*`` folder is always whole (a SIGKILL mid-write leaves only a ``.tmp-*`` folder,
removed on the next save). ``state.pt`` holds the optimizer, LR schedule, step, data
position and every rank's RNG states (torch, CUDA, numpy, python).
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_model, save_model

from condnoise import rng
from condnoise.errors import UserError
from condnoise.io import follow_umask

CKPT_DIR = "checkpoints"
STEP_RE = re.compile(r"^step_(\d{8})$")


def step_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CKPT_DIR / f"step_{step:08d}"


def list_checkpoints(run_dir: str | os.PathLike) -> list[int]:
    """Steps of the complete checkpoints in ``run_dir``, ascending."""
    root = Path(run_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    steps = []
    for p in root.iterdir():
        m = STEP_RE.match(p.name)
        if m and p.is_dir() and (p / "state.pt").is_file():
            steps.append(int(m.group(1)))
    return sorted(steps)


# --------------------------------------------------------------------------- RNG


def capture_rng() -> dict[str, Any]:
    """This process's RNG states (torch CPU, CUDA, numpy, python)."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int, rank: int = 0, *, step: int = 0) -> None:
    """Seed torch / numpy / python RNGs; ranks (and reseeds at ``step``) get distinct streams."""
    s = rng.derive_seed(seed, "train/rank", rank, step)
    torch.manual_seed(s)
    np.random.seed(s % (2**32))
    random.seed(s)


# --------------------------------------------------------------------------- save / load


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: torch.nn.Module,
    ema: torch.nn.Module,
    state: dict[str, Any],
    keep_last: int,
) -> Path:
    """Write ``checkpoints/step_{step}`` atomically, then keep only the last ``keep_last``."""
    weights = {"model.safetensors": model, "ema.safetensors": ema}
    return save_checkpoint_files(run_dir, step, weights, state, keep_last)


def save_checkpoint_files(
    run_dir: Path,
    step: int,
    weights: dict[str, torch.nn.Module],
    state: dict[str, Any],
    keep_last: int,
) -> Path:
    """``save_checkpoint`` for any modules: ``{file name: module}`` plus ``state.pt``."""
    root = Path(run_dir) / CKPT_DIR
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-step_*"):
        shutil.rmtree(stale, ignore_errors=True)
    final = step_dir(run_dir, step)
    tmp = root / f".tmp-{final.name}"
    tmp.mkdir()
    try:
        for name, module in weights.items():
            save_model(module, str(tmp / name))
        torch.save(state, tmp / "state.pt")
        follow_umask(tmp)  # safetensors writes 0600
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(step_dir(run_dir, old), ignore_errors=True)
    return final


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_weights(module: torch.nn.Module, path: Path, *, hint: str = "") -> None:
    """Load a safetensors file written by ``save_checkpoint`` into ``module`` (strict).

    A file that does not fit raises a UserError naming the first mismatching parameter with
    both shapes (and ``hint``, e.g. the config key that differs)."""
    if not path.is_file():
        raise UserError(f"checkpoint file missing: {path}")
    suffix = f"; {hint}" if hint else ""
    mismatch = first_shape_mismatch(module, path)
    if mismatch:
        raise UserError(f"{path} does not fit the model built from config.yaml: {mismatch}{suffix}")
    try:
        missing, unexpected = load_model(module, str(path), strict=False)
    except Exception as e:  # safetensors / size mismatch -> one clear line
        raise UserError(f"cannot load weights from {path}: {str(e).splitlines()[0]}") from None
    if missing or unexpected:
        raise UserError(
            f"weights in {path} do not match the model built from config.yaml "
            f"(missing: {list(missing)[:3]}, unexpected: {list(unexpected)[:3]}){suffix}"
        )


def first_shape_mismatch(module: torch.nn.Module, path: Path) -> str | None:
    """``"parameter 'blocks.0.attn.qkv.weight' is [96, 32] in the checkpoint, [192, 64] in the
    model"`` for the first parameter (in the model's order) whose shapes differ, else None."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            stored = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # not a safetensors file, truncated, ...
        raise UserError(f"cannot read weights {path}: {str(e).splitlines()[0]}") from None
    for name, tensor in module.state_dict().items():
        if name in stored and stored[name] != list(tensor.shape):
            return (f"parameter {name!r} is {stored[name]} in the checkpoint, "
                    f"{list(tensor.shape)} in the model")  # fmt: skip
    return None


def config_difference(recorded: dict[str, Any] | None, built: dict[str, Any] | None) -> str:
    """The model config keys where the config recorded when the run started (``run.json``)
    and the one built now differ: ``"config.yaml differs from the run's start in model.hidden
    (32 -> 48)"``; empty when they agree or nothing was recorded."""
    if not isinstance(recorded, dict) or not isinstance(built, dict):
        return ""
    diffs = _differences(recorded, built, "model")
    if not diffs:
        return ""
    shown = ", ".join(f"{k} ({a!r} -> {b!r})" for k, a, b in diffs[:3])
    more = f" and {len(diffs) - 3} more" if len(diffs) > 3 else ""
    return f"config.yaml differs from the run's start (run.json) in {shown}{more}"


def _differences(a: dict[str, Any], b: dict[str, Any], prefix: str) -> list[tuple[str, Any, Any]]:
    out = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            out += _differences(x, y, f"{prefix}.{key}")
        elif x != y:
            out.append((f"{prefix}.{key}", x, y))
    return out


def load_state(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise UserError(f"cannot read checkpoint state {path}: {str(e).splitlines()[0]}") from None
