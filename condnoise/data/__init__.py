"""Data sources and condition corruption (paper section 2).

``open_source(spec)`` opens a source; ``condnoise.data.corruption`` builds corrupted views.
Names are imported lazily so ``import condnoise.data`` (and ``condnoise --help``) stays
free of torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "open_source": "condnoise.data.sources",
    "ConditionalDataset": "condnoise.data.base",
    "DatasetMeta": "condnoise.data.base",
    "InMemoryDataset": "condnoise.data.base",
    "Manifest": "condnoise.data.manifest",
    "load_manifest_labels": "condnoise.data.manifest",
    "corrupt": "condnoise.data.corruption",
    "CorruptedView": "condnoise.data.views",
    "RandomFlipView": "condnoise.data.views",
    "relabel": "condnoise.data.random_flip",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'condnoise.data' has no attribute {name!r}")
