"""`condnoise train --run-dir`: never writes into a folder that is not a run (unless
--force), and a run that fails before its first step leaves no run files behind."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from condnoise.app.cli import main
from condnoise.locks import LOCK_NAME
from condnoise.training.checkpoint import list_checkpoints

TINY = ["model.size=T/2", "model.hidden=32", "model.depth=1", "model.heads=2", "model.patch=2",
        "train.steps=2", "train.batch_size=8", "train.ckpt_every=2", "train.sample_every=0",
        "train.warmup=0", "train.threads=1", "run.progress=false", "run.tensorboard=false"]


def _image_folder(root: Path, *, junk: bool) -> Path:
    """Two classes of four 8x8 gray PNGs; with ``junk`` the last file of class b is not an image."""
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(root / cls / f"{i}.png")
    if junk:
        (root / "b" / "3.png").write_bytes(b"this is not a PNG")
    return root


def _train(run: Path, source: str, *extra: str) -> int:
    return main(["train", "fmnist-dit-s", f"data.source={source}", "data.image_size=8", *TINY,
                 "--run-dir", str(run), *extra])


def test_data_that_fails_at_the_first_batch_leaves_no_run(tmp_path, capsys):
    images = _image_folder(tmp_path / "images", junk=True)
    run = tmp_path / "runs" / "r1"
    assert _train(run, f"imagefolder:{images}") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "3.png" in err, err
    assert not (tmp_path / "runs").exists()  # the folders the command made are gone too
    (images / "b" / "3.png").unlink()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(images / "b" / "3.png")
    assert _train(run, f"imagefolder:{images}") == 0  # no --resume needed
    assert list_checkpoints(run) == [2]


def test_a_run_killed_before_step_1_is_started_again_without_resume(tmp_path):
    run = tmp_path / "run"
    assert _train(run, "digits", "--max-steps", "1") == 0
    shutil.rmtree(run / "checkpoints")  # as if killed before step 1
    (run / "metrics.jsonl").unlink()
    assert (run / "config.yaml").is_file()
    assert _train(run, "digits") == 0
    assert list_checkpoints(run) == [2]


def test_a_folder_that_is_not_a_run_needs_force(tmp_path, capsys):
    folder = tmp_path / "corrupt-sym-5"
    folder.mkdir()
    (folder / "manifest.csv").write_text("index,original,corrupted\n")
    assert _train(folder, "digits") == 2
    assert "--force" in capsys.readouterr().err
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.csv"]
    assert _train(folder, "digits", "--force") == 0
    assert (folder / "manifest.csv").read_text() == "index,original,corrupted\n"
    assert list_checkpoints(folder) == [2] and not (folder / LOCK_NAME).exists()


@pytest.mark.parametrize("name", ["config.yaml", "run.json"])
def test_a_damaged_run_file_is_named(tmp_path, capsys, name):
    run = tmp_path / "run"
    assert _train(run, "digits") == 0
    (run / name).write_text("{ not: [valid\n" if name == "config.yaml" else "{\n  oops\n}")
    assert main(["sample", str(run), "--out", str(tmp_path / "gen")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(run / name) in err and "line 2 column" in err, err
