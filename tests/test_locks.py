"""Folder locks (condnoise.locks): exclusive, stale when the holder is gone on this host or
its heartbeat stops, taken over with a warning; and the commands that hold them."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from condnoise.locks import (
    LOCK_NAME,
    Lock,
    LockHeld,
    LockTakeoverWarning,
    folder_lock,
    process_start,
    read_lock,
    stale_reason,
)

REPO = Path(__file__).resolve().parents[1]

HOLDER = """
import sys, time
from condnoise.locks import Lock
lock = Lock(sys.argv[1], "holder", heartbeat=float(sys.argv[2]), stale_after=float(sys.argv[3]))
if not lock.try_acquire():
    print("busy", flush=True)
    sys.exit(3)
print("ready", flush=True)
end = time.monotonic() + float(sys.argv[4])
while time.monotonic() < end and not lock.lost:
    time.sleep(0.05)
print("lost" if lock.lost else "done", flush=True)
lock.release()
"""


def _holder(path: Path, heartbeat: float = 0.2, stale_after: float = 60.0,
            hold: float = 60.0) -> subprocess.Popen:  # fmt: skip
    """A separate Python process that takes the lock at ``path`` and holds it."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(path), str(heartbeat), str(stale_after), str(hold)],
        stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert proc.stdout.readline().strip() == "ready"  # type: ignore[union-attr]
    return proc


def _dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_lock_file_records_the_holder_and_is_removed_on_release(tmp_path):
    path = tmp_path / "run" / LOCK_NAME
    with Lock(path, "train", heartbeat=None) as lock:
        info = read_lock(path)
        assert info == lock.info
        assert (info.what, info.host, info.pid) == ("train", socket.gethostname(), os.getpid())
        assert info.pid_start == process_start(os.getpid())
        assert json.loads(path.read_text())["started"] == info.started
        assert sorted(p.name for p in path.parent.iterdir()) == [LOCK_NAME]  # no temp files
    assert not path.exists()


def test_a_live_holder_is_named_and_keeps_its_lock(tmp_path):
    path = tmp_path / LOCK_NAME
    proc = _holder(path)
    try:
        with pytest.raises(LockHeld, match=rf"in use by holder \(pid {proc.pid} on "):
            Lock(path, "second").acquire()
        assert not Lock(path, "second").try_acquire()
    finally:
        proc.kill()
        proc.wait()


def test_a_killed_holder_on_this_host_is_taken_over_with_a_warning(tmp_path):
    path = tmp_path / LOCK_NAME
    proc = _holder(path, heartbeat=30)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert stale_reason(read_lock(path)) == f"process {proc.pid} is gone"
    with pytest.warns(LockTakeoverWarning, match=f"pid {proc.pid}.*process {proc.pid} is gone"):
        lock = Lock(path, "second").acquire()
    assert read_lock(path).pid == os.getpid()
    lock.release()


def test_pid_reuse_and_older_lock_formats(tmp_path):
    me = os.getpid()
    base = dict(what="x", host=socket.gethostname(), started=0.0, beat=0.0, heartbeat=None,
                token="t")  # fmt: skip
    from condnoise.locks import LockInfo

    assert stale_reason(LockInfo(pid=me, pid_start=process_start(me), **base)) is None
    assert stale_reason(LockInfo(pid=me, pid_start="1", **base)) is not None  # pid reused
    assert stale_reason(LockInfo(pid=_dead_pid(), **base)) is not None
    other = LockInfo(pid=_dead_pid(), **{**base, "host": "another-node"})
    assert stale_reason(other) is None  # cannot see that node's processes, no heartbeat
    legacy = tmp_path / ".abc.lock"  # what condnoise studies wrote before heartbeats
    legacy.write_text(f"{socket.gethostname()}:{_dead_pid()}")
    with pytest.warns(LockTakeoverWarning):
        assert Lock(legacy, "study cell").try_acquire()


def test_heartbeat_keeps_a_slow_live_holder_and_frees_a_stopped_one(tmp_path):
    """The holder beats every 0.2 s; the other worker treats a beat older than 1.2 s as gone.
    Alive past that timeout it keeps the lock; stopped with SIGSTOP it loses it, and once
    continued it notices that the lock was taken over."""
    path = tmp_path / LOCK_NAME
    proc = _holder(path, heartbeat=0.2, stale_after=1.2)
    try:
        first_beat = read_lock(path).beat
        time.sleep(2.0)
        assert read_lock(path).beat > first_beat
        assert not Lock(path, "other", heartbeat=0.2, stale_after=1.2).try_acquire()
        proc.send_signal(signal.SIGSTOP)
        time.sleep(2.0)
        taker = Lock(path, "other", heartbeat=0.2, stale_after=1.2)
        with pytest.warns(LockTakeoverWarning, match="no heartbeat for"):
            assert taker.try_acquire()
        proc.send_signal(signal.SIGCONT)
        assert proc.stdout.readline().strip() == "lost"  # type: ignore[union-attr]
        assert proc.wait(timeout=30) == 0
        assert read_lock(path).token == taker.info.token  # the holder did not write over it
        taker.release()
        assert not path.exists()
    finally:
        proc.kill()
        proc.wait()


