"""Sample entropy over a VQ codebook and code usage (paper Sec. 5, issue 15 item 4)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import yaml

from condnoise.errors import UserError
from condnoise.evaluation.entropy import (
    code_usage,
    latent_vectors,
    sample_entropy,
    vq_entropy_metrics,
)


def _h(d2: list[float], tau: float = 1.0) -> float:
    """Entropy of softmax(-d2 / tau), by hand."""
    w = np.exp(-np.asarray(d2) / tau)
    p = w / w.sum()
    return float(-(p * np.log(p)).sum())


def test_hand_computation_on_a_fixed_codebook():
    book = np.array([[0.0, 0.0], [1.0, 0.0]])
    # latents [N=2, D=2, h=1, w=2]: vectors (0, 0), (0.4, 0) | (1, 0), (0.5, 0)
    lat = np.array([[[[0.0, 0.4]], [[0.0, 0.0]]], [[[1.0, 0.5]], [[0.0, 0.0]]]])
    assert latent_vectors(lat, 2).tolist() == [[0, 0], [0.4, 0], [1, 0], [0.5, 0]]
    expected = np.mean([_h([0, 1]), _h([0.16, 0.36]), _h([1, 0]), math.log(2)])
    m = vq_entropy_metrics(lat, book, tau=1.0, pool=3)
    assert m["entropy"] == pytest.approx(expected, rel=1e-12)
    # nearest codes of the first 3 vectors (the pool): 0, 0, 1 -> histogram (2/3, 1/3)
    assert m["code_entropy"] == pytest.approx(-(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3)))
    assert m["code_usage"] == 1.0 and m["pool"] == 3
    assert m["code_perplexity"] == pytest.approx(math.exp(m["code_entropy"]))
    # tau: sharper assignments with a smaller temperature
    sharp = vq_entropy_metrics(lat, book, tau=0.1, pool=3)["entropy"]
    assert sharp == pytest.approx(np.mean([_h([0, 1], 0.1), _h([0.16, 0.36], 0.1),
                                           _h([1, 0], 0.1), math.log(2)]))
    assert sharp < m["entropy"]


def test_uniform_latents_have_more_entropy_than_latents_at_the_codes():
    # an 8 x 8 grid codebook (spacing 1); tau 0.25: at a code the 4 neighbours weigh e^-4 each
    g = np.arange(8.0)
    book = np.stack(np.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
    rng = np.random.default_rng(0)
    at_codes = book[rng.integers(0, 64, size=4000)]
    uniform = rng.uniform(0.0, 7.0, size=(4000, 2))  # spread over the codebook's square
    h_codes, h_uniform = sample_entropy(at_codes, book, 0.25), sample_entropy(uniform, book, 0.25)
    inner = _h([0, 1, 1, 1, 1, 2, 2, 2, 2], 0.25)  # an interior code with its 8 nearest codes
    assert h_codes < inner + 1e-3 and h_uniform > 2 * h_codes
    centre = _h([0.5] * 4 + [2.5] * 8, 0.25)  # a cell centre: 4 codes at d^2 0.5, 8 at 2.5
    assert sample_entropy(np.array([[3.5, 3.5]]), book, 0.25) == pytest.approx(centre, abs=1e-5)
    assert centre > math.log(4)
    assert 0 <= h_codes < h_uniform <= math.log(64)


def test_code_usage_is_fixed_pool_and_batch_independent():
    rng = np.random.default_rng(1)
    codes = rng.integers(0, 50, size=10_000)
    whole = code_usage(codes, 50, pool=4096)
    batched = code_usage(np.concatenate([codes[:1000], codes[1000:]]), 50, pool=4096)
    assert whole == batched and whole["pool"] == 4096
    assert whole == code_usage(codes[:4096], 50, pool=4096)  # more samples: the same pool
    with pytest.raises(UserError, match="pool of 4096 latent vectors but the samples hold 100"):
        code_usage(codes[:100], 50, pool=4096)
    with pytest.raises(UserError, match=r"\[0, 10\)"):
        code_usage(codes, 10, pool=None)
    with pytest.raises(UserError, match="tau must be positive"):
        sample_entropy(np.zeros((2, 3)), np.zeros((4, 3)), tau=0.0)


def _vq_run(tmp_path, kind: str = "vq"):
    """A diffusion run directory whose config names a real (tiny) autoencoder folder."""
    from condnoise.models.first_stage import build_first_stage
    from condnoise.training.config import Config

    torch.manual_seed(0)
    folder = tmp_path / f"ae-{kind}"
    ae = build_first_stage(kind, in_channels=1, image_size=32, width=8, channel_mult=[1, 1, 2],
                           codebook_size=32, norm_groups=4, mid_attention=False)
    ae.register_to_config(scaling_factor=2.0)
    ae.save_pretrained(str(folder))
    cfg = Config.from_dict({"model": {"family": "dit", "size": "T/2",
                                      "autoencoder": {"kind": kind, "path": str(folder)},
                                      "latent_shape": [3, 8, 8]}})
    run = tmp_path / f"run-{kind}"
    run.mkdir()
    (run / "config.yaml").write_text(cfg.to_yaml())
    return run, ae


def _samples(tmp_path, run, latents=None):
    folder = tmp_path / "samples" / "s2"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(8, 32, 32, 1), dtype=np.uint8)
    extra = {} if latents is None else {"latents": latents}
    np.savez(folder / "samples.npz", images=images, labels=np.arange(8) % 10, **extra)
    (folder / "meta.json").write_text(json.dumps({"run_dir": str(run)}))
    return folder, images


def test_evaluate_entropy_of_a_vq_run(tmp_path, one_thread):
    from condnoise.evaluation.evaluate import EvalConfig, evaluate_samples, load_samples
    from condnoise.training.runtime import load_vq_autoencoder

    run, ae = _vq_run(tmp_path)
    latents = np.random.default_rng(2).normal(size=(8, 3, 8, 8)).astype(np.float32)
    folder, images = _samples(tmp_path, run, latents)
    cfg = EvalConfig(extractors=(), metrics=("entropy",), entropy_tau=0.5, entropy_pool=512)
    out = evaluate_samples(load_samples(folder), cfg, autoencoder=load_vq_autoencoder(run)).record
    book = ae.quantize.embedding.weight.detach().numpy()
    expected = vq_entropy_metrics(latents / 2.0, book, tau=0.5, pool=512)  # unscaled latents
    for key in ("entropy", "code_entropy", "code_usage", "code_perplexity"):
        assert out["metrics"][key]["vq-codebook"] == pytest.approx(expected[key], rel=1e-9)
    assert out["details"]["entropy"]["vq-codebook"]["latents"] == "sampled latents"
    assert out["settings"]["entropy_tau"] == 0.5

    # without saved latents the decoded images are encoded again (and said so)
    (folder / "samples.npz").unlink()
    np.savez(folder / "samples.npz", images=images, labels=np.arange(8) % 10)
    again = evaluate_samples(load_samples(folder), cfg, autoencoder=load_vq_autoencoder(run)).record
    with pytest.raises(UserError, match="needs the samples' VQ autoencoder"):
        evaluate_samples(load_samples(folder), cfg)
    assert again["details"]["entropy"]["vq-codebook"]["latents"] == "re-encoded images"
    assert 0 < again["metrics"]["entropy"]["vq-codebook"] <= math.log(32)


def test_entropy_on_a_kl_or_pixel_run_is_a_user_error(tmp_path, capsys, eval_env):
    from condnoise.app.cli import main

    run, _ = _vq_run(tmp_path, "kl")
    folder, _ = _samples(tmp_path, run)
    assert main(["evaluate", str(folder), "--metrics", "entropy", "--entropy-pool", "64"]) == 2
    err = capsys.readouterr().err.strip()
    assert "needs a VQ autoencoder" in err and "'kl'" in err and len(err.splitlines()) == 1
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    del cfg["model"]["autoencoder"], cfg["model"]["latent_shape"]
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["evaluate", str(folder), "--metrics", "entropy"]) == 2
    assert "'identity'" in capsys.readouterr().err
