"""Latent cache (issue 15, item 3 library part): shards equal direct encoding, resume,
rank split, fingerprint and image-size checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from condnoise.errors import UserError


@pytest.fixture
def vq_autoencoder(tmp_path):
    from condnoise.models.autoencoder import DiffusersAutoencoder
    from condnoise.models.first_stage import build_first_stage

    torch.manual_seed(0)
    folder = tmp_path / "vq"
    model = build_first_stage("vq", in_channels=1, image_size=8, width=8, channel_mult=[1, 1, 2],
                              codebook_size=16, norm_groups=4, mid_attention=False)
    model.register_to_config(scaling_factor=0.7)
    model.save_pretrained(str(folder))
    return DiffusersAutoencoder(str(folder), kind="vq")


def test_extract_resume_split_and_checks(tmp_path, vq_autoencoder, one_thread):
    from condnoise.data.sources import open_source
    from condnoise.training.latent_cache import (
        LatentCache,
        autoencoder_fingerprint,
        extract_latents,
        shard_path,
    )

    src = open_source("digits", "test", image_size=8)  # 359 images
    out = tmp_path / "cache"
    assert extract_latents(src, vq_autoencoder, out, flips=True, shard_size=100, rank=0,
                           world_size=2) is None  # shards 0 and 2 only: rank 1 pending
    assert shard_path(out, 0).is_file() and not shard_path(out, 1).is_file()
    index = extract_latents(src, vq_autoencoder, out, flips=True, shard_size=100, rank=1, world_size=2)
    assert index is not None
    cache = LatentCache(out)
    images, labels = src.tensors()
    z = cache.latents()
    assert z.shape == (359, 3, 2, 2) and cache.index["num_shards"] == 4
    np.testing.assert_array_equal(z, vq_autoencoder.encode(images).numpy())
    np.testing.assert_array_equal(cache.latents(flipped=True),
                                  vq_autoencoder.encode(images.flip(-1)).numpy())
    np.testing.assert_array_equal(cache.conditions(), labels.numpy())
    assert isinstance(cache.shard(0), np.memmap)

    # resume: a lost shard is made again, the others are kept
    shard_path(out, 1).unlink()
    kept = shard_path(out, 2).stat().st_mtime_ns
    extract_latents(src, vq_autoencoder, out, flips=True, shard_size=100)
    assert shard_path(out, 2).stat().st_mtime_ns == kept
    np.testing.assert_array_equal(LatentCache(out).latents(), z)

    fp = autoencoder_fingerprint(vq_autoencoder)
    cache.check(fingerprint=fp, image_size=8, source="digits")
    with pytest.raises(UserError, match="another autoencoder"):
        cache.check(fingerprint="0" * 16)
    with pytest.raises(UserError, match="data.image_size=16"):
        cache.check(image_size=16)
    with pytest.raises(UserError, match="other settings .*shard_size"):
        extract_latents(src, vq_autoencoder, out, flips=True, shard_size=50)
    with torch.no_grad():
        vq_autoencoder.model.quantize.embedding.weight.add_(1.0)
    assert autoencoder_fingerprint(vq_autoencoder) != fp
    with pytest.raises(UserError, match="autoencoder"):
        extract_latents(src, vq_autoencoder, out, flips=True, shard_size=100)
    with pytest.raises(UserError, match="no index.json"):
        LatentCache(tmp_path / "nothing")


def _vq_folder(tmp_path, size: int = 16):
    from condnoise.models.first_stage import build_first_stage

    torch.manual_seed(1)
    folder = tmp_path / "vq16"
    model = build_first_stage("vq", in_channels=1, image_size=size, width=8, channel_mult=[1, 1, 2],
                              codebook_size=16, norm_groups=4, mid_attention=False)
    model.register_to_config(scaling_factor=0.7)
    model.save_pretrained(str(folder))
    return folder


def _latent_run(tmp_path, name: str, folder, **data):
    from condnoise.training.config import Config

    raw = {
        "data": {"source": "digits", "image_size": 16, **data},
        "model": {"family": "dit", "size": "T/2", "hidden": 32, "depth": 2, "heads": 2,
                  "cfg_dropout": 0.1, "perturbation": {"name": "cep-u", "gamma": 1.0},
                  "autoencoder": {"kind": "vq", "path": str(folder), "quantize": True}},
        "train": {"steps": 8, "batch_size": 32, "lr": 2e-3, "ckpt_every": 8, "sample_every": 0,
                  "log_every": 1, "threads": 1},
        "run": {"name": name, "dir": str(tmp_path / name), "progress": False, "tensorboard": False},
    }
    return Config.from_dict(raw, origin="test").validate("test")


def test_training_on_the_cache_is_bitwise_the_run_that_encodes(tmp_path, one_thread, capsys):
    """data.latents=DIR (made by `condnoise latents extract --quantize`) trains exactly the
    model that encoding every batch with the quantised VQ encoder trains."""
    from safetensors.torch import load_file

    from condnoise.app.cli import main
    from condnoise.training.rundir import read_metrics
    from condnoise.training.trainer import train

    folder = _vq_folder(tmp_path)
    cache = tmp_path / "cache"
    args = ["latents", "extract", "digits", "--autoencoder", str(folder), "--out", str(cache),
            "--image-size", "16", "--shard-size", "500", "--no-progress"]
    assert main([*args, "--quantize"]) == 0
    assert "latent cache complete" in capsys.readouterr().out
    fly = train(_latent_run(tmp_path, "fly", folder))
    cached = train(_latent_run(tmp_path, "cached", folder, latents=str(cache)))
    assert fly.step == cached.step == 8
    assert [r["loss"] for r in read_metrics(fly.run_dir)] == \
        [r["loss"] for r in read_metrics(cached.run_dir)]
    for name in ("model.safetensors", "ema.safetensors"):
        a = load_file(fly.run_dir / "checkpoints" / "step_00000008" / name)
        b = load_file(cached.run_dir / "checkpoints" / "step_00000008" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name

    # bad input: another autoencoder's latents (pre-quantisation), another image size
    other = tmp_path / "prequant"
    assert main([*args[:6], str(other), *args[7:]]) == 0
    with pytest.raises(UserError, match="another autoencoder"):
        train(_latent_run(tmp_path, "bad1", folder, latents=str(other)))
    with pytest.raises(UserError, match="data.image_size=8"):
        train(_latent_run(tmp_path, "bad2", folder, latents=str(cache), image_size=8))
    with pytest.raises(UserError, match="split 'train', the run reads 'test'"):
        train(_latent_run(tmp_path, "bad3", folder, latents=str(cache), split="test"))
    assert main([*args[:4], str(tmp_path), *args[5:]]) == 2  # not an autoencoder folder
    assert "neither a diffusers autoencoder folder" in capsys.readouterr().err
