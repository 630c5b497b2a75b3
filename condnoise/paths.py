"""Where condnoise keeps derived files: the cache directory (trained feature networks,
feature caches, generated datasets)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$CONDNOISE_CACHE`` or ``~/.cache/condnoise``."""
    return Path(os.environ.get("CONDNOISE_CACHE") or Path.home() / ".cache" / "condnoise")
