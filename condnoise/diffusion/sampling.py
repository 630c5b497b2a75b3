"""Guidance-scale sweeps: sharded, resumable, torchrun-distributed generation (section 5).

Layout written by :func:`run_sweep` for every guidance scale s (directory name
``s{s:g}``: ``s1.5``, ``s2``, ``s10``)::

    OUT/provenance.json
    OUT/s{s}/shards/spec.json             settings the shards were made with (resume check)
    OUT/s{s}/shards/shard_{k:05d}.npz     images/labels/indices of [k*S, (k+1)*S) (removed
                                          after the merge unless keep_shards)
    OUT/s{s}/samples.npz                  images uint8 [N,H,W,C], labels int64 [N] (requested
                                          class, or prompt number); text runs also captions
                                          str [N] (each sample's prompt) and source_indices
                                          int64 [N] (its index in the split for
                                          --captions-from, else -1); with --controls-from
                                          also controls uint8 [N,H,W] (each sample's native
                                          control) and control_indices (its split item)
    OUT/s{s}/controls.png                 --controls-from: control | sample pairs
    OUT/s{s}/meta.json                    run dir, checkpoint step, sampler, steps, guidance, ...
                                          (``controls``: kind, thresholds, source, applied, scale)
    OUT/s{s}/grid.png                     a few samples per class / prompt, one labelled row
                                          each (prompts printed above their rows)
    OUT/s{s}/png/{class}/{i:06d}.png      optional, one file per image

Shards have a fixed size, are written atomically and skipped when present (resume).
Under torchrun rank r makes the shards k with k % world == r; rank 0 merges them after a
barrier. Sample i's noise and class depend only on (seed, i) (see :mod:`.seeding`); a
text run's sample i gets prompt ``i % P`` of its P prompts, so two runs with the same seed
and prompts are paired.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from condnoise import rng
from condnoise.diffusion.grids import safe_name, save_grid, save_labelled_grid, save_png, to_uint8
from condnoise.diffusion.samplers import check_sampler, sample
from condnoise.diffusion.seeding import initial_noise, requested_labels, sample_generators
from condnoise.errors import UserError
from condnoise.io import atomic_open, read_json, read_npz, write_json
from condnoise.models.autoencoder import IdentityAutoencoder

SPEC_FIELDS = (
    "run_dir", "checkpoint_step", "ema", "sampler", "steps", "guidance", "seed", "classes",
    "shard_size", "clip_x0", "precision", "rng_version", "prompts_sha256", "controls_sha256",
    "control_scale",
)  # fmt: skip
"""Settings that change the content of a shard: a resume refuses shards made otherwise."""


def scale_dirname(scale: float) -> str:
    """Directory name of a guidance scale: ``s{scale:g}`` (``s1.5``, ``s2``, ``s10``)."""
    return f"s{scale:g}"


def parse_guidance(text: str) -> list[float]:
    """``"1.5,2,3"`` -> ``[1.5, 2.0, 3.0]``; UserError on a bad, negative or repeated value."""
    scales: list[float] = []
    for part in str(text).split(","):
        try:
            value = float(part.strip())
        except ValueError:
            raise UserError(
                f"--guidance {text!r}: {part.strip()!r} is not a number "
                "(expected comma-separated scales such as 1.5,2,3)"
            ) from None
        if not math.isfinite(value) or value < 0:
            raise UserError(f"--guidance {text!r}: scale {part.strip()!r} must be finite and >= 0")
        if scale_dirname(value) in {scale_dirname(s) for s in scales}:
            raise UserError(f"--guidance {text!r}: scale {value:g} is given twice")
        scales.append(value)
    return scales


@dataclass
class Prompts:
    """A text run's prompts: ``texts`` (sample i gets ``texts[i % P]``), where they came from
    (``source``: ``prompt`` / ``file:PATH`` / ``split:SPEC:SPLIT``) and, for a split, each
    prompt's index in it (``indices``; -1 for free prompts)."""

    texts: list[str]
    source: str = "prompt"
    indices: list[int] | None = None

    def __post_init__(self) -> None:
        if not self.texts:
            raise UserError(f"no prompts given ({self.source})")
        empty = [i for i, t in enumerate(self.texts) if not str(t).strip()]
        if empty:
            raise UserError(f"prompt {empty[0] + 1} of {self.source} is empty (the empty caption is "
                            "the unconditional branch of CFG)")  # fmt: skip

    def sha256(self) -> str:
        import hashlib

        return hashlib.sha256("\n".join(self.texts).encode()).hexdigest()

    def source_indices(self) -> np.ndarray:
        return np.asarray(self.indices if self.indices is not None else [-1] * len(self.texts), np.int64)


