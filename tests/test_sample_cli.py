"""``condnoise sample`` / ``condnoise walk`` on a real tiny run trained with the trainer API."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from condnoise.app.cli import main
from condnoise.diffusion.sampling import SweepConfig, run_sweep

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A tiny class-conditional DiT trained 30 steps on scikit-learn digits (8x8, 10 classes)."""
    from condnoise.training import load_config, train

    overrides = [
        "data.source=digits", "data.image_size=null", "model.size=T/4", "model.hidden=32",
        "model.depth=2", "model.heads=2", "model.patch=2", "train.steps=30",
        "train.batch_size=64", "train.ckpt_every=30", "train.sample_every=0", "train.warmup=0",
        "train.threads=1", "run.progress=false", "run.tensorboard=false",
    ]  # fmt: skip
    out = tmp_path_factory.mktemp("run") / "digits"
    train(load_config("fmnist-dit-s", overrides), run_dir=out, device="cpu")
    return out


def cli(*args: object) -> int:
    return main([str(a) for a in args])


SWEEP = ("--num", 12, "--sampler", "ddim", "--steps", 4, "--shard-size", 5, "--batch-size", 4)


def test_sweep_writes_every_scale(run_dir, tmp_path):
    out = tmp_path / "gen"
    assert cli("sample", run_dir, "--guidance", "1,2.5", *SWEEP, "--out", out, "--png") == 0
    assert json.loads((out / "provenance.json").read_text())["config"]["guidances"] == [1.0, 2.5]
    pairs = {}
    for name, scale in (("s1", 1.0), ("s2.5", 2.5)):
        folder = out / name
        with np.load(folder / "samples.npz") as data:
            images, labels = data["images"], data["labels"]
        assert images.shape == (12, 8, 8, 1) and images.dtype == np.uint8
        assert labels.dtype == np.int64 and labels.tolist() == [i % 10 for i in range(12)]
        meta = json.loads((folder / "meta.json").read_text())
        assert meta["guidance"] == scale and meta["num"] == 12 and meta["checkpoint_step"] == 30
        assert meta["sampler"] == "ddim" and meta["class_names"][3] == "3"
        assert Image.open(folder / "grid.png").size[0] > 8
        pngs = sorted((folder / "png").rglob("*.png"))
        assert len(pngs) == 12 and pngs[0].parent.name == "000_0"
        assert np.array_equal(np.asarray(Image.open(pngs[0])), images[0, :, :, 0])
        assert not (folder / "shards").exists()  # merged, then removed
        pairs[name] = images
    assert not np.array_equal(pairs["s1"], pairs["s2.5"])  # guidance changes the samples


def test_resume_skips_finished_shards(run_dir, tmp_path):
    out = tmp_path / "gen"
    args = ("sample", run_dir, "--guidance", "2", *SWEEP, "--out", out, "--keep-shards")
    assert cli(*args) == 0
    shards = out / "s2" / "shards"
    first = np.load(out / "s2" / "samples.npz")["images"]
    assert sorted(p.name for p in shards.glob("shard_*.npz")) == [
        "shard_00000.npz", "shard_00001.npz", "shard_00002.npz"]  # fmt: skip
    # simulate an interrupted run: shard 1 and the merge are missing
    (shards / "shard_00001.npz").unlink()
    (out / "s2" / "samples.npz").unlink()
    (out / "s2" / "meta.json").unlink()
    kept = {p.name: p.stat().st_mtime_ns for p in shards.glob("shard_*.npz")}
    assert cli(*args) == 0
    for name, mtime in kept.items():
        assert (shards / name).stat().st_mtime_ns == mtime  # not regenerated
    assert (shards / "shard_00001.npz").is_file()
    assert np.array_equal(np.load(out / "s2" / "samples.npz")["images"], first)
    # a complete scale is left alone
    done = (out / "s2" / "samples.npz").stat().st_mtime_ns
    assert cli(*args) == 0
    assert (out / "s2" / "samples.npz").stat().st_mtime_ns == done
    # other settings into the same folder are refused, not mixed
    assert cli(*args[:-1], "--seed", 5) == 2


def test_sharded_ranks_match_one_process(run_dir, tmp_path):
    """Rank r makes shards k % world == r; the merge equals a single-process sweep."""
    from condnoise.training import load_run

    run = load_run(run_dir)
    cfg = SweepConfig(guidances=[2.0], num=11, sampler="dpm++", steps=4, shard_size=3,
                      batch_size=2, classes="random", seed=3)  # fmt: skip
    run_sweep(run, run_dir, tmp_path / "one", cfg)
    for rank in (1, 2, 0):  # rank 0 last: it merges once the others are done (barrier)
        run_sweep(run, run_dir, tmp_path / "three", cfg, rank=rank, world_size=3)
    a = np.load(tmp_path / "one" / "s2" / "samples.npz")
    b = np.load(tmp_path / "three" / "s2" / "samples.npz")
    assert np.array_equal(a["labels"], b["labels"]) and len(set(a["labels"].tolist())) > 3
    assert np.abs(a["images"].astype(int) - b["images"].astype(int)).max() <= 1


def test_torchrun_two_ranks(run_dir, tmp_path):
    out = tmp_path / "dist"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "condnoise", "sample", str(run_dir), "--guidance", "2", "--num-samples", "6",
           "--sampler", "ddim", "--steps", "3", "--shard-size", "2", "--device", "cpu",
           "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with np.load(out / "s2" / "samples.npz") as data:
        assert data["images"].shape == (6, 8, 8, 1)
    meta = json.loads((out / "s2" / "meta.json").read_text())
    assert meta["num"] == 6
    assert json.loads((out / "provenance.json").read_text())["config"]["world_size"] == 2


def test_walk_writes_a_closed_loop_strip(run_dir):
    assert cli("walk", run_dir, "--class", "7", "--frames", 5, "--rows", 2, "--steps", 4) == 0
    folder = run_dir / "walks"
    strip = Image.open(folder / "walk_7_s2.png")
    assert strip.size == (5 * 10 + 2, 2 * 10 + 2)
    data = np.load(folder / "walk_7_s2.npz")
    assert data["images"].shape == (10, 8, 8, 1) and int(data["label"]) == 7
    assert np.allclose(data["thetas"], 2 * np.pi * np.arange(5) / 5)
    assert json.loads((folder / "walk_7_s2.json").read_text())["class"] == "7"
    assert (folder / "provenance.json").is_file()


def test_cli_errors(run_dir, tmp_path, capsys):
    out = tmp_path / "x"
    bare = tmp_path / "bare"
    shutil.copytree(run_dir, bare, ignore=shutil.ignore_patterns("checkpoints", "walks"))
    assert cli("sample", bare, "--out", out) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert cli("sample", tmp_path / "missing", "--out", out) == 2
    assert "not found" in capsys.readouterr().err
    assert cli("sample", run_dir, "--guidance", "1.5,two", "--out", out) == 2
    assert "'two' is not a number" in capsys.readouterr().err
    assert cli("sample", run_dir, "--classes", "cat", "--out", out, "--num", 2) == 2
    assert "unknown class 'cat'" in capsys.readouterr().err
    assert cli("sample", run_dir, "--steps", 5000, "--out", out) == 2
    assert "--steps 5000" in capsys.readouterr().err
    assert cli("sample", run_dir, "--sampler", "euler", "--out", out) == 2
    assert "invalid choice: 'euler'" in capsys.readouterr().err
    assert cli("walk", run_dir, "--class", "11") == 2
    assert "unknown class '11'" in capsys.readouterr().err
    assert not out.exists()
