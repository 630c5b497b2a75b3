"""Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` (IDX files).

Search order for the folder holding ``{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz``:
an explicit ``data_dir``, the ``CONDNOISE_DATA`` environment variable (the folder itself
or its ``fashion-mnist/`` sub-folder), the Debian package's file list (``dpkg -L``), then
``/usr/share/datasets/fashion-mnist``.
"""

from __future__ import annotations

import functools
import gzip
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np

from condnoise.errors import UserError

CLASS_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
SPLITS = {"train": "train", "test": "t10k"}
DEBIAN_PACKAGE = "dataset-fashion-mnist"
DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
HOW_TO_PROVIDE = (
    f"install it with `apt-get install {DEBIAN_PACKAGE}`, or pass --data-dir / set "
    "CONDNOISE_DATA to a folder holding train-images-idx3-ubyte.gz and friends"
)


def _has_files(folder: Path) -> bool:
    return all((folder / f"{p}-images-idx3-ubyte.gz").is_file() for p in SPLITS.values())


def _dpkg_dir() -> Path | None:
    if not shutil.which("dpkg"):
        return None
    try:
        out = subprocess.run(
            ["dpkg", "-L", DEBIAN_PACKAGE], capture_output=True, text=True, timeout=20
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        if line.endswith("train-images-idx3-ubyte.gz"):
            return Path(line).parent
    return None


def find_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """Return the folder with the IDX files, or raise a UserError saying how to get them."""
    candidates: list[Path] = []
    if data_dir:
        candidates += [Path(data_dir), Path(data_dir) / "fashion-mnist"]
    elif os.environ.get("CONDNOISE_DATA"):
        env = Path(os.environ["CONDNOISE_DATA"])
        candidates += [env, env / "fashion-mnist"]
    else:
        candidates.append(DEFAULT_DIR)
        found = _dpkg_dir()
        if found:
            candidates.insert(0, found)
    for c in candidates:
        if _has_files(c):
            return c
    where = ", ".join(str(c) for c in candidates)
    raise UserError(f"Fashion-MNIST not found (looked in: {where}); {HOW_TO_PROVIDE}")


def _read_idx(path: Path, header: int) -> np.ndarray:
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise UserError(f"cannot read IDX file {path}: {e}") from None
    return np.frombuffer(raw, dtype=np.uint8, offset=header)


@functools.lru_cache(maxsize=4)
def load_fashion_mnist(
    split: str = "train", data_dir: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(images uint8 [N, 28, 28], labels int64 [N])`` for ``split`` (train/test).

    Arrays are read-only (shared by the cache).
    """
    if split not in SPLITS:
        raise UserError(f"unknown Fashion-MNIST split {split!r}; choose one of {sorted(SPLITS)}")
    folder = find_data_dir(data_dir)
    prefix = SPLITS[split]
    images = _read_idx(folder / f"{prefix}-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)
    labels = _read_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", 8).astype(np.int64)
    if len(images) != len(labels):
        raise UserError(f"{folder}: {len(images)} images but {len(labels)} labels in split {split}")
    labels.flags.writeable = False
    return images, labels

