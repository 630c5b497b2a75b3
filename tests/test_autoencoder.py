"""First-stage autoencoder training (issue 15): losses against hand computations, the EMA
codebook, bad input, bitwise resume after SIGKILL, the quick form and `autoencoder eval`."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from condnoise.errors import UserError
from condnoise.training.checkpoint import list_checkpoints
from condnoise.training.rundir import read_metrics

TINY = {
    "data": {"source": "digits", "image_size": 8},
    "model": {"kind": "vq", "downsample": 4, "width": 8, "channel_mult": [1, 1, 2],
              "layers_per_block": 1, "latent_channels": 3, "codebook_size": 32, "norm_groups": 4,
              "mid_attention": False},
    "loss": {"perceptual": "none", "disc_start": 3, "disc_weight": 0.5, "disc_layers": 1,
             "disc_width": 8},
    "train": {"steps": 12, "batch_size": 16, "lr": 1e-3, "ckpt_every": 3, "keep_last": 2,
              "sample_every": 6, "sample_count": 4, "log_every": 1, "threads": 1,
              "scaling_samples": 64},
    "run": {"progress": False, "tensorboard": False},
}


def _yaml(tmp_path: Path, cfg: dict, name: str = "tiny.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def _with(cfg: dict, section: str, **values) -> dict:
    return {**cfg, section: {**cfg[section], **values}}


# ----------------------------------------------------------------------------- losses


def test_adaptive_weight_matches_hand_computation():
    from condnoise.training.autoencoder_losses import adaptive_weight

    w = torch.tensor([1.0, -2.0], requires_grad=True)  # the "last layer"
    t, c = torch.tensor([0.5, 1.0]), torch.tensor([3.0, 4.0])
    rec = ((w - t) ** 2).sum()  # grad 2 (w - t) = (1, -6), norm sqrt(37)
    gan = (c * w).sum() * 2.0  # grad 2c = (6, 8), norm 10
    lam = adaptive_weight(rec, gan, w)
    assert lam.item() == pytest.approx(math.sqrt(37) / (10 + 1e-4), rel=1e-6)
    assert not lam.requires_grad
    # a GAN loss with a vanishing gradient is clamped at max_weight
    tiny = (c * w).sum() * 1e-12
    assert adaptive_weight(rec, tiny, w, max_weight=50.0).item() == 50.0


def test_hinge_losses_and_quantize_losses():
    from condnoise.models.first_stage import build_first_stage
    from condnoise.training.autoencoder_losses import hinge_d_loss, hinge_g_loss
    from condnoise.training.codebook import quantize, usage_stats

    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.0])
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * ((0 + 0.5) / 2 + (0 + 1) / 2))
    assert hinge_g_loss(fake).item() == pytest.approx(1.0)

    torch.manual_seed(0)
    model = build_first_stage("vq", in_channels=1, image_size=8, width=8, channel_mult=[1, 1, 1],
                              codebook_size=4, latent_channels=2, norm_groups=4)
    book = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [5.0, 5.0]])
    model.quantize.embedding.weight.data.copy_(book)
    # two positions [B=1, D=2, h=1, w=2]: vectors (0.1, 0.9) -> code 2 and (0.9, 0.2) -> code 1
    h = torch.tensor([[[[0.1, 0.9]], [[0.9, 0.2]]]], requires_grad=True)
    flat = h.detach().permute(0, 2, 3, 1).reshape(-1, 2)
    q = quantize(model, h)
    nearest = torch.tensor([2, 1])
    assert q.indices.tolist() == nearest.tolist()
    e = book[nearest]
    assert q.commitment_loss.item() == pytest.approx(((flat - e) ** 2).mean().item())
    assert q.codebook_loss.item() == pytest.approx(q.commitment_loss.item())
    torch.testing.assert_close(q.z_q.detach().permute(0, 2, 3, 1).reshape(-1, 2), e)
    q.z_q.sum().backward()  # straight-through: d z_q / d h = identity
    torch.testing.assert_close(h.grad, torch.ones_like(h))
    stats = usage_stats(torch.tensor([0, 0, 1, 3]), 4)
    p = np.array([0.5, 0.25, 0.25])
    assert stats["usage"] == 0.75
    assert stats["perplexity"] == pytest.approx(math.exp(-(p * np.log(p)).sum()))


def test_ema_codebook_update_and_dead_code_restart():
    from condnoise.training.codebook import EMACodebook

    ema = EMACodebook(3, 2, decay=0.5, dead_threshold=1.0, eps=0.0)
    book = torch.zeros(3, 2)
    ema.count.fill_(4.0)
    ema.sum.copy_(torch.zeros(3, 2))
    ema.count[2] = 0.0  # code 2: dead
    flat = torch.tensor([[2.0, 0.0], [4.0, 0.0], [0.0, 6.0]])
    idx = torch.tensor([0, 0, 1])
    gen = torch.Generator().manual_seed(0)
    restarted = ema.update(book, flat, idx, gen)
    # code 0: count 0.5*4 + 0.5*2 = 3, sum 0.5*(2+4, 0) = (3, 0) -> mean (1, 0) (n unchanged by eps=0)
    torch.testing.assert_close(ema.count[:2], torch.tensor([3.0, 2.5]))
    torch.testing.assert_close(book[0], torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(book[1], torch.tensor([0.0, 3.0]) / 2.5)
    assert restarted == 1  # code 2 restarted at one of the batch vectors
    assert any(torch.equal(book[2], v) for v in flat) and ema.count[2] == 1.0


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("extra, message", [
    (["train.steps=2", "loss.disc_start=5"], "loss.disc_start=5 is not below train.steps=2"),
    (["--kind", "gan"], "model.kind: invalid value 'gan'"),
    (["--downsample", "3"], "model.downsample: invalid value 3"),
    (["loss.perceptual=lpips", "loss.lpips_path=/nowhere/lpips.pt"], "loss.lpips_path: file not found"),
    (["model.channel_mult=[1,2]"], "needs 3 (log2(f) + 1)"),
    (["model.codebok_size=4"], "unknown key 'model.codebok_size'"),
])  # fmt: skip
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, extra, message):
    from condnoise.app.cli import main

    cfg = _yaml(tmp_path, TINY)
    assert main(["autoencoder", "train", str(cfg), "--run-dir", str(tmp_path / "r"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "r").exists()


def test_wrong_kind_folder_is_refused(tmp_path):
    from condnoise.models.autoencoder import DiffusersAutoencoder
    from condnoise.models.first_stage import build_first_stage

    folder = tmp_path / "vq"
    build_first_stage("vq", in_channels=1, image_size=8, width=8, channel_mult=[1, 1, 2],
                      codebook_size=8, norm_groups=4, embed_dim=2).save_pretrained(str(folder))
    with pytest.raises(UserError, match="holds a VQModel .* not a AutoencoderKL"):
        DiffusersAutoencoder(str(folder), kind="kl")
    ae = DiffusersAutoencoder(str(folder), kind="vq")
    assert ae.latent_shape((1, 8, 8)) == (2, 2, 2)  # vq_embed_dim, not latent_channels
    assert ae.encode(torch.zeros(1, 1, 8, 8)).shape == (1, 2, 2, 2)


# ----------------------------------------------------------------------------- resume


def _cmd(cfg: Path, run: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "condnoise", "autoencoder", "train", str(cfg), "--run-dir",
            str(run), "--no-progress", *extra]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


def _same_run(a: Path, b: Path, steps: int) -> None:
    ra, rb = read_metrics(a), read_metrics(b)
    assert [r["step"] for r in rb] == list(range(1, steps + 1))
    for key in ("loss", "grad_norm", "psnr"):
        assert [r[key] for r in ra] == [r[key] for r in rb], key
    for name in ("autoencoder.safetensors", "discriminator.safetensors", "codebook_ema.safetensors"):
        if not (a / "checkpoints" / f"step_{steps:08d}" / name).is_file():
            continue
        x = load_file(a / "checkpoints" / f"step_{steps:08d}" / name)
        y = load_file(b / "checkpoints" / f"step_{steps:08d}" / name)
        assert all(torch.equal(x[k], y[k]) for k in x), name
    fa = load_file(a / "autoencoder" / "diffusion_pytorch_model.safetensors")
    fb = load_file(b / "autoencoder" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(fa[k], fb[k]) for k in fa)


def test_sigkill_then_resume_is_bitwise(tmp_path):
    steps = TINY["train"]["steps"]
    cfg = _yaml(tmp_path, TINY)
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    proc = subprocess.Popen(_cmd(cfg, killed, "train.steps=100000"), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while not list_checkpoints(killed):
        assert proc.poll() is None, proc.stderr.read().decode()  # type: ignore[union-attr]
        assert time.monotonic() < deadline, "no checkpoint was written in time"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    last = list_checkpoints(killed)[-1]
    if last >= steps:
        pytest.fail(f"the killed run got to step {last} before SIGKILL; raise the steps")
    # the uninterrupted reference run, in this process
    from condnoise.training.autoencoder import train_autoencoder
    from condnoise.training.autoencoder_config import load_autoencoder_config

    threads = torch.get_num_threads()
    try:
        train_autoencoder(load_autoencoder_config(str(cfg)), run_dir=ref)
    finally:
        torch.set_num_threads(threads)
    # train.steps may change on resume; everything else must match config.yaml
    out = subprocess.run(_cmd(cfg, killed, "--resume"), env=_env(), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    _same_run(ref, killed, steps)
    assert (killed / "samples" / f"step_{steps:08d}.png").is_file()


def test_kl_resume_in_process_and_max_steps(tmp_path):
    """KL posterior noise is a function of (seed, step): --max-steps then --resume equals one run."""
    from condnoise.training.autoencoder import train_autoencoder
    from condnoise.training.autoencoder_config import load_autoencoder_config

    torch.set_num_threads(1)
    cfg_path = _yaml(tmp_path, _with(TINY, "train", steps=6, ckpt_every=100, sample_every=0))
    kl = ["model.kind=kl", "model.latent_channels=2"]
    full = train_autoencoder(load_autoencoder_config(str(cfg_path), kl), run_dir=tmp_path / "a")
    part = train_autoencoder(load_autoencoder_config(str(cfg_path), kl), run_dir=tmp_path / "b",
                             max_steps=4)
    assert part.step == 4 and list_checkpoints(tmp_path / "b") == [4]
    with pytest.raises(UserError, match="already holds a run"):
        train_autoencoder(load_autoencoder_config(str(cfg_path), kl), run_dir=tmp_path / "b")
    with pytest.raises(UserError, match="differs from .* model.latent_channels"):
        train_autoencoder(load_autoencoder_config(str(cfg_path), ["model.kind=kl"]),
                          run_dir=tmp_path / "b", resume=True)
    rest = train_autoencoder(load_autoencoder_config(str(cfg_path), kl), run_dir=tmp_path / "b",
                             resume=True)
    assert full.step == rest.step == 6
    _same_run(tmp_path / "a", tmp_path / "b", 6)
    assert "kl" in read_metrics(tmp_path / "a")[-1]
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(str(tmp_path / "a" / "autoencoder"))
    assert vae.config.scaling_factor > 0 and vae.config.latent_channels == 2


# ----------------------------------------------------------------------------- quick form + eval


def test_quick_form_loads_in_diffusers_and_eval(tmp_path, capsys, eval_env):
    from diffusers import VQModel

    from condnoise.app.cli import main
    from condnoise.models.autoencoder import DiffusersAutoencoder

    run = tmp_path / "quick"
    assert main(["autoencoder", "train", "fmnist-vq-f4", "--max-steps", "5", "--run-dir", str(run)]) == 0
    assert "diffusers folder" in capsys.readouterr().out
    vq = VQModel.from_pretrained(str(run / "autoencoder"))
    assert vq.config.num_vq_embeddings == 512 and vq.config.block_out_channels == [16, 32, 64]
    ae = DiffusersAutoencoder(str(run / "autoencoder"), kind="vq")
    assert ae.scale == pytest.approx(vq.config.scaling_factor) and ae.latent_shape((1, 32, 32)) == (3, 8, 8)
    info = json.loads((run / "run.json").read_text())
    assert info["latent_shape"] == [3, 8, 8] and info["kind"] == "vq"
    assert [r["step"] for r in read_metrics(run)] == [5]
    assert (run / "samples" / "step_00000005.png").is_file()

    out = tmp_path / "eval"
    assert main(["autoencoder", "eval", str(run), "--source", "fashion-mnist", "--split", "test",
                 "--max-samples", "200", "--crop", "28", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "PSNR" in printed and "codes used" in printed
    m = json.loads((out / "metrics.json").read_text())
    assert m["num_images"] == 200 and m["kind"] == "vq" and m["image_shape"] == [1, 32, 32]
    assert math.isfinite(m["psnr"]) and 0 < m["ssim"] <= 1 and math.isfinite(m["psnr_crop28"])
    assert m["rfid"]["fmnist-classifier"] > 0
    assert sum(m["code_counts"]) == 200 * 64 and 0 < m["code_usage"] <= 1
    assert (out / "code_usage.png").is_file() and (out / "reconstructions.png").is_file()
    assert main(["autoencoder", "eval", str(run), "--kind", "kl", "--out", str(out)]) == 2
    assert "holds a VQModel" in capsys.readouterr().err


def test_presets_validate():
    from condnoise.training.autoencoder_config import (
        list_autoencoder_presets,
        load_autoencoder_config,
    )

    names = list_autoencoder_presets()
    assert {"fmnist-vq-f4", "scenes-vq-f4", "scenes-kl-f8", "in1k-vq-f4"} <= set(names)
    for name in names:
        if name == "in1k-vq-f4":  # its LPIPS file is the user's: a clear error without it
            with pytest.raises(UserError, match="lpips_path"):
                load_autoencoder_config(name)
            cfg = load_autoencoder_config(name, ["loss.perceptual=classifier"])
            assert cfg.model.codebook_size == 8192 and cfg.data.image_size == 256
            continue
        cfg = load_autoencoder_config(name)
        assert cfg.loss.disc_start < cfg.train.steps
    kl = load_autoencoder_config("scenes-kl-f8")
    assert kl.model.kind == "kl" and kl.model.downsample == 8 and kl.loss.kl_weight == 1e-6


def _png(array: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def test_any_source_imagefolder_and_streamed_captions(tmp_path, one_thread):
    """Conditions are ignored: a class folder and caption WebDataset shards (streamed in
    shard order, resumed by skipping) train alike."""
    import io
    import tarfile

    from sklearn.datasets import load_digits

    from condnoise.training.autoencoder import train_autoencoder
    from condnoise.training.autoencoder_config import load_autoencoder_config

    digits = (load_digits().images[:40] * 15).astype(np.uint8)
    for i, img in enumerate(digits[:20]):
        (tmp_path / "folder" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        (tmp_path / "folder" / f"c{i % 2}" / f"{i:03d}.png").write_bytes(_png(img))
    (tmp_path / "wds").mkdir()
    for s in range(2):
        with tarfile.open(tmp_path / "wds" / f"shard-{s}.tar", "w") as tar:
            for i in range(s * 20, s * 20 + 20):
                for suffix, data in (("png", _png(digits[i])), ("txt", f"digit {i}".encode())):
                    info = tarfile.TarInfo(f"sample{i:05d}.{suffix}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    cfg_path = _yaml(tmp_path, _with(TINY, "train", steps=6, ckpt_every=2, sample_every=0))
    folder = ["data.source=imagefolder:" + str(tmp_path / "folder")]
    r = train_autoencoder(load_autoencoder_config(str(cfg_path), folder), run_dir=tmp_path / "f",
                          max_steps=2)
    assert r.step == 2 and (tmp_path / "f" / "autoencoder" / "config.json").is_file()
    wds = ["data.source=wds:" + str(tmp_path / "wds" / "shard-{0..1}.tar")]
    train_autoencoder(load_autoencoder_config(str(cfg_path), wds), run_dir=tmp_path / "a")
    train_autoencoder(load_autoencoder_config(str(cfg_path), wds), run_dir=tmp_path / "b", max_steps=3)
    train_autoencoder(load_autoencoder_config(str(cfg_path), wds), run_dir=tmp_path / "b", resume=True)
    _same_run(tmp_path / "a", tmp_path / "b", 6)  # 6 x 16 images: the stream wraps around


@pytest.mark.parametrize("command", [("autoencoder", "train"), ("autoencoder", "eval"),
                                     ("latents", "extract")])
def test_help_documents_every_option_with_its_default_once(command):
    """Each option has help; a real default shows once as "(default: X)"; a None default
    says what None means ("None: ..."); flags and required options show none."""
    import argparse

    from condnoise.app.cli import build_parser

    def sub(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
        acts = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        return acts[0].choices[name]

    parser = sub(sub(build_parser(), command[0]), command[1])
    formatter = parser._get_formatter()
    options = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert len(options) >= 8
    for a in options:
        entry = formatter._expand_help(a)
        assert a.help and entry.lower().count("default") <= 1, a.dest
        flag = isinstance(a, argparse._StoreTrueAction)
        if a.default is None and not a.required:
            assert "None:" in entry or "None =" in entry, (a.dest, entry)
        elif not flag and not a.required:
            assert f"(default: {a.default})" in entry, (a.dest, entry)
    assert "--no-progress" in parser.format_help()
