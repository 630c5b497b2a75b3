"""The study's autoencoder: a first stage trained once as a cell, shared by every latent model.

Latent diffusion (paper Sec. 4: LDM-4 on a VQ-f4 autoencoder; Rombach et al. 2022) needs a
first stage; offline none exists, so a study may train one (``condnoise autoencoder train``'s
trainer) in the cell ``autoencoder``::

    autoencoder: {preset: fmnist-vq-f4, train: {steps: 2000}, quantize: false}
    architectures:
      unet: {preset: fmnist-conv16, autoencoder: study}

The section is an autoencoder preset (or YAML file, ``condnoise/presets/autoencoders/``)
with its ``data`` / ``model`` / ``loss`` / ``train`` sections merged over it; the data source,
image size and folder are the study's. ``quantize`` (default false, as LDM) gives the
denoiser codebook vectors instead of pre-quantisation latents. An architecture with
``autoencoder: study`` gets ``model.autoencoder = {kind, path: the cell's diffusers folder,
quantize}`` and its ``latent_shape``; its train cells depend on the autoencoder cell and
carry its key, so a retrained autoencoder retrains every model. Models on a VQ autoencoder
are evaluated with sample entropy over its codebook too (paper Sec. 5).

Cell folder: ``cells/autoencoder/KEY/run/`` (the autoencoder run directory; its diffusers
folder ``run/autoencoder/``), resumable from its last checkpoint.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING, Any

from condnoise.errors import UserError

if TYPE_CHECKING:
    from condnoise.study.grid import Cell
    from condnoise.study.runner import RunContext

SECTION_KEYS = ("preset", "data", "model", "loss", "train", "quantize")
STUDY = "study"  # ``architectures.NAME.autoencoder: study``
FOLDER = ("run", "autoencoder")  # the diffusers folder inside the cell


def check_section(raw: Any, data: dict[str, Any], where: str) -> dict[str, Any] | None:
    """The resolved ``autoencoder`` section: ``{"config": AutoencoderTrainConfig as a dict (no run
    section), "quantize": bool}``; None when the study has none."""
    if raw is None:
        return None
    w = f"{where}: autoencoder"
    if not isinstance(raw, dict) or not isinstance(raw.get("preset"), str):
        raise UserError(f"{w} must be a mapping naming an autoencoder 'preset' (e.g. fmnist-vq-f4)")
    unknown = sorted(set(raw) - set(SECTION_KEYS))
    if unknown:
        raise UserError(f"{w}: unknown field(s) {unknown}; allowed: {list(SECTION_KEYS)}")
    quantize = raw.get("quantize", False)
    if not isinstance(quantize, bool):
        raise UserError(f"{w}.quantize {quantize!r} must be true or false")
    from condnoise.study.spec import deep_merge
    from condnoise.training.autoencoder_config import (
        AutoencoderTrainConfig,
        load_autoencoder_config,
    )

    base = load_autoencoder_config(raw["preset"]).to_dict()
    over = {k: raw[k] for k in ("data", "model", "loss", "train") if k in raw}
    for k, v in over.items():
        if not isinstance(v, dict):
            raise UserError(f"{w}.{k} must be a mapping of that section's settings")
    if {"source", "image_size", "data_dir"} & set(over.get("data", {})):
        raise UserError(f"{w}.data: source, image_size and data_dir are the study's (data section)")
    merged = deep_merge(base, over)
    merged["data"].update(source=data["source"], image_size=data.get("image_size", 32),
                          data_dir=data.get("data_dir"))  # fmt: skip
    cfg = AutoencoderTrainConfig.from_dict(merged, origin=w).validate(w)
    if quantize and cfg.model.kind != "vq":
        raise UserError(f"{w}.quantize needs a vq autoencoder, the preset's model.kind is {cfg.model.kind}")
    out = cfg.to_dict()
    out.pop("run")
    return {"config": out, "quantize": quantize}


def model_autoencoder(section: dict[str, Any] | None, arch: str, where: str) -> dict[str, Any]:
    """What an architecture with ``autoencoder: study`` is validated and keyed with: the
    model.autoencoder mapping without its path (set per cell) and the latent shape."""
    if section is None:
        raise UserError(f"{where}: architectures.{arch}.autoencoder is 'study' but the study has no "
                        "'autoencoder' section (e.g. autoencoder: {preset: fmnist-vq-f4})")  # fmt: skip
    m, size = section["config"]["model"], int(section["config"]["data"]["image_size"])
    channels = (m["embed_dim"] or m["latent_channels"]) if m["kind"] == "vq" else m["latent_channels"]
    return {"autoencoder": {"kind": m["kind"], "path": None, "quantize": section["quantize"]},
            "latent_shape": [int(channels), size // m["downsample"], size // m["downsample"]]}  # fmt: skip


def folder(cell_dir: Path) -> Path:
    """The diffusers folder of a finished autoencoder cell (absolute: run configs keep it)."""
    return Path(cell_dir, *FOLDER).resolve()


def run_autoencoder(cell: Cell, cell_dir: Path, deps: dict[str, Path], ctx: RunContext) -> dict:
    """Train the study's autoencoder (``condnoise autoencoder train``'s trainer), resuming
    from the run's last checkpoint; report its last logged reconstruction PSNR / code usage."""
    import shutil

    from condnoise.evaluation.classifier import perceptual_network
    from condnoise.study.stages import cell_device
    from condnoise.training.autoencoder import train_autoencoder
    from condnoise.training.autoencoder_config import AutoencoderTrainConfig
    from condnoise.training.checkpoint import list_checkpoints

    raw = copy.deepcopy(cell.config["autoencoder"])
    run_dir = cell_dir / "run"
    raw["run"] = {"name": "study-autoencoder", "dir": str(run_dir), "tensorboard": False,
                  "progress": False}  # fmt: skip
    cfg = AutoencoderTrainConfig.from_dict(raw, origin=f"study cell {cell.id}")
    resume = (run_dir / "config.yaml").is_file() and bool(list_checkpoints(run_dir))
    if run_dir.exists() and not resume:
        shutil.rmtree(run_dir)  # started, no checkpoint yet: start over
    result = train_autoencoder(cfg, run_dir=run_dir, resume=resume, device=cell_device(ctx),
                               classifier=perceptual_network(cfg.loss))  # fmt: skip
    return {k: float(v) for k, v in result.last.items() if k in ("psnr", "usage", "perplexity")}
