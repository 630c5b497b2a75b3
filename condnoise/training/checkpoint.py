"""Checkpoints of a run directory and ``load_run`` (what the sampler loads).

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

import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_model, save_model

from condnoise.errors import UserError

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


def seed_everything(seed: int, rank: int = 0) -> None:
    """Seed torch / numpy / python RNGs; ranks get distinct streams."""
    s = (seed * 1_000_003 + rank) % (2**63)
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


def load_weights(module: torch.nn.Module, path: Path) -> None:
    """Load a safetensors file written by ``save_checkpoint`` into ``module`` (strict)."""
    if not path.is_file():
        raise UserError(f"checkpoint file missing: {path}")
    try:
        missing, unexpected = load_model(module, str(path), strict=False)
    except Exception as e:  # safetensors / size mismatch -> one clear line
        raise UserError(f"cannot load weights from {path}: {str(e).splitlines()[0]}") from None
    if missing or unexpected:
        raise UserError(
            f"weights in {path} do not match the model built from config.yaml "
            f"(missing: {list(missing)[:3]}, unexpected: {list(unexpected)[:3]})"
        )


def load_state(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise UserError(f"cannot read checkpoint state {path}: {str(e).splitlines()[0]}") from None


# --------------------------------------------------------------------------- load_run


@dataclass
class LoadedRun:
    """A trained model ready for sampling (``load_run``)."""

    model: torch.nn.Module  # ConditionalDiffusionModel in eval mode
    schedule: Any  # condnoise.diffusion.schedule.NoiseSchedule
    autoencoder: Any  # encode(x) / decode(z); identity for pixel-space models
    config: Any  # condnoise.training.config.Config
    class_names: tuple[str, ...]
    image_shape: tuple[int, int, int]  # data space (C, H, W) of decoded images
    latent_shape: tuple[int, int, int]  # what the denoiser sees (C, H, W)
    step: int
    run_dir: Path

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def read_run_info(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / "run.json"
    if not path.is_file():
        raise UserError(f"{run_dir} is not a training run directory (no run.json)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}") from None


def read_run_config(run_dir: Path) -> Any:
    from condnoise.training.config import config_from_yaml_text

    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise UserError(f"{run_dir} is not a training run directory (no config.yaml)")
    return config_from_yaml_text(path.read_text(encoding="utf-8"), str(path))


def load_run(
    run_dir: str | os.PathLike,
    *,
    ema: bool = True,
    device: str | torch.device = "cpu",
    step: int | None = None,
) -> LoadedRun:
    """Rebuild a trained model from a run directory.

    ``ema=True`` loads the EMA weights (what sampling uses, paper section 4 recipes);
    ``step`` picks a checkpoint (default: the latest). A run without a checkpoint, or a
    step that was not kept, raises ``UserError``.
    """
    from condnoise.training.builders import build_autoencoder, build_schedule
    from condnoise.training.builders import build_model as build_run_model

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run directory not found: {run_dir}")
    cfg = read_run_config(run_dir)
    info = read_run_info(run_dir)
    steps = list_checkpoints(run_dir)
    if not steps:
        raise UserError(
            f"{run_dir} has no checkpoint yet (train longer or lower train.ckpt_every)"
        )
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise UserError(f"{run_dir} has no checkpoint for step {step}; kept steps: {steps}")
    latent_shape = tuple(info["latent_shape"])
    model = build_run_model(cfg, latent_shape, len(info["class_names"]))
    load_weights(model, step_dir(run_dir, step) / ("ema.safetensors" if ema else "model.safetensors"))
    dev = torch.device(device)
    model.to(dev).eval().requires_grad_(False)
    autoencoder = build_autoencoder(cfg, dev)
    return LoadedRun(
        model=model,
        schedule=build_schedule(cfg),
        autoencoder=autoencoder,
        config=cfg,
        class_names=tuple(info["class_names"]),
        image_shape=tuple(info["image_shape"]),
        latent_shape=latent_shape,  # type: ignore[arg-type]
        step=step,
        run_dir=run_dir,
    )
