"""condnoise.io: atomic writes that follow the umask and fail with one line naming the path;
checked reads of JSON (line and column) and .npz files (empty, truncated)."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest

from condnoise.errors import UserError
from condnoise.io import atomic_open, read_json, read_npz, write_bytes, write_json, write_text


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask():
    """Set the process umask for a test (restored afterwards)."""
    old = os.umask(0o022)
    os.umask(old)
    yield lambda mask: os.umask(mask)
    os.umask(old)


def test_new_files_follow_the_umask_and_replaced_files_keep_their_mode(tmp_path, umask):
    umask(0o022)
    write_json(tmp_path / "a.json", {"x": 1})
    write_bytes(tmp_path / "b.bin", b"x")
    with atomic_open(tmp_path / "c.npz", "wb") as f:
        np.savez(f, x=np.zeros(2))
    assert [_mode(tmp_path / n) for n in ("a.json", "b.bin", "c.npz")] == [0o644] * 3
    umask(0o077)
    write_text(tmp_path / "d.txt", "private")
    assert _mode(tmp_path / "d.txt") == 0o600
    os.chmod(tmp_path / "a.json", 0o640)
    umask(0o022)
    write_json(tmp_path / "a.json", {"x": 2})
    assert _mode(tmp_path / "a.json") == 0o640 and read_json(tmp_path / "a.json") == {"x": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.bin", "c.npz", "d.txt"]


def test_a_run_folder_is_readable_by_others_under_umask_022(tmp_path, umask):
    from condnoise.training import load_config, train

    umask(0o022)
    overrides = ["data.source=digits", "data.image_size=null", "model.size=T/2",
                 "model.hidden=32", "model.depth=1", "model.heads=2", "model.patch=2",
                 "train.steps=1", "train.batch_size=16", "train.ckpt_every=1",
                 "train.sample_every=1", "train.sample_steps=2", "train.sample_per_class=1",
                 "train.threads=1", "run.progress=false", "run.tensorboard=false"]  # fmt: skip
    train(load_config("fmnist-dit-s", overrides), run_dir=tmp_path / "run", device="cpu")
    files = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"config.yaml", "run.json", "provenance.json",
                                        "metrics.jsonl", "state.pt", "ema.safetensors",
                                        "step_00000001.png"}  # fmt: skip
    assert {p.name: oct(_mode(p)) for p in files if _mode(p) != 0o644} == {}


def test_a_failed_write_is_one_line_naming_the_path(tmp_path):
    (tmp_path / "afile").write_text("in the way")
    with pytest.raises(UserError, match=rf"cannot write {tmp_path}/afile/x.json: {tmp_path}/afile is a file, not a folder"):
        write_json(tmp_path / "afile" / "x.json", {})
    (tmp_path / "dir.json").mkdir()
    with pytest.raises(UserError, match=rf"cannot write {tmp_path}/dir.json: Is a directory"):
        write_json(tmp_path / "dir.json", {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "dir.json"]  # no temp files


def test_read_json_names_the_file_line_and_column(tmp_path):
    path = tmp_path / "meta.json"
    path.write_text('{\n  "a": 1,\n  "b": \n}\n')
    with pytest.raises(UserError, match=rf"{path}: invalid JSON at line 4 column 1: Expecting value"):
        read_json(path)
    path.write_text("[1, 2]")
    with pytest.raises(UserError, match="expected a JSON object, got list"):
        read_json(path)
    with pytest.raises(UserError, match="not found"):
        read_json(tmp_path / "missing.json")


def test_read_npz_refuses_empty_truncated_and_incomplete_files(tmp_path):
    good = tmp_path / "good.npz"
    np.savez(good, images=np.arange(4000, dtype=np.uint8), labels=np.arange(3))
    assert read_npz(good, ("images",))["labels"].tolist() == [0, 1, 2]
    data = good.read_bytes()
    for name, body in (("empty", b""), ("half", data[: len(data) // 2]), ("tail", data[:-30]),
                       ("text", b"not an npz")):  # fmt: skip
        path = tmp_path / f"{name}.npz"
        path.write_bytes(body)
        with pytest.raises(UserError, match=rf"cannot read {path}: "):
            read_npz(path)
    with pytest.raises(UserError, match=r"missing array\(s\) \['indices'\]"):
        read_npz(good, ("images", "indices"))
