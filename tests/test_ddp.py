"""DDP with 2 gloo processes on CPU = 1 process on the union batch (same parameter update),
launched the way the README says: ``torchrun --nproc_per_node 2 -m condnoise train``."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import torch
import yaml
from safetensors.torch import load_file

from condnoise.training.config import Config
from condnoise.training.rundir import read_metrics
from condnoise.training.trainer import train

STEPS = 3


def _config(run_dir) -> Config:
    # cep-fixed: its noise is a pure function of sample_index, so the two ranks draw exactly
    # what one process draws for the union batch; CFG dropout (rank-local RNG) is off here.
    raw = {
        "data": {"source": "digits", "image_size": 8},
        "model": {"family": "dit", "size": "T/2", "hidden": 32, "depth": 2, "heads": 2,
                  "cfg_dropout": 0.0,
                  "perturbation": {"name": "cep-fixed", "gamma": 1.0, "fraction": 0.5}},
        "train": {"steps": STEPS, "batch_size": 32, "lr": 1e-3, "ema_decay": 0.9,
                  "ckpt_every": STEPS, "sample_every": 0, "threads": 1},
        "run": {"name": "ddp", "dir": str(run_dir), "progress": False, "tensorboard": False},
    }
    return Config.from_dict(raw, origin="test").validate("test")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_gloo_ranks_equal_one_process_on_the_union_batch(tmp_path):
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    cfg = tmp_path / "c.yaml"
    raw = _config(ddp).to_dict()
    raw["run"].pop("dir")
    cfg.write_text(yaml.safe_dump(raw))
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
         "-m", "condnoise", "train", str(cfg), "--run-dir", str(ddp)],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )
    torch.set_num_threads(1)
    train(_config(single), sample_hook=None)  # meanwhile, the single-process reference
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]

    assert json.loads((ddp / "run.json").read_text())["world_size"] == 2
    step = f"step_{STEPS:08d}"
    for name in ("model.safetensors", "ema.safetensors"):
        a = load_file(single / "checkpoints" / step / name)
        b = load_file(ddp / "checkpoints" / step / name)
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=1e-5, msg=f"{name}:{k}")
    la = [r["loss"] for r in read_metrics(single)]
    lb = [r["loss"] for r in read_metrics(ddp)]
    assert [r["step"] for r in read_metrics(ddp)] == list(range(1, STEPS + 1))
    torch.testing.assert_close(torch.tensor(lb), torch.tensor(la), atol=1e-6, rtol=1e-6)
    assert la[0] != la[-1]  # the parameters really were updated
