"""SIGKILL a real `condnoise train` process after a checkpoint, `--resume`, and get the
uninterrupted run's losses and weights bitwise (CPU, same seed)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from condnoise.training.checkpoint import list_checkpoints
from condnoise.training.rundir import read_metrics

STEPS = 24
CONFIG = {
    "data": {"source": "digits", "image_size": 8},
    "model": {"family": "dit", "size": "T/2", "hidden": 64, "depth": 2, "heads": 2,
              "cfg_dropout": 0.1, "perturbation": {"name": "cep-g", "gamma": 1.0}},
    "train": {"steps": STEPS, "batch_size": 64, "lr": 1e-3, "warmup": 5, "ema_decay": 0.99,
              "ckpt_every": 3, "keep_last": 2, "sample_every": 0, "threads": 1},
    "run": {"progress": False, "tensorboard": False},
}


def _cmd(cfg: Path, run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "condnoise", "train", str(cfg), "--run-dir", str(run_dir),
            *extra]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


def test_sigkill_then_resume_reproduces_losses_bitwise(tmp_path):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(CONFIG))
    ref, killed = tmp_path / "ref", tmp_path / "killed"

    # the run to be killed: a long schedule so it cannot finish before the kill
    proc = subprocess.Popen(_cmd(cfg, killed, "--max-steps", "100000"), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    # meanwhile, the uninterrupted reference run
    ref_proc = subprocess.Popen(_cmd(cfg, ref), env=_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while not list_checkpoints(killed):
        assert proc.poll() is None, proc.stderr.read().decode()  # type: ignore[union-attr]
        assert time.monotonic() < deadline, "no checkpoint was written in time"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    last = list_checkpoints(killed)[-1]
    logged = [r["step"] for r in read_metrics(killed)]
    if last >= STEPS:
        pytest.fail(f"the killed run got to step {last} before SIGKILL; raise STEPS")

    assert ref_proc.wait(timeout=300) == 0, ref_proc.stderr.read().decode()  # type: ignore[union-attr]
    out = subprocess.run(_cmd(cfg, killed, "--resume", "--max-steps", str(STEPS)), env=_env(),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    ref_rec, res_rec = read_metrics(ref), read_metrics(killed)
    assert [r["step"] for r in res_rec] == list(range(1, STEPS + 1))  # no duplicates / gaps
    assert [r["loss"] for r in res_rec] == [r["loss"] for r in ref_rec]
    assert [r["grad_norm"] for r in res_rec] == [r["grad_norm"] for r in ref_rec]
    # the resumed part really was recomputed after the kill
    assert max(logged) >= last and last < STEPS
    for name in ("model.safetensors", "ema.safetensors"):
        a = load_file(ref / "checkpoints" / f"step_{STEPS:08d}" / name)
        b = load_file(killed / "checkpoints" / f"step_{STEPS:08d}" / name)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_existing_run_dir_needs_resume_and_same_config(tmp_path):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump({**CONFIG, "train": {**CONFIG["train"], "steps": 2}}))
    run = tmp_path / "run"
    from condnoise.app.cli import main

    assert main(["train", str(cfg), "--run-dir", str(run)]) == 0
    assert list_checkpoints(run) == [2]
    assert main(["train", str(cfg), "--run-dir", str(run)]) == 2  # exists, no --resume
    assert main(["train", str(cfg), "--run-dir", str(run), "--resume", "train.lr=0.5"]) == 2
    assert main(["train", str(cfg), "--run-dir", str(tmp_path / "none"), "--resume"]) == 2
    # more steps is a valid resume
    assert main(["train", str(cfg), "--run-dir", str(run), "--resume", "--max-steps", "3"]) == 0
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3]
