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
