"""Config system: presets, YAML files, dotted overrides, validation errors, CLI exit codes."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from condnoise.app.cli import main
from condnoise.app.train import build_overrides
from condnoise.errors import UserError
from condnoise.training.config import Config, list_presets, load_config
from condnoise.training.data import EpochOrder, Position, rank_slices
from condnoise.training.rundir import config_differences, default_run_dir


def test_presets_ship_and_validate():
    assert list_presets() == ["fmnist-conv16", "fmnist-dit-s", "fmnist-unet-s", "in1k-dit-xl2", "in1k-ldm4", "scenes-conv32", "scenes-dit-s",
                              "scenes-unet-s"]  # fmt: skip
    for name in list_presets():
        cfg = load_config(name)
        assert cfg.run.name == name
        assert Config.from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()  # round trip
    xl = load_config("in1k-dit-xl2")
    assert xl.model.size == "XL/2" and xl.train.batch_size == 256 and xl.train.lr == 1e-4
    assert xl.model.latent_shape == [4, 32, 32] and xl.train.precision == "bf16"
    fm = load_config("fmnist-dit-s")
    assert fm.data.source == "fashion-mnist" and fm.data.image_size == 32
    sc = load_config("scenes-unet-s")
    assert sc.data.source == "scenes" and sc.model.is_text and sc.model.encoder.name == "bert-embed"
    assert sc.model.encoder.max_length == 48 and sc.model.cfg_dropout == 0.1


def test_overrides_are_typed_and_dotted():
    cfg = load_config("fmnist-dit-s", ["train.lr=2e-4", "train.steps=10", "train.grad_clip=null",
                                       "model.perturbation={name: cep-u, gamma: 0.5}",
                                       "model.perturbation.gamma=0.25", "data.max_samples=100"])
    assert cfg.train.lr == 2e-4 and isinstance(cfg.train.lr, float)  # YAML reads 2e-4 as str
    assert cfg.train.steps == 10 and cfg.train.grad_clip is None
    assert cfg.model.perturbation == {"name": "cep-u", "gamma": 0.25}
    assert cfg.perturbation_name == "cep-u" and cfg.data.max_samples == 100
    assert str(default_run_dir(cfg)) == "runs/fmnist-dit-s-cep-u-s0"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.lrr=1", "unknown key 'train.lrr'; valid keys in train: steps, batch_size, lr"),
        ("trian.lr=1", "unknown key 'trian'; valid keys in top level: data, model"),
        ("train.steps=ten", "train.steps: expected an integer, got 'ten'"),
        ("train.compile=maybe", "train.compile: expected true or false"),
        ("train.precision=fp16", "invalid value 'fp16'; valid options: auto, fp32, bf16"),
        ("train.lr_schedule=step", "valid options: constant, cosine"),
        ("diffusion.schedule=quadratic", "valid options: linear, scaled-linear, cosine"),
        ("train.sample_sampler=euler", "valid options: ddpm, ddim, dpm++"),
        ("train.batch_size=0", "train.batch_size must be >= 1"),
        ("train.ema_decay=1.5", "train.ema_decay must be in [0, 1)"),
        ("train.grad_accum=3", "batch_size=128 is not divisible by train.grad_accum=3"),
        ("model.family=gan", "'family': 'gan' unknown; choose one of dit, unet"),
        ("model.depthh=3", "unknown key 'model.depthh'; valid keys in model (family dit): family"),
        ("model.perturbation.name=cep-x", "unknown perturbation 'cep-x'"),
        ("model.perturbation.gamma=-1", "gamma"),
        ("model.autoencoder={kind: gan}", "model.autoencoder.kind: invalid value 'gan'; valid options: identity, kl, vq"),
        ("train=3", "section 'train' must be a mapping"),
        ("nonsense", "expected section.key=value"),
    ],
)
def test_config_errors_are_clear_user_errors(override, message):
    with pytest.raises(UserError) as e:
        load_config("fmnist-dit-s", [override])
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_unknown_preset_and_bad_files(tmp_path):
    with pytest.raises(UserError, match="unknown preset 'fmnist-dit-xx'.*presets: .*fmnist-dit-s"):
        load_config("fmnist-dit-xx")
    with pytest.raises(UserError, match="config file not found"):
        load_config(str(tmp_path / "none.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(UserError, match="invalid YAML in .*bad.yaml"):
        load_config(str(bad))
    empty = tmp_path / "empty.yaml"
    empty.write_text(yaml.safe_dump({"data": {"source": "digits"}}))
    with pytest.raises(UserError, match="'model' section is missing"):
        load_config(str(empty))


def test_cli_flags_map_to_overrides_and_errors_exit_2(capsys):
    import argparse

    ns = argparse.Namespace(overrides=["model.perturbation.gamma=0.5"], perturb="cep-g",
                            gamma=None, max_steps=7, ckpt_every=None, seed=3)
    cfg = load_config("fmnist-dit-s", build_overrides(ns))
    assert cfg.model.perturbation == {"name": "cep-g", "gamma": 0.5}
    assert cfg.train.steps == 7 and cfg.train.seed == 3
    assert main(["train", "fmnist-dit-s", "--perturb", "cep-q"]) == 2
    assert "unknown perturbation 'cep-q'" in capsys.readouterr().err
    assert main(["train", "no-such-preset", "train.lr=1"]) == 2
    assert main(["train", "--list-presets"]) == 0
    assert "in1k-ldm4" in capsys.readouterr().out


def test_resume_may_only_change_cadence():
    a = load_config("fmnist-dit-s").to_dict()
    b = load_config("fmnist-dit-s", ["train.steps=9", "train.ckpt_every=3", "train.lr=1"]).to_dict()
    assert config_differences(a, b) == ["train.lr"]


def test_batch_order_is_a_partition_over_ranks_and_micro_steps():
    order = EpochOrder(100, seed=1)
    idx, pos = order.take(Position(0, 90), 32)  # spans the epoch boundary
    assert pos == Position(1, 22) and len(set(idx[:10])) == 10
    assert set(idx[:10]) == set(order.permutation(0)[90:].tolist())
    parts = [p for r in range(2) for p in rank_slices(idx, 4, 2, r)]
    assert all(len(p) == 4 for p in parts)
    assert sorted(np.concatenate(parts).tolist()) == sorted(idx.tolist())
    again, _ = EpochOrder(100, seed=1).take(Position(0, 90), 32)
    assert np.array_equal(idx, again)