def test_acquire_waits_for_a_holder_that_goes_silent_or_finishes(tmp_path):
    """``acquire(wait)`` retries: a holder stopped just before the call is taken over once
    its beat is older than the timeout; one that releases meanwhile hands the lock on; a
    live one past the wait is named in LockHeld."""
    path = tmp_path / LOCK_NAME
    proc = _holder(path, heartbeat=0.2, stale_after=1.0)
    try:
        with pytest.raises(LockHeld, match="holder"):
            Lock(path, "other", heartbeat=0.2, stale_after=1.0).acquire(wait=0.5)
        proc.send_signal(signal.SIGSTOP)
        taker = Lock(path, "other", heartbeat=0.2, stale_after=1.0)
        with pytest.raises(LockHeld):
            Lock(path, "other", heartbeat=0.2, stale_after=1.0).acquire()  # no wait: at once
        with pytest.warns(LockTakeoverWarning, match="no heartbeat for"):
            taker.acquire(wait=10.0)
        assert read_lock(path).token == taker.info.token
        taker.release()
    finally:
        proc.send_signal(signal.SIGCONT)
        proc.kill()
        proc.wait()
    proc = _holder(path, heartbeat=0.2, stale_after=60.0, hold=1.0)  # releases after 1 s
    try:
        started = time.monotonic()
        with folder_lock(tmp_path, "next", heartbeat=1.0, stale_after=60.0, wait=30.0) as lock:
            assert read_lock(path).token == lock.info.token
        assert 0.5 < time.monotonic() - started < 30.0
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
        proc.wait()


def test_only_one_of_many_processes_takes_over_a_stale_lock(tmp_path):
    path = tmp_path / LOCK_NAME
    path.write_text(json.dumps(dict(what="dead", host=socket.gethostname(), pid=_dead_pid(),
                                    started=0.0, beat=0.0, heartbeat=None, token="old")))
    script = HOLDER.replace('print("ready", flush=True)', 'print("won", flush=True)')
    procs = [subprocess.Popen([sys.executable, "-W", "ignore", "-c", script, str(path), "0.2",
                               "60", "3"], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)}) for _ in range(6)]
    outputs = [p.communicate(timeout=120)[0].split() for p in procs]
    assert sum(out[:1] == ["won"] for out in outputs) == 1, outputs
    assert sum(out == ["busy"] for out in outputs) == 5, outputs


def test_folder_lock_removes_the_folders_it_created_when_they_stay_empty(tmp_path):
    target = tmp_path / "a" / "b"
    with folder_lock(target, "sample"):
        assert (target / LOCK_NAME).is_file()
    assert not (tmp_path / "a").exists()
    with folder_lock(target, "sample"):
        (target / "out.txt").write_text("kept")
    assert sorted(p.name for p in target.iterdir()) == ["out.txt"]
    with pytest.raises(LockHeld), folder_lock(target, "one"), folder_lock(target, "two"):
        pass
    assert sorted(p.name for p in target.iterdir()) == ["out.txt"]


# --------------------------------------------------------------------------- commands


def _tiny_config(tmp_path: Path, steps: int = 2) -> Path:
    import yaml

    cfg = {
        "data": {"source": "digits", "image_size": None},
        "model": {"family": "dit", "size": "T/2", "hidden": 32, "depth": 1, "heads": 2,
                  "patch": 2},
        "train": {"steps": steps, "batch_size": 16, "ckpt_every": steps, "sample_every": 0,
                  "threads": 1, "warmup": 0},
        "run": {"progress": False, "tensorboard": False},
    }  # fmt: skip
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_train_on_a_folder_held_by_another_process_exits_2_naming_it(tmp_path, capsys):
    """A second command on a locked run folder exits 2 naming the holder; once the holder is
    killed, the next command takes its lock over with a one-line warning and runs."""
    from condnoise.app.cli import main

    run = tmp_path / "run"
    proc = _holder(run / LOCK_NAME, heartbeat=30)
    try:
        before = sorted(p.name for p in run.iterdir())
        assert main(["train", str(_tiny_config(tmp_path)), "--run-dir", str(run)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"pid {proc.pid}" in err and str(run) in err, err
        assert sorted(p.name for p in run.iterdir()) == before
    finally:
        proc.kill()
        proc.wait()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the CLI prints its own warnings, never Python's
        assert main(["train", str(_tiny_config(tmp_path)), "--run-dir", str(run)]) == 0
    err = capsys.readouterr().err
    assert f"condnoise: warning: taking over the lock {run / LOCK_NAME}" in err, err
    assert (run / "config.yaml").is_file() and not (run / LOCK_NAME).exists()
