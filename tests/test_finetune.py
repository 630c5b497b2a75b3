"""ControlNet / T2I-Adapter fine-tuning (issue 17): controls against OpenCV and the scenes
masks, edge F1 and mask IoU against hand computations, zero-initialised adapters leaving the
base exactly unchanged, an interrupted fine-tuning run resumed bitwise (with CEP on the
condition), the DiT refusal, and the quick form train -> finetune (both adapters) -> sample
with controls -> evaluate. The base is a real tiny U-Net trained 10 steps on Fashion-MNIST."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from condnoise.app.cli import main
from condnoise.data.controls import Control, canny, images_to_uint8, silhouette
from condnoise.errors import UserError
from condnoise.evaluation.control_metrics import edge_f1, mask_iou
from condnoise.training.rundir import read_metrics

#: the quick form's base, CPU-sized for the suite: a tiny U-Net on 16x16 Fashion-MNIST
BASE = ["model.size=tiny", "data.image_size=16", "data.max_samples=256", "train.batch_size=16",
        "train.sample_every=0", "train.ckpt_every=10", "train.threads=1", "run.tensorboard=false"]  # fmt: skip
#: fine-tuning settings of the tests: small batches, one-sample grid rows, 2 sampler steps
FT = ["train.batch_size=8", "train.sample_per_class=1", "train.sample_steps=2", "train.threads=1",
      "run.tensorboard=false"]  # fmt: skip


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("ft") / "B"
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["train", "fmnist-unet-s", "--max-steps", "10", "--run-dir", str(run),
                     "--no-progress", *BASE]) == 0  # fmt: skip
    finally:
        torch.set_num_threads(n)
    return run


def _fmnist_u8(n: int = 16) -> tuple[torch.Tensor, np.ndarray]:
    from condnoise.data.sources import open_source

    x = open_source("fashion-mnist", "test", image_size=16).tensors()[0][:n]
    return x, images_to_uint8(x)[..., 0]


# --------------------------------------------------------------------------- controls


def test_canny_equals_opencv_and_masks_are_the_data_s():
    from condnoise.data.scenes import Scenes

    x, u8 = _fmnist_u8()
    for low, high in ((100, 200), (50, 120)):
        ctl = Control.for_source("canny", low=low, high=high)
        edges = ctl.native(x, np.arange(len(x)))
        assert all(np.array_equal(edges[i], cv2.Canny(u8[i], low, high)) for i in range(len(x)))
        assert edges.any() and ctl.encode(edges).shape == (len(x), 1, 16, 16)
    sil = Control.for_source("mask").native(x, np.arange(len(x)))
    border = np.concatenate([u8[:, 0], u8[:, -1], u8[:, :, 0], u8[:, :, -1]], axis=1)
    black = np.flatnonzero((border == 0).mean(axis=1) > 0.5)
    assert len(black) > len(x) // 2
    for i in black:  # a mostly black border: the silhouette is intensity > 0.1
        assert np.array_equal(sil[i], (u8[i] > 25.5).astype(np.uint8))
    scenes = Scenes("train", num_samples=24)
    mask = Control.for_source("mask", scenes)
    assert mask.exact is scenes and mask.channels == 10
    idx = np.array([3, 0, 17])
    native = mask.native(None, idx)
    assert np.array_equal(native, scenes.masks()[idx])
    one_hot = mask.encode(native)
    assert torch.equal(one_hot.sum(1) > 0, torch.from_numpy(native > 0))
    assert np.array_equal(scenes.canny(idx), canny(scenes.images_uint8()[idx]))
    # the silhouette recovers the renderer's item pixels from the image itself
    iou = mask_iou(silhouette(scenes.images_uint8()), scenes.masks())
    assert iou.mean() > 0.8, iou.mean()


def test_edge_f1_and_mask_iou_by_hand():
    target = np.zeros((1, 8, 8), np.uint8)
    target[0, 2, 1:7] = 255  # a 6-pixel horizontal edge
    pred = np.zeros_like(target)
    pred[0, 3, 1:5] = 255  # 4 pixels one row below: all within 1 px of the target
    pred[0, 6, 6] = 255  # 1 stray pixel, 4 rows away
    # tolerance 1: precision 4/5; target pixels within 1 px of a prediction: columns 0..5 -> 5/6
    p, r = 4 / 5, 5 / 6
    assert edge_f1(pred, target, 1)[0] == pytest.approx(2 * p * r / (p + r))
    assert edge_f1(pred, target, 0)[0] == 0.0  # no pixel exactly on the edge
    assert edge_f1(np.zeros_like(target), np.zeros_like(target))[0] == 1.0
    assert edge_f1(pred, np.zeros_like(target))[0] == 0.0
    a = np.zeros((2, 4, 4), np.uint8)
    b = np.zeros((2, 4, 4), np.uint8)
    a[0, :2, :2] = 1  # 4 pixels
    b[0, 1:3, 1:3] = 3  # 4 pixels, overlap 1 -> IoU 1 / 7; image 1: both empty -> 1
    assert mask_iou(a, b).tolist() == pytest.approx([1 / 7, 1.0])
    with pytest.raises(UserError, match="edge F1"):
        edge_f1(pred, target[:, :4])


# --------------------------------------------------------------------------- models


@pytest.mark.parametrize("kind", ["controlnet", "t2i-adapter"])
def test_zero_initialised_adapters_leave_the_base_exactly_unchanged(base, kind, one_thread):
    from condnoise.training.builders import build_model
    from condnoise.training.finetune import copy_base_weights, finetune_config
    from condnoise.training.runtime import load_run

    run = load_run(base)
    cfg = finetune_config(base, adapter={"kind": kind}, control="canny", overrides=FT)
    model = build_model(cfg, run.latent_shape, len(run.class_names))
    copy_base_weights(model, run.model)
    model.adapter.copy_base(model.denoiser)
    model.eval()
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn((4, 1, 16, 16), generator=g), torch.tensor([0, 10, 500, 999])
    cond = torch.tensor([0, 3, 7, 10])  # 10: the null class
    control = (torch.rand((4, 1, 16, 16), generator=g) > 0.7).float()
    with torch.no_grad():
        assert torch.equal(model(x, t, cond, control=control), run.model(x, t, cond))
        for p in model.adapter.parameters():  # the control path is wired: a trained adapter acts
            p.add_(0.01)
        assert not torch.equal(model(x, t, cond, control=control), run.model(x, t, cond))
        assert torch.equal(model(x, t, cond), run.model(x, t, cond))  # no control: the base


@pytest.mark.parametrize("kind", ["controlnet", "t2i-adapter"])
@pytest.mark.parametrize("family", ["conv-unet", "text-unet"])
def test_both_u_net_families_and_text_bases_take_the_adapters(family, kind, one_thread):
    from condnoise.models import build_model
    from condnoise.training.finetune import copy_base_weights

    cfg = {"family": "conv-unet", "size": "tiny"} if family == "conv-unet" else \
        {"family": "unet", "size": "tiny", "encoder": {"name": "bert-embed", "max_length": 8}}  # fmt: skip
    torch.manual_seed(0)
    base = build_model(cfg, in_channels=1, image_size=16, num_classes=10).eval()
    model = build_model({**cfg, "adapter": {"kind": kind}}, in_channels=1, image_size=16,
                        num_classes=10).eval()  # fmt: skip
    copy_base_weights(model, base)
    model.adapter.copy_base(model.denoiser)
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn((2, 1, 16, 16), generator=g), torch.tensor([3, 700])
    cond = base.encoder.tokenize(["a red bag", "two shirts"]) if family == "text-unet" else torch.tensor([1, 2])
    control = (torch.rand((2, 1, 16, 16), generator=g) > 0.7).float()
    with torch.no_grad():
        assert torch.equal(model(x, t, cond, control=control), base(x, t, cond))


def test_a_dit_base_is_refused_in_one_line(tmp_path, capsys):
    from condnoise.training import load_config
    from condnoise.training.finetune import finetune_config

    dit = tmp_path / "dit"
    dit.mkdir()
    (dit / "config.yaml").write_text(load_config("fmnist-dit-s").to_yaml())
    with pytest.raises(UserError, match="dit model: ControlNet and T2I-Adapter"):
        finetune_config(dit, adapter={"kind": "controlnet"})
    assert main(["finetune", "t2i-adapter", str(dit), "--run-dir", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "U-Net base" in err[0]


# --------------------------------------------------------------------------- runs


class _Interrupt(Exception):
    pass


def test_an_interrupted_run_resumes_bitwise_with_cep(base, tmp_path, one_thread):
    from condnoise.training.finetune import finetune, finetune_config

    def cfg(run):
        return finetune_config(base, adapter={"kind": "controlnet"}, perturbation={"name": "cep-u"},
                               overrides=[*FT, "train.steps=4", "train.ckpt_every=2", "train.sample_every=1",
                                          "run.progress=false"], run_dir=run)  # fmt: skip

    def stop_at_3(trainer, step):
        if step == 3:
            raise _Interrupt

    finetune(cfg(tmp_path / "ref"), sample_hook=None)
    with pytest.raises(_Interrupt):
        finetune(cfg(tmp_path / "cut"), sample_hook=stop_at_3)
    finetune(cfg(tmp_path / "cut"), resume=True, sample_hook=None)
    a, b = read_metrics(tmp_path / "ref"), read_metrics(tmp_path / "cut")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert [r["loss"] for r in b] == [r["loss"] for r in a]
    assert all(r["perturbed_fraction"] > 0 for r in b)  # CEP-U on the condition embedding
    for name in ("model.safetensors", "ema.safetensors"):
        x = load_file(tmp_path / "ref" / "checkpoints" / "step_00000004" / name)
        y = load_file(tmp_path / "cut" / "checkpoints" / "step_00000004" / name)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name


def test_quick_form_finetune_both_adapters_then_sample_with_controls(base, tmp_path, one_thread):
    cn, t2i = tmp_path / "C", tmp_path / "T"
    assert main(["finetune", "controlnet", str(base), "--control", "canny", "--max-steps", "5",
                 "--run-dir", str(cn), "--no-progress", *FT, "train.sample_every=5"]) == 0  # fmt: skip
    assert main(["finetune", "t2i-adapter", str(base), "--control", "mask", "--max-steps", "2",
                 "--run-dir", str(t2i), "--no-progress", *FT]) == 0  # fmt: skip
    assert (cn / "samples" / "step_00000005.png").is_file()
    # the base is frozen: its weights in the adapter's checkpoint are the base's
    mine = load_file(cn / "checkpoints" / "step_00000005" / "model.safetensors")
    theirs = load_file(base / "checkpoints" / "step_00000010" / "ema.safetensors")
    assert all(torch.equal(mine[k], v) for k, v in theirs.items())
    assert any(k.startswith("adapter.") and not torch.equal(v, torch.zeros_like(v))
               for k, v in mine.items())  # fmt: skip
    gen = cn / "gen"
    assert main(["sample", str(cn), "--controls-from", "test", "--num", "8", "--out", str(gen),
                 "--steps", "2", "--guidance", "2", "--no-progress"]) == 0  # fmt: skip
    z = np.load(gen / "s2" / "samples.npz")
    assert z["images"].shape == (8, 16, 16, 1) and z["controls"].shape == (8, 16, 16)
    _, u8 = _fmnist_u8(8)
    assert all(np.array_equal(z["controls"][i], cv2.Canny(u8[i], 100, 200)) for i in range(8))
    from condnoise.data.fashion_mnist import load_fashion_mnist

    assert z["labels"].tolist() == load_fashion_mnist("test")[1][:8].tolist()  # paired conditions
    assert (gen / "s2" / "controls.png").is_file()
    assert main(["evaluate", str(gen), "--metrics", "edge-f1", "--no-progress"]) == 0
    import json

    rec = json.loads((gen / "s2" / "metrics.json").read_text())
    assert 0.0 <= rec["metrics"]["edge_f1"]["controls"] <= 1.0
    assert main(["evaluate", str(gen), "--metrics", "mask-iou", "--no-progress"]) == 2  # canny folder
