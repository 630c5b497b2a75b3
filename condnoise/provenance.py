"""What every run writes next to its outputs: resolved config, seed, library versions."""

from __future__ import annotations

import platform
import sys
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from condnoise import __version__
from condnoise.io import write_json

_LIBRARIES = ("torch", "numpy", "scipy", "scikit-learn", "diffusers", "torchmetrics", "safetensors")


def library_versions() -> dict[str, str]:
    out = {"condnoise": __version__, "python": sys.version.split()[0]}
    for name in _LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def environment() -> dict[str, Any]:
    return {
        "versions": library_versions(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "time_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "argv": sys.argv,
    }


def write_provenance(out_dir: str | Path, config: dict[str, Any], seed: int | None) -> Path:
    """Write ``out_dir/provenance.json`` (config, seed, versions, platform); return its path."""
    path = Path(out_dir) / "provenance.json"
    write_json(path, {"config": config, "seed": seed, **environment()})
    return path
