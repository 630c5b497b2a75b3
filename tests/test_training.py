"""Trainer on real data (scikit-learn digits, Fashion-MNIST config): logs, checkpoints,
keep-last-k, sample grids, EMA, CFG null class, load_run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from condnoise import rng
from condnoise.errors import UserError
from condnoise.training.checkpoint import list_checkpoints
from condnoise.training.config import Config
from condnoise.training.rundir import read_metrics
from condnoise.training.runtime import load_run
from condnoise.training.trainer import Trainer, train, write_sample_grid


def tiny_config(run_dir, **train_overrides) -> Config:
    """DiT with hidden 32, depth 2 on 8x8 digits: a few ms per step on one thread."""
    raw = {
        "data": {"source": "digits", "image_size": 8},
        "model": {"family": "dit", "size": "T/2", "hidden": 32, "depth": 2, "heads": 2,
                  "cfg_dropout": 0.1, "perturbation": {"name": "cep-u", "gamma": 1.0}},
        "train": {"steps": 40, "batch_size": 32, "lr": 2e-3, "warmup": 5, "ema_decay": 0.99,
                  "ckpt_every": 10, "keep_last": 2, "sample_every": 0, "threads": 1,
                  "sample_steps": 5, "sample_per_class": 2, **train_overrides},
        "run": {"name": "tiny", "dir": str(run_dir), "progress": False, "tensorboard": False},
    }
    return Config.from_dict(raw, origin="test").validate("test")


def test_training_run_writes_everything_and_learns(tmp_path):
    run = tmp_path / "run"
    cfg = tiny_config(run, steps=60, sample_every=60)
    result = train(cfg)
    assert result.step == 60
    # metrics.jsonl: one record per step with step and loss, and the loss goes down
    records = read_metrics(run)
    assert [r["step"] for r in records] == list(range(1, 61))
    losses = np.array([r["loss"] for r in records])
    assert np.isfinite(losses).all()
    assert losses[-15:].mean() < 0.8 * losses[:5].mean(), losses
    assert all(r["perturbed_fraction"] > 0.5 and r["mean_l2_shift"] > 0 for r in records)
    # keep-last-k checkpoints, complete, no temporary folders left
    assert list_checkpoints(run) == [50, 60]
    assert not list((run / "checkpoints").glob(".tmp-*"))
    # resolved config, provenance, run info
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved == cfg.to_dict()
    prov = json.loads((run / "provenance.json").read_text())
    assert prov["seed"] == 0 and "torch" in prov["versions"]
    info = json.loads((run / "run.json").read_text())
    assert info["class_names"] == [str(i) for i in range(10)] and info["image_shape"] == [1, 8, 8]
    # the sample grid: 10 labelled rows x 2 samples of 8x8 shown 3x (24 px) with 2px padding
    grid = np.asarray(Image.open(run / "samples" / "step_00000060.png"))
    assert grid.shape[0] == 10 * 26 + 2 and grid.shape[1] > 2 * 26 + 2
    label_column = grid[:, : grid.shape[1] - (2 * 26 + 2)]
    assert (label_column < 128).any(axis=1).sum() > 10 * 5  # dark text in every row band


def test_load_run_gives_ema_model_in_eval_mode(tmp_path):
    run = tmp_path / "run"
    train(tiny_config(run, steps=20), sample_hook=None)
    loaded = load_run(run)
    assert loaded.step == 20 and not loaded.model.training
    assert loaded.class_names == tuple(str(i) for i in range(10))
    assert loaded.image_shape == (1, 8, 8) and loaded.latent_shape == (1, 8, 8)
    ema = load_file(run / "checkpoints" / "step_00000020" / "ema.safetensors")
    raw = load_file(run / "checkpoints" / "step_00000020" / "model.safetensors")
    state = loaded.model.state_dict()
    for k, v in ema.items():
        assert torch.equal(state[k], v)
    assert any(not torch.equal(ema[k], raw[k]) for k in ema)  # EMA differs from raw weights
    online = load_run(run, ema=False, step=10)
    assert online.step == 10
    # a guided sample runs through the loaded model (null class used by CFG)
    from condnoise.diffusion.samplers import sample

    x = sample(loaded.model, loaded.schedule, torch.arange(4), torch.randn(4, 1, 8, 8),
               guidance=2.0, sampler="ddim", steps=4)
    assert x.shape == (4, 1, 8, 8) and torch.isfinite(x).all()
    with pytest.raises(UserError, match="no checkpoint for step 7"):
        load_run(run, step=7)


def test_load_run_without_checkpoint_is_a_user_error(tmp_path):
    run = tmp_path / "run"
    train(tiny_config(run, steps=5, ckpt_every=100), sample_hook=None)  # final step saves
    for p in (run / "checkpoints").iterdir():
        import shutil

        shutil.rmtree(p)
    with pytest.raises(UserError, match="no checkpoint"):
        load_run(run)
    with pytest.raises(UserError, match="not found"):
        load_run(tmp_path / "missing")


def test_resume_refuses_a_checkpoint_of_another_random_scheme(tmp_path):
    run = tmp_path / "run"
    train(tiny_config(run, steps=5, ckpt_every=5), sample_hook=None)
    assert json.loads((run / "run.json").read_text())["rng_version"] == rng.VERSION
    state_path = run / "checkpoints" / "step_00000005" / "state.pt"
    state = torch.load(state_path, weights_only=False)
    assert state["rng_version"] == rng.VERSION
    del state["rng_version"]  # as written before condnoise.rng
    torch.save(state, state_path)
    with pytest.raises(UserError, match="random scheme 1"):
        train(tiny_config(run, steps=8, ckpt_every=5), resume=True, sample_hook=None)


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_cfg_null_class_is_trained_only_with_dropout(tmp_path, dropout):
    cfg = tiny_config(tmp_path / f"run{dropout}", steps=8)
    cfg.model.cfg_dropout = dropout
    trainer = Trainer(cfg)
    null = trainer.model.encoder.null_index
    before = trainer.model.encoder.embedding.weight[null].detach().clone()
    trainer.run()
    after = trainer.model.encoder.embedding.weight[null].detach()
    assert null == 10
    assert torch.equal(before, after) == (dropout == 0.0)


def test_sample_grid_from_ema_model(tmp_path):
    trainer = Trainer(tiny_config(tmp_path / "run", steps=3, sample_per_class=3))
    trainer.run()
    path = write_sample_grid(trainer, 3)
    img = np.asarray(Image.open(path))
    width = 3 * 26 + 2  # 3 samples of 8x8 shown 3x, 2px padding; the labels on their left
    assert img.shape[0] == 10 * 26 + 2 and img.shape[1] > width
    left = img.shape[1] - width
    assert img[2:26, left + 2:left + 26].std() > 0  # not a blank tile


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    a = Trainer(tiny_config(tmp_path / "a", steps=3, grad_accum=1))
    b = Trainer(tiny_config(tmp_path / "b", steps=3, grad_accum=4))
    for t in (a, b):
        t.model.cfg_dropout = 0.0  # the model's own draws depend on the micro-batch split
        t.model.perturbation = type(t.model.perturbation)(gamma=0.0)
        t.run()
    for (k, pa), pb in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        torch.testing.assert_close(pa, pb, atol=2e-6, rtol=1e-5, msg=k)


def test_bad_batch_split_and_bad_labels_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="divisible"):
        tiny_config(tmp_path / "x", batch_size=30, grad_accum=4)
    cfg = tiny_config(tmp_path / "y")
    cfg.data.max_samples = 0
    with pytest.raises(UserError, match="max_samples"):
        Trainer(cfg)
