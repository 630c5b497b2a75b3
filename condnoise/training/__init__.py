"""Training: config and presets, the loop (AdamW, EMA, DDP), checkpoints, and the runtime
helpers (devices, torchrun, ``load_run``). Names load on first use, so importing the
package itself is free."""

from __future__ import annotations

from typing import Any

__all__ = ["Config", "LoadedRun", "list_presets", "load_config", "load_run", "train"]


def __getattr__(name: str) -> Any:
    if name in ("Config", "list_presets", "load_config"):
        from condnoise.training import config

        return getattr(config, name)
    if name in ("LoadedRun", "load_run"):
        from condnoise.training import runtime

        return getattr(runtime, name)
    if name == "train":
        from condnoise.training.trainer import train

        return train
    raise AttributeError(f"module 'condnoise.training' has no attribute {name!r}")
