"""Run directories: default naming, fresh-vs-resume checks, config compatibility, metrics.

``runs/<name>-<perturbation>-s<seed>`` by default. A run directory holds ``config.yaml``
(the fully resolved config), ``provenance.json`` (config, seed, library versions),
``run.json`` (class names, image and latent shapes: what ``load_run`` needs without the
data), ``metrics.jsonl`` (one JSON object per logged step), ``checkpoints/`` and
``samples/``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from condnoise.errors import UserError
from condnoise.io import read_json, write_json, write_text
from condnoise.provenance import write_provenance

#: settings that may change when a run is resumed (they do not change the trajectory)
RESUMABLE_CHANGES = (
    "train.steps", "train.ckpt_every", "train.keep_last", "train.sample_every",
    "train.sample_steps", "train.sample_sampler", "train.sample_guidance",
    "train.sample_per_class", "train.log_every", "train.num_workers", "train.threads",
    "run.name", "run.dir", "run.tensorboard", "run.progress",
)  # fmt: skip


def default_run_dir(cfg: Any) -> Path:
    pert = cfg.perturbation_name
    corr = f"-{Path(cfg.data.corruption).name}" if cfg.data.corruption else ""
    return Path("runs") / f"{cfg.run.name}{corr}-{pert}-s{cfg.train.seed}"


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_differences(saved: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ and that may not change on resume."""
    a, b = _flatten(saved), _flatten(new)
    keys = sorted(set(a) | set(b))
    return [k for k in keys if a.get(k) != b.get(k) and k not in RESUMABLE_CHANGES]


RUN_FILES = ("config.yaml", "run.json", "provenance.json", "metrics.jsonl")
RUN_FOLDERS = ("checkpoints", "samples", "tensorboard")


def is_started(run_dir: Path) -> bool:
    return any((run_dir / n).exists() for n in ("config.yaml", "checkpoints", "metrics.jsonl"))


def has_progress(run_dir: Path) -> bool:
    """Whether the run got past step 1: a checkpoint, or a logged step."""
    from condnoise.training.checkpoint import list_checkpoints

    metrics = run_dir / "metrics.jsonl"
    return bool(list_checkpoints(run_dir)) or (metrics.is_file() and metrics.stat().st_size > 0)


def check_fresh(run_dir: Path, *, force: bool = False) -> None:
    """A new run may start in ``run_dir``: it is absent or empty, holds a run that never got
    to step 1 (started afresh), or ``force`` is given; a run with progress needs --resume and
    a folder of other files (a corruption manifest, ...) is not overwritten."""
    from condnoise.locks import LOCK_NAME

    if not run_dir.exists():
        return
    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} exists and is not a folder")
    if has_progress(run_dir):
        raise UserError(
            f"run directory {run_dir} already holds a run; pass --resume to continue it, "
            "or choose a new --run-dir"
        )
    if is_started(run_dir):
        return
    # the lock and the temp files it is made from (another rank may be taking it right now)
    others = sorted(p.name for p in run_dir.iterdir() if not p.name.startswith(LOCK_NAME))
    if others and not force:
        shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
        raise UserError(
            f"run directory {run_dir} is not empty and holds no condnoise run ({shown}); "
            "choose another --run-dir, or pass --force to train into it"
        )


def discard_unstarted(run_dir: Path) -> None:
    """Remove the run files of a run that failed before step 1 (a rerun then starts it
    cleanly); a run with progress, and files that are not the run's, are left alone."""
    import shutil

    if not run_dir.is_dir() or has_progress(run_dir):
        return
    for name in RUN_FILES:
        (run_dir / name).unlink(missing_ok=True)
    for name in RUN_FOLDERS:
        folder = run_dir / name
        if folder.is_dir() and not any(p for p in folder.rglob("*") if p.is_file()
                                       and not p.name.startswith(".tmp")):  # fmt: skip
            shutil.rmtree(folder, ignore_errors=True)


def check_resumable(run_dir: Path, cfg: Any) -> None:
    """The saved config must match ``cfg`` up to :data:`RESUMABLE_CHANGES`."""
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"--resume: {run_dir} holds no run (no config.yaml); drop --resume to start it")
    saved = read_run_config(run_dir)
    diff = config_differences(saved.to_dict(), cfg.to_dict())
    if diff:
        shown = ", ".join(f"{k}" for k in diff[:5])
        raise UserError(
            f"--resume: the config differs from {run_dir / 'config.yaml'} in {shown}; resume "
            "with the same settings (only steps, checkpoint/sample/log cadence may change)"
        )


def write_run_files(run_dir: Path, cfg: Any, info: dict[str, Any]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text(run_dir / "config.yaml", cfg.to_yaml())
    write_json(run_dir / "run.json", info)
    write_provenance(run_dir, cfg.to_dict(), cfg.train.seed)


def read_run_info(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / "run.json"
    if not path.is_file():
        raise UserError(f"{run_dir} is not a training run directory (no run.json)")
    return read_json(path)


def read_run_config(run_dir: Path) -> Any:
    from condnoise.training.config import config_from_yaml_text

    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise UserError(f"{run_dir} is not a training run directory (no config.yaml)")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    return config_from_yaml_text(text, str(path))


class MetricsLog:
    """Append-only ``metrics.jsonl`` (flushed per line), optional TensorBoard scalars."""

    def __init__(self, run_dir: Path, *, tensorboard: bool) -> None:
        self.path = run_dir / "metrics.jsonl"
        self._file = open(self.path, "a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:  # tensorboard is optional
                self._tb = None

    def log(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            step = int(record["step"])
            for k, v in record.items():
                if k != "step" and isinstance(v, int | float):
                    self._tb.add_scalar(f"train/{k}", v, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def truncate_metrics(run_dir: Path, last_step: int) -> None:
    """Drop records after ``last_step`` (logged after the checkpoint a resume starts from)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a kill
            continue
        if isinstance(rec, dict) and int(rec.get("step", 0)) <= last_step:
            kept.append(line)
    write_text(path, "".join(f"{k}\n" for k in kept))


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Every complete record of ``metrics.jsonl`` in order."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"no metrics.jsonl in {run_dir}")
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out
