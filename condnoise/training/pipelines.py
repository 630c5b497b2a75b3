"""``load_pipeline(path)``: a diffusers pipeline folder as a :class:`LoadedRun` (what
``condnoise sample --pipeline`` sweeps), for the paper's released models: its CC3M LDMs
(``LDMTextToImagePipeline``) and DiT-XL/2 (``DiTPipeline``).

The noise schedule is rebuilt from the pipeline scheduler's training betas, so condnoise's
samplers (DDPM / DDIM / DPM-Solver++, trailing spacing) run on the pipeline's model.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from condnoise.errors import UserError
from condnoise.training.runtime import LoadedRun

#: diffusers beta_schedule -> condnoise.diffusion.schedule kind
BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled-linear", "squaredcos_cap_v2": "cosine"}
SUPPORTED = ("LDMTextToImagePipeline", "DiTPipeline")


def pipeline_schedule(config: Any) -> Any:
    """A ``NoiseSchedule`` with the betas of a diffusers scheduler config (eps-prediction)."""
    from condnoise.diffusion.schedule import NoiseSchedule

    if config.get("prediction_type", "epsilon") != "epsilon":
        raise UserError(f"the pipeline predicts {config.get('prediction_type')!r}; condnoise samples "
                        "eps-prediction pipelines")  # fmt: skip
    if config.get("trained_betas") is not None:
        raise UserError("pipelines with explicit trained_betas are not supported")
    kind = BETA_SCHEDULES.get(config.get("beta_schedule", "linear"))
    if kind is None:
        raise UserError(f"unsupported beta_schedule {config.get('beta_schedule')!r}; supported: "
                        f"{', '.join(BETA_SCHEDULES)}")  # fmt: skip
    ends = {} if kind == "cosine" else {"beta_start": config["beta_start"], "beta_end": config["beta_end"]}
    return NoiseSchedule(kind, int(config.get("num_train_timesteps", 1000)), **ends)


def _autoencoder(vae: Any) -> Any:
    from diffusers import VQModel

    from condnoise.models.autoencoder import DiffusersAutoencoder

    kind = "vq" if isinstance(vae, VQModel) else "kl"
    return DiffusersAutoencoder(kind=kind, scaling_factor=getattr(vae.config, "scaling_factor", 1.0), model=vae)


def _ldm_model(pipe: Any, folder: Path) -> tuple[Any, tuple[str, ...], int]:
    from condnoise.conditioning.text import Tokenizer
    from condnoise.models.pipelines import LDM_MAX_LENGTH, LDMTextModel, PipelineText

    tok = pipe.tokenizer
    end, pad = tok.sep_token or tok.eos_token, tok.pad_token
    if not getattr(tok, "is_fast", False) or end is None or pad is None:
        raise UserError("the pipeline's tokenizer needs a fast backend with an end and a pad token")
    tokenizer = Tokenizer(tok.backend_tokenizer, end=end, pad=pad, max_length=LDM_MAX_LENGTH, source="pipeline")
    return LDMTextModel(pipe.unet, PipelineText(tokenizer, pipe.bert)), (), pipe.unet.config.sample_size


def _dit_model(pipe: Any, folder: Path) -> tuple[Any, tuple[str, ...], int]:
    import json

    from condnoise.models.pipelines import DiTClassModel

    model = DiTClassModel(pipe.transformer)
    names = {i: str(i) for i in range(model.num_classes)}
    id2label = json.loads((folder / "model_index.json").read_text()).get("id2label") or {}
    for i, label in id2label.items():  # ImageNet style "tench, Tinca tinca": the first name
        if 0 <= int(i) < model.num_classes:
            names[int(i)] = str(label).split(",")[0].strip()
    return model, tuple(names[i] for i in range(model.num_classes)), pipe.transformer.config.sample_size


def load_pipeline(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> LoadedRun:
    """Load a local ``LDMTextToImagePipeline`` / ``DiTPipeline`` folder for sampling."""
    from diffusers import DiffusionPipeline

    folder = Path(path).expanduser()
    if not (folder / "model_index.json").is_file():
        raise UserError(f"--pipeline {folder}: not a diffusers pipeline folder (no model_index.json)")
    try:
        pipe = DiffusionPipeline.from_pretrained(str(folder))
    except (OSError, ValueError, TypeError) as e:
        raise UserError(f"--pipeline {folder}: cannot load ({str(e).splitlines()[0]})") from None
    kind = type(pipe).__name__
    if kind not in SUPPORTED:
        raise UserError(f"--pipeline {folder}: {kind} is not supported; supported: {', '.join(SUPPORTED)}")
    model, class_names, size = (_ldm_model if kind == SUPPORTED[0] else _dit_model)(pipe, folder)
    vae = pipe.vqvae if kind == SUPPORTED[0] else pipe.vae
    autoencoder = _autoencoder(vae).to(device)
    channels = int((pipe.unet if kind == SUPPORTED[0] else pipe.transformer).config.in_channels)
    latent = (channels, int(size), int(size))
    f = autoencoder.downsample
    return LoadedRun(
        model=model.to(device).eval(), schedule=pipeline_schedule(pipe.scheduler.config),
        autoencoder=autoencoder, config=None, class_names=class_names,
        image_shape=(int(vae.config.out_channels), int(size) * f, int(size) * f),
        latent_shape=latent, step=0, run_dir=folder.resolve(),
    )  # fmt: skip
