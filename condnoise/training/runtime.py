"""Runtime helpers of every command and of the study: device choice, CPU threads, the
``torchrun`` process group (NCCL on GPU, gloo on CPU) with small collectives, and
:func:`load_run` (a trained model ready for sampling).

``torchrun --nproc_per_node N -m condnoise train ...`` sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; multi-node runs use the standard
``--nnodes / --node_rank / --rdzv_*`` flags. Without those variables training runs in a
single process and nothing here touches ``torch.distributed``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from condnoise.errors import UserError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise UserError(f"environment variable {name}={value!r} is not an integer") from None


DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch device this machine has; UserError for a misspelt device, a
    backend that is not available or a device index beyond the devices present."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise UserError(f"device {device!r}: not a torch device (expected "
                        f"{', '.join(DEVICE_TYPES)} or TYPE:INDEX, e.g. cuda:1)") from None
    if dev.type not in DEVICE_TYPES:
        raise UserError(f"device {device!r}: device type {dev.type!r} is not supported "
                        f"(expected one of {', '.join(DEVICE_TYPES)})")
    if dev.type == "cpu":
        return dev
    if dev.type == "mps":
        available, count = torch.backends.mps.is_available(), 1
    else:
        backend = getattr(torch, dev.type)
        available = bool(backend.is_available())
        count = backend.device_count() if available else 0
    if not available:
        raise UserError(f"device {device!r} requested but {dev.type.upper()} is not available")
    if dev.index is not None and dev.index >= count:
        raise UserError(f"device {device!r}: this machine has {count} {dev.type} device(s)")
    return dev


def pick_device(local_rank: int = 0, device: str | None = None) -> torch.device:
    """``device`` (checked by :func:`check_device`), else ``cuda:<local_rank>`` when CUDA
    is available, else CPU."""
    if device is not None:
        return check_device(device)
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
    return torch.device("cpu")


def use_all_cores() -> None:
    """Use every core the process may use (torch's default can be lower under cgroups);
    ``OMP_NUM_THREADS`` still wins."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", n or 1))))


def init_distributed(device: str | None = None) -> DistInfo:
    """Join the process group described by torchrun's environment (no-op when absent)."""
    world = _env_int("WORLD_SIZE", 1)
    _env_int("RANK", 0)  # validated here; the process group reads it
    local_rank = _env_int("LOCAL_RANK", 0)
    dev = pick_device(local_rank, device)
    if world <= 1:
        return DistInfo(0, 1, 0, dev)
    if not dist.is_available():
        raise UserError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs: dict[str, Any] = {"backend": backend}
        if dev.type == "cuda":
            kwargs["device_id"] = dev
        dist.init_process_group(**kwargs)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev)


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_gather_object(info: DistInfo, obj: Any) -> list[Any]:
    """Every rank's ``obj`` (a list of one element without a process group)."""
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(info: DistInfo, obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_mean(info: DistInfo, tensor: torch.Tensor) -> torch.Tensor:
    """Mean over ranks (a detached copy)."""
    out = tensor.detach().clone()
    if info.enabled:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        out /= info.world_size
    return out


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
    from condnoise.training.checkpoint import (
        config_difference,
        list_checkpoints,
        load_weights,
        step_dir,
    )
    from condnoise.training.rundir import read_run_config, read_run_info

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
    try:
        latent_shape = tuple(int(v) for v in info["latent_shape"])
        class_names = tuple(str(c) for c in info["class_names"])
        image_shape = tuple(int(v) for v in info["image_shape"])
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{run_dir / 'run.json'}: missing or invalid latent_shape, image_shape "
                        "or class_names") from None
    model = build_run_model(cfg, latent_shape, len(class_names))
    hint = config_difference(info.get("model_config"), getattr(model, "config", None))
    load_weights(model, step_dir(run_dir, step) / ("ema.safetensors" if ema else "model.safetensors"),
                 hint=hint)  # fmt: skip
    dev = torch.device(device)
    model.to(dev).eval().requires_grad_(False)
    autoencoder = build_autoencoder(cfg, dev)
    return LoadedRun(
        model=model,
        schedule=build_schedule(cfg),
        autoencoder=autoencoder,
        config=cfg,
        class_names=class_names,
        image_shape=image_shape,  # type: ignore[arg-type]
        latent_shape=latent_shape,  # type: ignore[arg-type]
        step=step,
        run_dir=run_dir,
    )


def load_vq_autoencoder(run_dir: str | os.PathLike | None) -> torch.nn.Module:
    """The frozen VQ autoencoder of a diffusion run (``model.autoencoder`` of its config.yaml),
    what sample entropy needs (paper Sec. 5); a pixel-space or KL run is a ``UserError``."""
    from condnoise.training.builders import build_autoencoder
    from condnoise.training.rundir import read_run_config

    if not run_dir:
        raise UserError("sample entropy needs the samples' training run (run_dir in meta.json, "
                        "written by `condnoise sample`)")
    cfg = read_run_config(Path(run_dir))
    ae = cfg.model.autoencoder
    kind = "identity" if ae is None else ae.kind
    if kind != "vq":
        raise UserError(f"sample entropy needs a VQ autoencoder, but run {run_dir} uses "
                        f"model.autoencoder kind {kind!r} (entropy is over a VQ codebook, paper Sec. 5)")
    return build_autoencoder(cfg)

