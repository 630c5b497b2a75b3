"""Training and sampling with captions: `scenes`, `captions:` and `wds:` sources, the wds
stream (shards reshuffled per epoch, split over ranks and workers, resumable), SIGKILL and
bitwise resume of `condnoise train scenes-unet-s --perturb cep-u` on scenes and on wds
shards made from scenes, and `condnoise sample` with prompts."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from condnoise.app.cli import main
from condnoise.data import open_source
from condnoise.data.scenes import Scenes
from condnoise.training.checkpoint import list_checkpoints
from condnoise.training.rundir import read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["model.size=tiny", "model.encoder.depth=1", "train.batch_size=8", "train.sample_every=0",
        "train.threads=1", "run.progress=false", "run.tensorboard=false"]  # fmt: skip


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def write_scene_shards(folder: Path, n: int, per_shard: int) -> str:
    """The first ``n`` train scenes as WebDataset shards (``.png`` + ``.txt``); the pattern."""
    data = Scenes("train", num_samples=n)
    images, caps = data.images_uint8(), data.conditions()
    folder.mkdir(parents=True, exist_ok=True)
    shards = -(-n // per_shard)
    for s in range(shards):
        with tarfile.open(folder / f"scenes-{s:03d}.tar", "w") as tar:
            for i in range(s * per_shard, min(n, (s + 1) * per_shard)):
                for suffix, blob in (("png", _png(images[i])), ("txt", caps[i].encode())):
                    info = tarfile.TarInfo(f"{i:06d}.{suffix}")
                    info.size = len(blob)
                    tar.addfile(info, io.BytesIO(blob))
    return f"{folder}/scenes-{{000..{shards - 1:03d}}}.tar"


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_scene_shards(tmp_path_factory.mktemp("wds"), 100, 20)


def _take(it, k):
    return [next(it) for _ in range(k)]


def test_wds_stream_epochs_slots_and_resume(shards):
    src = open_source(f"wds:{shards}")
    assert src.meta.condition_kind == "caption" and len(src) == 100
    for slots in (2, 8):  # by shard (5 shards >= 2 slots), by sample (5 < 8)
        per_slot = [[i for i, _ in _take(src.stream(s, slots, seed=3), src._slot_plan(0, 3, s, slots)[2])]
                    for s in range(slots)]  # fmt: skip
        assert sorted(i for p in per_slot for i in p) == list(range(100))  # one epoch: each once
    e0, e1 = src.epoch_shards(0, 3), src.epoch_shards(1, 3)
    assert sorted(e0) == list(range(5)) and e0 != e1 and src.epoch_shards(0, 4) != e0
    full = [i for i, _ in _take(src.stream(1, 2, seed=3), 130)]  # crosses epochs
    resumed = [i for i, _ in _take(src.stream(1, 2, seed=3, start=47), 83)]
    assert resumed == full[47:]
    first = next(src.stream(0, 1, seed=3))
    img = torch.from_numpy(Scenes("train", num_samples=100).images_uint8()[first[0]].copy())
    assert torch.equal(first[1], img.permute(2, 0, 1).float() / 127.5 - 1)


def test_wds_batches_resume_with_two_workers(shards):
    from torch.utils.data import DataLoader

    from condnoise.training.data import _StreamBatches

    src = open_source(f"wds:{shards}")

    def batches(start, k, rank=0, world=1):
        loader = DataLoader(_StreamBatches(src, 0, 4, rank, world, start), batch_size=None, num_workers=2)
        it = iter(loader)
        out = [next(it)[1].tolist() for _ in range(k)]
        del it
        return out

    ref = batches(0, 12)
    assert batches(5, 7) == ref[5:]  # batch j comes from the worker of role j % 2
    # two ranks x two workers = four readers of the five shards: disjoint, one epoch covers all
    readers = [batches(0, 4, rank, 2) for rank in (0, 1)]
    seen = [i for r in readers for b in r for i in b]
    assert len(seen) == len(set(seen)) == 32
    per_rank = [sorted(i for b in r for i in b) for r in readers]
    assert not set(per_rank[0]) & set(per_rank[1])


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


def _train_cmd(run_dir, *extra):
    return [sys.executable, "-m", "condnoise", "train", "scenes-unet-s", "--perturb", "cep-u",
            "--run-dir", str(run_dir), "--ckpt-every", "4", *extra]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("source", ["scenes", "wds"])
def test_caption_training_resumes_bitwise_after_sigkill(tmp_path, scenes_env, shards, source):
    steps = 20
    over = ["train.batch_size=8", "train.sample_every=0", "train.threads=1", "run.progress=false",
            "run.tensorboard=false"]  # fmt: skip
    over += ["data.max_samples=512"] if source == "scenes" else [f"data.source=wds:{shards}"]
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(killed, "--max-steps", "100000", *over), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    ref_proc = subprocess.Popen(_train_cmd(ref, "--max-steps", str(steps), *over), env=_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    deadline = time.monotonic() + 600
    while not list_checkpoints(killed):
        assert proc.poll() is None, proc.stderr.read().decode()  # type: ignore[union-attr]
        assert time.monotonic() < deadline, "no checkpoint was written in time"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    last = list_checkpoints(killed)[-1]
    assert last < steps, f"the killed run got to step {last} before SIGKILL"
    assert ref_proc.wait(timeout=900) == 0, ref_proc.stderr.read().decode()  # type: ignore[union-attr]
    out = subprocess.run(_train_cmd(killed, "--resume", "--max-steps", str(steps), *over), env=_env(),
                         capture_output=True, text=True, timeout=900)  # fmt: skip
    assert out.returncode == 0, out.stderr
    a, b = read_metrics(ref), read_metrics(killed)
    assert [r["step"] for r in b] == list(range(1, steps + 1))
    assert [r["loss"] for r in b] == [r["loss"] for r in a]
    assert all(r["mean_l2_shift"] > 0 for r in a)  # CEP-U on the caption tokens
    for name in ("model.safetensors", "ema.safetensors"):
        x = load_file(ref / "checkpoints" / f"step_{steps:08d}" / name)
        y = load_file(killed / "checkpoints" / f"step_{steps:08d}" / name)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name
    info = json.loads((ref / "run.json").read_text())
    assert info["class_names"] == [] and info["model_config"]["encoder"]["name"] == "bert-embed"


@pytest.fixture(scope="module")
def text_run(tmp_path_factory, shards):
    run = tmp_path_factory.mktemp("text") / "run"
    assert main(["train", "scenes-unet-s", "--run-dir", str(run), "--max-steps", "2", f"data.source=wds:{shards}",
                 "train.num_workers=1", *TINY]) == 0  # fmt: skip
    return run


def test_sample_with_prompts_files_and_split_captions(text_run, tmp_path, scenes_env):
    out = tmp_path / "p"
    args = ["sample", str(text_run), "--guidance", "1,2", "--num", "5", "--steps", "2", "--sampler", "ddim"]
    assert main([*args, "--out", str(out), "--prompt", "a red bag", "--prompt", "two blue coats"]) == 0
    with np.load(out / "s2" / "samples.npz") as z:
        assert z["images"].shape == (5, 32, 32, 3) and z["labels"].tolist() == [0, 1, 0, 1, 0]
        assert list(z["captions"]) == ["a red bag", "two blue coats"] * 2 + ["a red bag"]
        first = z["images"].copy()
    grid = np.asarray(Image.open(out / "s2" / "grid.png"))
    assert grid.shape[1] == 2 * (32 + 2) + 2 and grid.shape[0] > 2 * (32 + 2)  # 2 per row, labels above
    assert main([*args, "--out", str(out), "--prompt", "a green bag"]) == 2  # other prompts, same --out
    file = tmp_path / "prompts.txt"
    file.write_text("a red bag\n\ntwo blue coats\n")
    again = tmp_path / "f"
    assert main([*args, "--out", str(again), "--prompts", str(file)]) == 0
    with np.load(again / "s2" / "samples.npz") as z:  # same seed and prompts: the same samples
        assert np.array_equal(z["images"], first)
    assert main([*args, "--out", str(tmp_path / "b"), "--prompts", str(file), "--batch-size", "2"]) == 0
    with np.load(tmp_path / "b" / "s2" / "samples.npz") as z:  # batching: float rounding only
        assert np.abs(z["images"].astype(int) - first.astype(int)).max() <= 1
    split = tmp_path / "c"
    assert main([*args, "--out", str(split), "--captions-from", "test", "--data", "scenes"]) == 0
    test = Scenes("test")
    with np.load(split / "s1" / "samples.npz") as z:
        assert z["source_indices"].tolist() == [0, 1, 2, 3, 4]
        assert list(z["captions"]) == test.conditions()[:5]
    meta = json.loads((split / "s1" / "meta.json").read_text())
    assert meta["prompts"] == {"source": "split:scenes:test", "count": 10000, "paired": True}


def test_prompt_bad_input(text_run, tmp_path, capsys):
    base = ["sample", str(text_run), "--num", "2", "--steps", "2", "--out", str(tmp_path / "o")]
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    for extra, message in [(["--prompts", str(empty)], "holds no prompt"),
                           ([], "text-conditional: give --prompt"),
                           (["--prompt", "a", "--prompts", str(empty)], "give one of"),
                           (["--prompt", "   "], "is empty"),
                           (["--prompt", "a bag", "--classes", "1"], "--classes")]:  # fmt: skip
        assert main([*base, *extra]) == 2, extra
        assert message in capsys.readouterr().err


def test_captions_source_and_kind_mismatch(tmp_path, scenes_env, capsys):
    data = Scenes("train", num_samples=24)
    (tmp_path / "img").mkdir()
    lines = []
    for i, (img, cap) in enumerate(zip(data.images_uint8(), data.conditions())):
        Image.fromarray(img).save(tmp_path / "img" / f"{i}.png")
        lines.append(json.dumps({"image": f"img/{i}.png", "caption": cap}))
    (tmp_path / "c.jsonl").write_text("\n".join(lines) + "\n")
    run = tmp_path / "run"
    assert main(["train", "scenes-unet-s", "--run-dir", str(run), "--max-steps", "2",
                 f"data.source=captions:{tmp_path / 'c.jsonl'}", *TINY]) == 0  # fmt: skip
    assert [r["step"] for r in read_metrics(run)] == [1, 2]
    (tmp_path / "img" / "3.png").unlink()
    assert main(["train", "scenes-unet-s", "--run-dir", str(tmp_path / "r2"),
                 f"data.source=captions:{tmp_path / 'c.jsonl'}", *TINY]) == 2  # fmt: skip
    assert "image file not found" in capsys.readouterr().err
    assert main(["train", "scenes-unet-s", "--run-dir", str(tmp_path / "r3"), "data.source=digits",
                 "data.image_size=8", *TINY]) == 2  # fmt: skip
    assert "has class conditions but the config trains a text model" in capsys.readouterr().err
    assert main(["train", "fmnist-unet-s", "--run-dir", str(tmp_path / "r4"), "data.source=scenes",
                 "train.sample_every=0"]) == 2  # fmt: skip
    assert "has caption conditions but the config trains a class model" in capsys.readouterr().err


def test_scenes_dit_preset_trains_and_samples(tmp_path, shards):
    run = tmp_path / "dit"
    assert main(["train", "scenes-dit-s", "--run-dir", str(run), "--max-steps", "2", f"data.source=wds:{shards}",
                 "model.depth=2", *TINY[1:]]) == 0  # fmt: skip
    cfg = json.loads((run / "run.json").read_text())["model_config"]
    assert cfg["family"] == "dit" and cfg["encoder"]["name"] == "bert-embed" and cfg["cond_dim"] == 128
    assert main(["sample", str(run), "--prompt", "a red bag", "--num", "2", "--steps", "2", "--guidance", "3",
                 "--out", str(tmp_path / "gen")]) == 0  # fmt: skip
    with np.load(tmp_path / "gen" / "s3" / "samples.npz") as z:
        assert z["images"].shape == (2, 32, 32, 3)


def test_fixed_caption_swaps_reach_the_token_table(tmp_path, scenes_env):
    from condnoise.conditioning.text import build_text_encoder
    from condnoise.data.corruption import corrupt
    from condnoise.training.config import DataConfig
    from condnoise.training.data import TrainData

    source = open_source("scenes", "train")
    manifest = corrupt(source, "swap", 0.05, seed=0)
    manifest.save(tmp_path / "swap", source.conditions())
    data = TrainData(DataConfig(source="scenes", corruption=str(tmp_path / "swap"), max_samples=2000), 0)
    enc = build_text_encoder("bert-embed", max_length=48, dim=32, depth=1, heads=2)
    table = data.attach_encoder(enc)
    clean = enc.tokenize(source.conditions()[:2000])
    changed = (table != clean).any(1).numpy()
    in_manifest = np.isin(np.arange(2000), manifest.index)
    assert not (changed & ~in_manifest).any() and 50 < changed.sum() <= in_manifest.sum() < 150
    assert torch.equal(table, enc.tokenize(data.dataset.conditions()[:2000]))
