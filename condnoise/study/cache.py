"""Per-cell caching: content keys from resolved configs, done markers, and the cell log.

A cell's key is the SHA-256 of its canonical JSON config (which embeds the keys of the
cells it depends on), so changing anything upstream changes every key downstream.
A cell counts as finished only when ``CELL_DIR/done.json`` exists; it is written
atomically as the very last step, so a study killed at any point resumes cleanly.
The cell log (``STUDY_DIR/cells.jsonl``) records one JSON line per start / end / skip
event with UTC timestamps (``end``: wall ``seconds`` and the process's ``cpu_seconds``),
which the tests and ``--dry-run`` read back.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from condnoise.io import read_json, write_json
from condnoise.locks import DEFAULT_HEARTBEAT, DEFAULT_STALE_AFTER, Lock

KEY_LENGTH = 16
DONE_FILE = "done.json"
LOG_FILE = "cells.jsonl"


def canonical_json(obj: Any) -> str:
    """Deterministic JSON text (sorted keys, no whitespace) used for hashing."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def config_key(config: dict[str, Any]) -> str:
    """Short content hash of a resolved cell config."""
    return hashlib.sha256(canonical_json(config).encode()).hexdigest()[:KEY_LENGTH]


def now_utc() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def is_done(cell_dir: Path) -> bool:
    return (cell_dir / DONE_FILE).is_file()


def mark_done(cell_dir: Path, info: dict[str, Any]) -> None:
    """Write the done marker last: its presence means every output of the cell is complete."""
    write_json(cell_dir / DONE_FILE, {"finished_utc": now_utc(), **info})


def read_done(cell_dir: Path) -> dict[str, Any]:
    return read_json(cell_dir / DONE_FILE)


def reset_cell(cell_dir: Path) -> None:
    """Remove a partial (unfinished) cell folder so the stage starts from a clean slate."""
    if cell_dir.exists() and not is_done(cell_dir):
        shutil.rmtree(cell_dir)


class CellLog:
    """Append-only JSONL log of cell events (``start``, ``end``, ``skip``, ``fail``)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def append(self, event: str, cell_id: str, key: str, **extra: Any) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = canonical_json(
            {"time_utc": now_utc(), "event": event, "cell": cell_id, "key": key, **extra}
        )
        # One short write per line with O_APPEND: lines from concurrent workers stay whole.
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)  # umask applies
        try:
            os.write(fd, (line + "\n").encode())
        finally:
            os.close(fd)

    def events(self) -> list[dict[str, Any]]:
        """Every complete line of the log (a torn last line from a crash is ignored)."""
        if not self.path.is_file():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out

    def durations(self) -> dict[str, float]:
        """Seconds taken by each finished cell, by cell key (the latest run wins)."""
        return {e["key"]: float(e["seconds"]) for e in self.events() if e["event"] == "end"}


def cell_lock_path(cell_dir: Path) -> Path:
    """``cells/{stage}/.{key}.lock``: beside the cell folder, which a restart may delete."""
    return cell_dir.parent / f".{cell_dir.name}.lock"


@contextmanager
def claim(cell_dir: Path, *, heartbeat: float | None = DEFAULT_HEARTBEAT,
          stale_after: float = DEFAULT_STALE_AFTER) -> Iterator[bool]:  # fmt: skip
    """Exclusive claim on a cell for one worker (several processes / torchrun ranks).

    Yields ``True`` when this process owns the cell. The claim is a
    :class:`condnoise.locks.Lock` that heartbeats every ``heartbeat`` seconds: another worker
    takes it over (with a warning) when its holder on the same host is gone, or when its
    last beat is older than ``stale_after`` seconds. The lock file is removed on exit.
    """
    lock = Lock(cell_lock_path(cell_dir), "study cell", heartbeat=heartbeat,
                stale_after=stale_after)  # fmt: skip
    if not lock.try_acquire():
        yield False
        return
    try:
        yield True
    finally:
        lock.release()
