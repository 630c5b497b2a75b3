"""Atomic file writes and checked reads of the artefacts commands consume.

Writes go to a temporary file in the same folder, then are renamed: a reader (or a crash)
never sees a half-written file; an existing file is replaced only once the new one is
complete. New files follow the user's umask like ordinary files (the temporary file is
created with mode 0666 and the umask applied; a replaced file keeps its mode). A write that
fails (no permission, a file in the way, a full disk) raises a one-line
:class:`~condnoise.errors.UserError` naming the path.

Reads (:func:`read_json`, :func:`read_npz`) turn an unreadable, damaged or truncated file
into a one-line UserError naming it (with line and column for JSON).
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from condnoise.errors import UserError


def oserror_text(e: OSError) -> str:
    """``"No space left on device"``, ``"Permission denied"``: the reason, without the path."""
    return e.strerror or str(e) or type(e).__name__


def default_file_mode() -> int:
    """The mode ``open()`` gives a new file: 0666 minus the process umask (read from
    ``/proc/self/status`` where it can be, so the umask is never changed, even briefly)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # not thread-safe; only where /proc is missing
    os.umask(mask)
    return 0o666 & ~mask


def follow_umask(*paths: str | os.PathLike) -> None:
    """Give files written by libraries that create them private (safetensors writes 0600)
    the mode of an ordinary new file; folders are walked."""
    mode = default_file_mode()
    for p in map(Path, paths):
        for f in (p.rglob("*") if p.is_dir() else [p]):
            if f.is_file() and not f.is_symlink():
                os.chmod(f, mode)


def _not_a_folder(path: Path) -> Path | None:
    """The first ancestor of ``path`` that exists but is not a folder (a file in the way)."""
    for p in reversed(path.parents):
        if p.exists() and not p.is_dir():
            return p
    return None


def unwritable_reason(path: Path, e: OSError) -> str:
    """Why ``path`` cannot be written, for a one-line message."""
    blocker = _not_a_folder(path)
    if blocker is not None:
        return f"{blocker} is a file, not a folder"
    return oserror_text(e)


def _create_temp(path: Path) -> Path:
    """An empty new file next to ``path`` (mode 0666 minus the umask, or ``path``'s mode)."""
    mode = 0o666
    with contextlib.suppress(OSError):
        mode = path.stat().st_mode & 0o7777
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
        try:
            fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            continue
        try:
            if mode != 0o666:
                os.fchmod(fd, mode)
        finally:
            os.close(fd)
        return tmp
    raise FileExistsError(f"no free temporary name next to {path}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` on success."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _create_temp(path)
    except OSError as e:
        raise UserError(f"cannot write {path}: {unwritable_reason(path, e)}") from None
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        if e.filename not in (None, str(tmp), str(path), tmp, path):
            raise  # about another file: not this write's failure
        raise UserError(f"cannot write {path}: {oserror_text(e)}") from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs: Any) -> Iterator[IO]:
    """Open a temporary file for writing; it replaces ``path`` when the block succeeds."""
    with atomic_path(path) as tmp:
        try:
            f = open(tmp, mode, **kwargs)
        except OSError as e:
            raise UserError(f"cannot write {path}: {oserror_text(e)}") from None
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(text)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_json(path: str | os.PathLike, *, expect: type | None = dict) -> Any:
    """The JSON value in ``path``; UserError naming the file (and the line and column of a
    syntax error) when it is missing, unreadable, invalid, or not an ``expect`` value."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path} not found") from None
    except (OSError, UnicodeDecodeError) as e:
        reason = oserror_text(e) if isinstance(e, OSError) else "not UTF-8 text"
        raise UserError(f"cannot read {path}: {reason}") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}"
                        ) from None  # fmt: skip
    if expect is not None and not isinstance(obj, expect):
        raise UserError(f"{path}: expected a JSON {'object' if expect is dict else expect.__name__}"
                        f", got {type(obj).__name__}")  # fmt: skip
    return obj


def read_npz(path: str | os.PathLike, keys: Sequence[str] = ()) -> dict[str, Any]:
    """Every array of the ``.npz`` file ``path``, read eagerly (so a truncated member fails
    here); UserError naming the file when it is unreadable, damaged or lacks ``keys``."""
    import zipfile
    import zlib

    import numpy as np

    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            if not isinstance(z, np.lib.npyio.NpzFile):
                raise UserError(f"{path}: a single .npy array, not an .npz archive")
            missing = [k for k in keys if k not in z.files]
            if missing:
                raise UserError(f"{path}: missing array(s) {missing} (has {sorted(z.files)})")
            return {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise UserError(f"{path} not found") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error, KeyError) as e:
        empty = path.is_file() and path.stat().st_size == 0
        reason = "empty file" if empty else (str(e).splitlines()[0] if str(e) else type(e).__name__)
        raise UserError(f"cannot read {path}: {reason} (truncated or not an .npz file?)") from None