def read_prompt_file(path: str | Path) -> Prompts:
    """One prompt per line (blank lines skipped); UserError when missing or empty."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"--prompts: file not found: {file}")
    texts = [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not texts:
        raise UserError(f"--prompts: {file} holds no prompt (one per line)")
    return Prompts(texts, f"file:{file.resolve()}")


@dataclass
class ControlSet:
    """Controls of a split's first P images (``condnoise sample --controls-from``): sample i
    gets control ``i % P``, paired with item ``i % P``'s condition (its class, or its caption
    as prompt ``i % P``). ``native``: uint8 ``[P, H, W]`` (:mod:`condnoise.data.controls`);
    ``applied``: fed to the run's adapter with ``scale``, or only recorded (a base run
    sampled without control, the baseline of the control-fidelity metrics)."""

    native: np.ndarray
    control: Any  # condnoise.data.controls.Control
    source: str
    applied: bool = True
    scale: float = 1.0

    def sha256(self) -> str:
        import hashlib

        h = hashlib.sha256(np.ascontiguousarray(self.native).tobytes())
        h.update(repr((self.control.settings(), self.applied)).encode())
        return h.hexdigest()

    def of(self, indices: Any) -> np.ndarray:
        """Native controls of sample indices (control ``i % P``)."""
        return self.native[np.asarray(indices, dtype=np.int64) % len(self.native)]

    def info(self) -> dict[str, Any]:
        return {**self.control.settings(), "source": self.source, "count": len(self.native),
                "applied": self.applied, "scale": self.scale if self.applied else None}  # fmt: skip


@dataclass
class SweepConfig:
    """What to generate: ``num`` samples for each guidance scale (paper section 5)."""

    guidances: list[float]
    num: int
    sampler: str = "dpm++"
    steps: int = 50
    seed: int = 0
    classes: str | list[int] = "balanced"
    batch_size: int = 256
    shard_size: int = 1000
    clip_x0: bool = False
    precision: str = "fp32"
    png: bool = False
    grid_per_class: int = 8
    keep_shards: bool = False
    prompts: Prompts | None = None  # text models: the prompts (sample i gets prompt i % P)
    controls: ControlSet | None = None  # spatial controls (sample i gets control i % P)

    def validate(self, num_train_steps: int) -> None:
        check_sampler(self.sampler, self.steps, num_train_steps)
        for name in ("num", "batch_size", "shard_size"):
            if int(getattr(self, name)) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not self.guidances:
            raise UserError("--guidance: give at least one scale")


def latent_shape(run: Any) -> tuple[int, ...]:
    """Shape ``(C,H,W)`` of the space the denoiser of a LoadedRun works in."""
    shape = getattr(run, "latent_shape", None)
    if shape is None:
        shape = run.autoencoder.latent_shape(tuple(run.image_shape))
    return tuple(int(d) for d in shape)


def is_pixel_space(autoencoder: Any) -> bool:
    """True for the identity autoencoder (samples live in [-1, 1] pixel space)."""
    return getattr(autoencoder, "kind", None) == "identity"


@torch.inference_mode()
def generate(
    model: torch.nn.Module,
    schedule: Any,
    autoencoder: Any,
    indices: Sequence[int],
    conds: np.ndarray,
    *,
    shape: Sequence[int],
    guidance: float,
    sampler: str,
    steps: int,
    seed: int,
    batch_size: int,
    clip_x0: bool = False,
    precision: str = "fp32",
    progress: Any = None,
    controls: Any = None,
    control_scale: float = 1.0,
) -> np.ndarray:
    """Sample the given indices (conditions given per index: class labels ``[N]`` or token
    ids ``[N, L]``; an adapter's ``controls``, float ``[N, C, H, W]``, likewise, applied
    with ``control_scale``); uint8 ``[N,H,W,C]`` images.

    Sample i starts from the noise of generator ``sample_seed(seed, i)`` (also DDPM's
    ancestral noise), so the result does not depend on ``batch_size`` or on which other
    indices are generated together. ``autoencoder.decode`` maps latents to pixels.
    """
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(indices), batch_size):
        idx = [int(i) for i in indices[start : start + batch_size]]
        gens = sample_generators(seed, idx)
        noise = initial_noise(gens, shape).to(device)
        y = torch.as_tensor(np.asarray(conds[start : start + batch_size]), dtype=torch.long)
        kwargs = None
        if controls is not None:
            ctl = torch.as_tensor(controls[start : start + batch_size], dtype=torch.float32)
            kwargs = {"control": ctl.to(device), "control_scale": float(control_scale)}
        x0 = sample(
            model, schedule, y.to(device), noise, guidance=guidance, sampler=sampler,
            steps=steps, generator=gens, clip_x0=clip_x0, precision=precision, model_kwargs=kwargs,
        )  # fmt: skip
        out.append(to_uint8(autoencoder.decode(x0)))
        if progress is not None:
            progress.update(len(idx))
    return np.concatenate(out) if out else np.zeros((0,), np.uint8)


def sample_grid(
    model: torch.nn.Module,
    schedule: Any,
    classes: Any,
    per_class: int,
    path: str | Path,
    *,
    shape: Sequence[int],
    guidance: float = 2.0,
    steps: int = 25,
    seed: int = 0,
    sampler: str = "ddim",
    autoencoder: Any = None,
    clip_x0: bool = False,
    precision: str = "fp32",
    row_labels: Sequence[str] | None = None,
) -> np.ndarray:
    """A PNG grid, one row per condition, ``per_class`` samples per row (the trainer's hook
    and the study's per-model grid).

    ``classes``: a class count (rows 0..K-1), the class indices of the rows, or token ids
    ``[rows, L]`` (a text model's prompts). ``row_labels`` (e.g. the prompts) are printed
    above their rows (:func:`~condnoise.diffusion.grids.save_labelled_grid`). ``shape`` is
    the denoiser's input shape ``(C,H,W)`` (latent shape for latent models); ``autoencoder``
    (default: pixel space) decodes latents. The model is switched to eval mode for the call
    (CEP is training-only) and restored afterwards. Same seed -> same noise per cell, so
    grids of successive checkpoints are comparable. Returns the uint8 ``[N,H,W,C]`` images.
    """
    if isinstance(classes, int):
        rows = np.arange(classes)
    else:
        rows = classes.cpu().numpy() if isinstance(classes, torch.Tensor) else np.asarray(classes)
    conds = np.repeat(rows.astype(np.int64), per_class, axis=0)
    was_training = model.training
    model.eval()
    try:
        images = generate(
            model, schedule, autoencoder if autoencoder is not None else IdentityAutoencoder(),
            range(len(conds)), conds, shape=shape, guidance=guidance, sampler=sampler,
            steps=steps, seed=seed, batch_size=len(conds), clip_x0=clip_x0, precision=precision,
        )  # fmt: skip
    finally:
        model.train(was_training)
    if row_labels is not None:
        save_labelled_grid(images, list(row_labels), path, nrow=per_class)
    else:
        save_grid(images, path, nrow=per_class)
    return images


# --------------------------------------------------------------------------- sweeps


def shard_ranges(num: int, shard_size: int) -> list[range]:
    """Index ranges of the fixed-size shards covering ``[0, num)``."""
    return [range(k, min(k + shard_size, num)) for k in range(0, num, shard_size)]


def shard_path(scale_dir: Path, k: int) -> Path:
    return scale_dir / "shards" / f"shard_{k:05d}.npz"


def _shard_done(path: Path, expected: range) -> bool:
    if not path.is_file():
        return False
    try:
        data = read_npz(path, ("indices", "images", "labels"))
    except UserError:  # damaged (e.g. by a full disk): made again
        return False
    idx = data["indices"]
    return (
        len(idx) == len(expected)
        and int(idx[0]) == expected.start
        and int(idx[-1]) == expected[-1]
        and data["images"].shape[0] == len(expected)
    )


def _check_spec(scale_dir: Path, spec: dict[str, Any]) -> None:
    """Refuse to mix shards made with other settings; record the spec for later resumes."""
    path = scale_dir / "shards" / "spec.json"
    for made in (scale_dir / "meta.json", path):
        if not made.is_file():
            continue
        old = read_json(made)
        diff = [k for k in SPEC_FIELDS if old.get(k) != spec.get(k)]
        if diff:
            k = diff[0]
            raise UserError(
                f"{made} was made with {k}={old.get(k)!r}, this call uses {spec.get(k)!r}: "
                f"use another --out or delete {scale_dir}"
            )
    if not path.is_file():
        write_json(path, spec)


def _is_complete(scale_dir: Path, spec: dict[str, Any], num: int) -> bool:
    meta_path, samples = scale_dir / "meta.json", scale_dir / "samples.npz"
    if not (meta_path.is_file() and samples.is_file()):
        return False
    meta = read_json(meta_path)
    return meta.get("num") == num and all(meta.get(k) == spec.get(k) for k in SPEC_FIELDS)


def _write_shard(path: Path, images: np.ndarray, labels: np.ndarray, indices: range) -> None:
    with atomic_open(path, "wb") as f:
        np.savez(f, images=images, labels=labels, indices=np.asarray(indices, dtype=np.int64))


def merge_shards(scale_dir: Path, num: int, shard_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate the shards of ``scale_dir`` in index order (checking coverage)."""
    images, labels = [], []
    for k, expected in enumerate(shard_ranges(num, shard_size)):
        path = shard_path(scale_dir, k)
        if not _shard_done(path, expected):
            raise UserError(f"{path} is missing or incomplete; run the same command again")
        data = read_npz(path, ("images", "labels"))
        images.append(data["images"])
        labels.append(data["labels"])
    return np.concatenate(images), np.concatenate(labels).astype(np.int64)


def write_grid(images: np.ndarray, labels: np.ndarray, path: Path, per_class: int,
               names: Sequence[str] | None = None) -> None:  # fmt: skip
    """One row per class or prompt (at most 16), the first ``per_class`` samples of each,
    labelled with ``names[label]`` (class names or prompts) when given."""
    classes = np.unique(labels)[:16]
    first = [np.flatnonzero(labels == c)[:per_class] for c in classes]
    n = min(per_class, min(len(f) for f in first))
    if n == 0:
        return
    picked = np.concatenate([f[:n] for f in first])
    if names is None:
        save_grid(images[picked], path, nrow=n)
    else:
        save_labelled_grid(images[picked], [str(names[int(c)]) for c in classes], path, nrow=n)


def run_sweep(
    run: Any,
    run_dir: str | Path,
    out_dir: str | Path,
    cfg: SweepConfig,
    *,
    rank: int = 0,
    world_size: int = 1,
    barrier: Any = None,
    ema: bool = True,
    progress: bool = True,
) -> list[Path]:
    """Generate ``cfg.num`` samples per guidance scale of ``cfg`` into ``out_dir``.

    ``run`` is a :class:`~condnoise.training.LoadedRun` (model on its device, eval mode).
    ``barrier`` (callable) synchronises ranks before rank 0 merges; ``progress`` draws a
    bar per scale on rank 0. Returns the scale folders (complete ones on rank 0).
    """
    cfg.validate(len(run.schedule.betas))
    kind = getattr(run.model, "condition_kind", "class")
    if kind == "text" and cfg.prompts is None:
        raise UserError("this run is text-conditional: give --prompt, --prompts or --captions-from")
    if kind != "text" and cfg.prompts is not None:
        raise UserError("this run is class-conditional: use --classes, not prompts")
    folders = []
    for scale in cfg.guidances:
        scale_dir = Path(out_dir) / scale_dirname(scale)
        folders.append(scale_dir)
        spec = {
            "run_dir": str(Path(run_dir).resolve()), "checkpoint_step": int(run.step),
            "ema": ema, "sampler": cfg.sampler, "steps": int(cfg.steps), "guidance": scale,
            "seed": int(cfg.seed), "classes": cfg.classes if cfg.prompts is None else None,
            "shard_size": int(cfg.shard_size), "clip_x0": bool(cfg.clip_x0),
            "precision": cfg.precision, "rng_version": rng.VERSION,
            "prompts_sha256": cfg.prompts.sha256() if cfg.prompts is not None else None,
            "controls_sha256": cfg.controls.sha256() if cfg.controls is not None else None,
            "control_scale": cfg.controls.scale if cfg.controls is not None and cfg.controls.applied else None,
        }  # fmt: skip
        if _is_complete(scale_dir, spec, cfg.num):
            continue
        _check_spec(scale_dir, spec)
        _make_shards(run, scale_dir, scale, cfg, rank, world_size, progress)
        if barrier is not None:
            barrier()
        if rank == 0:
            _finish_scale(scale_dir, spec, cfg, run)
    return folders


def _make_shards(run: Any, scale_dir: Path, scale: float, cfg: SweepConfig, rank: int,
                 world_size: int, progress: bool = True) -> None:  # fmt: skip
    """This rank's missing shards (k % world_size == rank) of one guidance scale."""
    from tqdm.auto import tqdm

    ranges = shard_ranges(cfg.num, cfg.shard_size)
    mine = [k for k in range(len(ranges)) if k % world_size == rank]
    todo = [k for k in mine if not _shard_done(shard_path(scale_dir, k), ranges[k])]
    bar = tqdm(
        total=sum(len(ranges[k]) for k in todo), unit="img",
        disable=not progress or rank != 0 or not todo,
        desc=f"{scale_dirname(scale)} {cfg.sampler} {cfg.steps} steps",
    )  # fmt: skip
    conds_of = _prompt_conditions(run, cfg.prompts)
    for k in todo:
        if cfg.prompts is None:
            labels = requested_labels(cfg.seed, ranges[k], len(run.class_names), cfg.classes)
            conds = labels
        else:
            labels, conds = conds_of(ranges[k])
        ctl = cfg.controls
        images = generate(
            run.model, run.schedule, run.autoencoder, ranges[k], conds, shape=latent_shape(run),
            guidance=scale, sampler=cfg.sampler, steps=cfg.steps, seed=cfg.seed,
            batch_size=cfg.batch_size, clip_x0=cfg.clip_x0, precision=cfg.precision,
            progress=bar, control_scale=ctl.scale if ctl is not None else 1.0,
            controls=ctl.control.encode(ctl.of(ranges[k])) if ctl is not None and ctl.applied else None,
        )  # fmt: skip
        _write_shard(shard_path(scale_dir, k), images, labels, ranges[k])
    bar.close()


def _prompt_conditions(run: Any, prompts: Prompts | None) -> Any:
    """``indices -> (prompt numbers [n], token ids [n, L])`` of a text run (None: classes)."""
    if prompts is None:
        return None
    if getattr(run.model, "condition_kind", "class") != "text":
        raise UserError("this run is class-conditional: use --classes, not prompts")
    ids = run.model.encoder.tokenize(prompts.texts).numpy()

    def conds(indices: range) -> tuple[np.ndarray, np.ndarray]:
        numbers = np.asarray(indices, dtype=np.int64) % len(prompts.texts)
        return numbers, ids[numbers]

    return conds


def _finish_scale(scale_dir: Path, spec: dict[str, Any], cfg: SweepConfig, run: Any) -> None:
    images, labels = merge_shards(scale_dir, cfg.num, cfg.shard_size)
    text = {}
    if cfg.prompts is not None:
        text = {"captions": np.asarray(cfg.prompts.texts)[labels],
                "source_indices": cfg.prompts.source_indices()[labels]}  # fmt: skip
    if cfg.controls is not None:  # each sample's control and the split item it came from
        idx = np.arange(cfg.num) % len(cfg.controls.native)
        text |= {"controls": cfg.controls.of(idx), "control_indices": idx.astype(np.int64)}
    with atomic_open(scale_dir / "samples.npz", "wb") as f:
        np.savez(f, images=images, labels=labels, **text)
    if cfg.grid_per_class > 0:
        names = cfg.prompts.texts if cfg.prompts is not None else run.class_names
        write_grid(images, labels, scale_dir / "grid.png", cfg.grid_per_class, names or None)
    if cfg.controls is not None and cfg.grid_per_class > 0:  # control | sample pairs
        n = min(16, cfg.num)
        pics = cfg.controls.control.to_rgb(cfg.controls.of(range(n)), images.shape[-1])
        save_grid(np.stack([pics, images[:n]], 1).reshape(2 * n, *images.shape[1:]),
                  scale_dir / "controls.png", nrow=8)
    if cfg.png and cfg.prompts is not None:
        for i, (img, y) in enumerate(zip(images, labels)):
            save_png(img, scale_dir / "png" / f"prompt_{int(y):05d}" / f"{i:06d}.png")
    elif cfg.png:
        names = [safe_name(n) for n in run.class_names]
        for i, (img, y) in enumerate(zip(images, labels)):
            save_png(img, scale_dir / "png" / f"{int(y):03d}_{names[int(y)]}" / f"{i:06d}.png")
    meta = {
        **spec, "num": int(cfg.num), "class_names": list(run.class_names),
        "image_shape": list(images.shape[1:]),
        **({"prompts": {"source": cfg.prompts.source, "count": len(cfg.prompts.texts),
                        "paired": cfg.prompts.indices is not None}} if cfg.prompts else {}),
        **({"controls": cfg.controls.info()} if cfg.controls is not None else {}),
        "files": {"samples": "samples.npz", "grid": "grid.png" if cfg.grid_per_class else None,
                  "controls": "controls.png" if cfg.controls is not None and cfg.grid_per_class else None,
                  "png": "png/" if cfg.png else None},
    }  # fmt: skip
    write_json(scale_dir / "meta.json", meta)
    if not cfg.keep_shards:
        shutil.rmtree(scale_dir / "shards", ignore_errors=True)
