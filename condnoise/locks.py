"""Exclusive locks on output folders: run folders, sample folders, study cells.

A lock is a small JSON file (``LOCK_NAME`` inside the locked folder, or any path) holding
who holds it: ``what`` (the command), ``host``, ``pid``, the process's start time, when
the lock was taken (``started``) and its last heartbeat (``beat``). It is created with
``os.link`` of a fully written temporary file, which is atomic on local file systems and
on NFS, so two processes never both create it and a reader never sees it half written.

A lock is *stale* when

- its holder ran on this host and that process is gone (or its pid now belongs to a
  process started later), or
- its holder heartbeats (a background thread rewrites ``beat`` every ``heartbeat``
  seconds) and the last beat is older than ``stale_after`` seconds (a process on another
  node that was killed, or one stopped with SIGSTOP).

A stale lock is taken over with a :class:`LockTakeoverWarning`; a live one makes
:meth:`Lock.acquire` raise :class:`LockHeld` (a one-line :class:`UserError`, exit code 2)
naming the holder. Take-overs and heartbeats re-read the lock under a short ``flock`` on
the folder, so two processes never both take one stale lock over, and a holder whose
lock was taken over notices it (:attr:`Lock.lost`, and the ``on_lost`` callback, called
once from the heartbeat thread) instead of writing over the new one; :meth:`Lock.check`
raises :class:`LockLost` then, for holders that verify before they write.

Typical use, one line per command::

    with folder_lock(out_dir, what="sample"):
        ...  # write into out_dir
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from condnoise.errors import CondnoiseWarning, UserError

LOCK_NAME = ".condnoise.lock"
DEFAULT_HEARTBEAT = 60.0  # seconds between beats
DEFAULT_STALE_AFTER = 600.0  # a beat older than this marks the holder as gone


def heartbeat_for(stale_after: float) -> float:
    """The beat period for a timeout: every minute, more often for timeouts under 5 minutes
    (five beats fit in one timeout, so a loaded machine's late beat is not taken for death)."""
    return min(DEFAULT_HEARTBEAT, stale_after / 5)


class LockHeld(UserError):
    """The folder is locked by a live process (the message names it)."""


class LockLost(UserError):
    """Another process took over a lock this process held (it looked stale: a stopped or
    unreachable holder); the work under it must stop without writing further."""


class LockTakeoverWarning(CondnoiseWarning):
    """A stale lock (its holder is gone) was taken over."""


@dataclass(frozen=True)
class LockInfo:
    """What a lock file records about its holder."""

    what: str
    host: str
    pid: int
    started: float  # time.time() when the lock was taken
    beat: float  # time.time() of the last heartbeat (= started without heartbeats)
    heartbeat: float | None  # seconds between beats; None: the holder does not beat
    token: str  # unique per acquisition
    pid_start: str | None = None  # the holder's process start time (Linux), against pid reuse

    def describe(self, now: float | None = None) -> str:
        now = time.time() if now is None else now
        started = datetime.fromtimestamp(self.started, UTC).isoformat(timespec="seconds")
        text = f"{self.what} (pid {self.pid} on {self.host}, since {started}"
        if self.heartbeat is not None:
            text += f", last beat {max(0.0, now - self.beat):.0f} s ago"
        return text + ")"


def process_start(pid: int) -> str | None:
    """The start time of process ``pid`` (clock ticks since boot, Linux ``/proc``), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22; the name in (...) may hold spaces


def _process_gone(pid: int, pid_start: str | None) -> bool:
    """Whether process ``pid`` of this host has exited (a zombie counts as exited)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, owned by another user
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    if state in ("Z", "X"):
        return True
    return pid_start is not None and process_start(pid) not in (None, pid_start)


def stale_reason(info: LockInfo, stale_after: float = DEFAULT_STALE_AFTER,
                 now: float | None = None) -> str | None:  # fmt: skip
    """Why the holder of ``info`` is gone, or None while it is (presumed) alive."""
    now = time.time() if now is None else now
    if info.host == socket.gethostname() and _process_gone(info.pid, info.pid_start):
        return f"process {info.pid} is gone"
    if info.heartbeat is not None and now - info.beat > stale_after:
        return f"no heartbeat for {now - info.beat:.0f} s (timeout {stale_after:g} s)"
    return None


def read_lock(path: str | os.PathLike) -> LockInfo | None:
    """The lock at ``path``; None when there is none. A file that is not a lock (damaged,
    or the ``host:pid`` text of older condnoise study locks) is read as best it can be."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        mtime = path.stat().st_mtime
    except FileNotFoundError:
        return None
    try:
        raw = json.loads(text)
        return LockInfo(**{k: raw[k] for k in LockInfo.__dataclass_fields__ if k in raw})
    except (ValueError, TypeError, AttributeError):
        host, _, pid = text.strip().rpartition(":")
        return LockInfo("unknown", host or "unknown", int(pid) if pid.isdigit() else -1,
                        mtime, mtime, None, "")  # fmt: skip


@contextlib.contextmanager
def _guard(folder: Path) -> Iterator[None]:
    """A short exclusive ``flock`` on ``folder``: serialises take-overs and heartbeats.
    Best effort: where the file system has no flock (some network mounts), nothing."""
    try:
        import fcntl

        fd = os.open(folder, os.O_RDONLY)
    except (ImportError, OSError):
        yield
        return
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the flock


_NO_LINKS = (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK)


def _create_exclusive(path: Path, text: str) -> None:
    """``O_EXCL`` creation: exclusive too, but a reader may briefly see an empty file (read
    as held by an unknown process, never as stale)."""
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


class Lock:
    """An exclusive lock file at ``path`` held by this process (see the module docstring).

    ``heartbeat``: seconds between beats of a background thread (None: no thread; then only
    the same-host pid rule can free a lock left by a killed holder). ``stale_after``: when
    this process finds a lock whose last beat is older, it takes it over. ``on_lost``: called
    (once, from the heartbeat thread) when a beat finds the lock taken over.
    """

    def __init__(self, path: str | os.PathLike, what: str, *,
                 heartbeat: float | None = DEFAULT_HEARTBEAT,
                 stale_after: float = DEFAULT_STALE_AFTER,
                 on_lost: Callable[[], None] | None = None) -> None:  # fmt: skip
        if heartbeat is not None and not 0 < heartbeat < stale_after:
            raise ValueError(f"heartbeat must lie in (0, stale_after={stale_after}), got {heartbeat}")
        self.path, self.what = Path(path), what
        self.heartbeat, self.stale_after = heartbeat, stale_after
        self.info: LockInfo | None = None
        self.lost = False  # set when another process took the lock over
        self.on_lost = on_lost
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def held(self) -> bool:
        return self.info is not None and not self.lost

    def try_acquire(self) -> bool:
        """Take the lock if it is free or stale (with a warning); False if a live process holds it."""
        return self._acquire() is None

    def acquire(self, wait: float = 0.0) -> Lock:
        """Take the lock or raise :class:`LockHeld` naming the holder. ``wait``: seconds to
        keep retrying while a live holder has it (one that goes stale or releases it
        meanwhile is taken over), e.g. the run folder of a study cell just taken over from
        a stopped worker, whose own run lock goes stale a moment after the cell's."""
        deadline = time.monotonic() + wait
        holder = self._acquire()
        while holder is not None and time.monotonic() < deadline:
            time.sleep(min(1.0, self.stale_after / 10, max(0.0, deadline - time.monotonic())))
            holder = self._acquire()
        if holder is not None:
            raise LockHeld(f"{self.path.parent} is in use by {holder.describe()}; wait for it to "
                           f"finish, or delete {self.path} if that process is gone")  # fmt: skip
        return self

    def _acquire(self) -> LockInfo | None:
        """None on success, else the live holder."""
        if self.held:
            raise RuntimeError(f"{self.path} is already held by this Lock")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        now = time.time()
        info = LockInfo(self.what, socket.gethostname(), os.getpid(), now, now, self.heartbeat,
                        uuid.uuid4().hex, process_start(os.getpid()))  # fmt: skip
        if not self._create(info):
            with _guard(self.path.parent):
                holder = read_lock(self.path)
                reason = stale_reason(holder, self.stale_after) if holder else "it was released"
                if holder is not None and reason is None:
                    return holder
                if holder is not None:
                    warnings.warn(f"taking over the lock {self.path} of {holder.describe()}: "
                                  f"{reason}", LockTakeoverWarning, stacklevel=4)  # fmt: skip
                self._write(info, replace=True)
        self.info, self.lost = info, False
        self._start_heartbeat()
        return None

    def _create(self, info: LockInfo) -> bool:
        """Create the lock file atomically; False if one exists."""
        try:
            self._write(info, replace=False)
        except FileExistsError:
            return False
        return True

    def _write(self, info: LockInfo, *, replace: bool) -> None:
        """Write a temporary file, then link it into place (fails if the lock exists) or
        rename it over the lock (``replace``)."""
        text = json.dumps(asdict(info))
        tmp = self.path.with_name(f"{self.path.name}.{info.token}.{time.monotonic_ns()}.tmp")
        try:
            tmp.write_text(text, encoding="utf-8")
            if replace:
                os.replace(tmp, self.path)
            else:
                os.link(tmp, self.path)
        except OSError as e:
            if replace or isinstance(e, FileExistsError) or e.errno not in _NO_LINKS:
                raise
            _create_exclusive(self.path, text)  # file systems without hard links
        finally:
            tmp.unlink(missing_ok=True)

    def _start_heartbeat(self) -> None:
        if self.heartbeat is None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat_loop, name=f"lock-beat {self.path}",
                                        daemon=True)  # fmt: skip
        self._thread.start()

    def _beat_loop(self) -> None:
        while not self._stop.wait(self.heartbeat):
            if not self.beat():
                if self.lost and self.on_lost is not None and not self._stop.is_set():
                    self.on_lost()
                return

    def check(self) -> None:
        """Beat now and raise :class:`LockLost` if another process took the lock over
        (call before writing results that only the holder may write)."""
        if not self.beat():
            raise LockLost(f"{self.path.parent} was taken over by another process "
                           f"({self.path} now names it); this one stops")  # fmt: skip

    def beat(self) -> bool:
        """Refresh the heartbeat now; False (and :attr:`lost` set) if the lock is no longer ours."""
        if self.info is None or self.lost:
            return False
        with _guard(self.path.parent):
            current = read_lock(self.path)
            if current is None or current.token != self.info.token:
                self.lost = True
                return False
            self.info = LockInfo(**{**asdict(self.info), "beat": time.time()})
            with contextlib.suppress(OSError):  # a full disk must not kill the holder
                self._write(self.info, replace=True)
        return True

    def release(self) -> None:
        """Stop beating and remove the lock file if it is still ours."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._thread = None
        if self.info is None:
            return
        with _guard(self.path.parent):
            current = read_lock(self.path)
            if current is not None and current.token == self.info.token:
                self.path.unlink(missing_ok=True)
        self.info = None

    def __enter__(self) -> Lock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _missing_parents(folder: Path) -> list[Path]:
    """``folder`` and those of its parents that do not exist yet, innermost first."""
    out = []
    for p in [folder, *folder.parents]:
        if p.exists():
            break
        out.append(p)
    return out


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, what: str, *,
                heartbeat: float | None = DEFAULT_HEARTBEAT,
                stale_after: float = DEFAULT_STALE_AFTER, wait: float = 0.0) -> Iterator[Lock]:  # fmt: skip
    """Hold ``folder/.condnoise.lock`` for the block (raises :class:`LockHeld` when a live
    process still holds it after ``wait`` seconds, :meth:`Lock.acquire`). The folder is created if missing; folders this call created and
    that are still empty at the end are removed again, so a command that fails before
    writing anything leaves nothing behind."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder} exists and is not a folder")
    created = _missing_parents(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        from condnoise.io import unwritable_reason

        raise UserError(f"cannot create folder {folder}: {unwritable_reason(folder, e)}") from None
    try:
        lock = Lock(folder / LOCK_NAME, what, heartbeat=heartbeat, stale_after=stale_after)
        lock.acquire(wait)
        try:
            yield lock
        finally:
            lock.release()
    finally:
        for p in created:  # innermost first; stops at the first non-empty one
            try:
                p.rmdir()
            except OSError:
                break


@contextlib.contextmanager
def folder_locks(folders: list[Path], what: str, **kwargs: float | None) -> Iterator[list[Lock]]:
    """:func:`folder_lock` on several folders (taken in sorted order, so two commands
    locking overlapping sets cannot deadlock; nothing here waits anyway)."""
    with contextlib.ExitStack() as stack:
        locks = [stack.enter_context(folder_lock(f, what, **kwargs))  # type: ignore[arg-type]
                 for f in sorted({Path(f).resolve() for f in folders})]  # fmt: skip
        yield locks
