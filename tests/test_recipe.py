"""The recipe features of issue 12: prediction targets and min-SNR weighting (C2), the
conv U-Net family, evaluation at the model's resolution with the real-data reference
accuracy, labelled sample grids (C3), the report's reference rows and the recipe benchmark's
CI form."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from condnoise.diffusion.grids import labelled_grid, save_labelled_grid
from condnoise.diffusion.loss import diffusion_loss, loss_weights
from condnoise.diffusion.samplers import sample
from condnoise.diffusion.schedule import NoiseSchedule
from condnoise.errors import UserError
from condnoise.models import build_model, resolve_model_config

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- C2: targets and weights


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_v_target_and_conversion_match_diffusers(kind):
    from diffusers import DDPMScheduler

    s = NoiseSchedule(kind, prediction="v")
    ref = DDPMScheduler(**s.diffusers_config())
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(5, 1, 4, 4, generator=g), torch.randn(5, 1, 4, 4, generator=g)
    t = torch.tensor([0, 3, 400, 800, 999])
    v = s.target(x0, noise, t)
    torch.testing.assert_close(v, ref.get_velocity(x0, noise, t).float(), atol=1e-5, rtol=1e-5)
    x_t = s.q_sample(x0, t, noise)
    for pred, out in (("v", v), ("eps", noise)):
        got_x0, got_eps = s.to_x0_eps(out, x_t, t, pred)
        torch.testing.assert_close(got_x0, x0, atol=2e-3, rtol=1e-3)
        torch.testing.assert_close(got_eps, noise, atol=2e-3, rtol=1e-3)
    assert s.config()["prediction"] == "v" and NoiseSchedule(**s.config()).prediction_type == "v_prediction"
    with pytest.raises(UserError, match="prediction target"):
        NoiseSchedule(prediction="x0")


def test_min_snr_weights_follow_hang_et_al():
    from diffusers.training_utils import compute_snr

    t = torch.tensor([0, 100, 500, 999])
    for pred in ("eps", "v"):
        s = NoiseSchedule("cosine", prediction=pred)
        from diffusers import DDPMScheduler

        snr = compute_snr(DDPMScheduler(**s.diffusers_config()), t).float()
        want = torch.clamp(snr, max=5.0) / (snr + 1 if pred == "v" else snr)
        torch.testing.assert_close(loss_weights(s, t, "min-snr", 5.0), want, rtol=1e-4, atol=1e-6)
    assert loss_weights(s, t, "none") is None
    with pytest.raises(UserError, match="loss weighting"):
        loss_weights(s, t, "edm")


class Oracle(torch.nn.Module):
    """Exact E[eps | x_t] (or E[v | x_t]) for data N(mu_y, sigma^2 I): a model with a known
    answer, so that samplers and losses can be checked without training."""

    def __init__(self, schedule: NoiseSchedule, means: torch.Tensor, sigma: float, prediction: str):
        super().__init__()
        self.schedule, self.means, self.sigma, self.prediction = schedule, means, sigma, prediction
        self.null_index, self.input_perturbation = len(means), 0.0

    def null_like(self, labels: torch.Tensor) -> torch.Tensor:
        return torch.full_like(labels, self.null_index)

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        a = self.schedule.alphas_cumprod[t].double().view(-1, 1, 1, 1)
        mu = torch.cat([self.means, self.means.mean(0, keepdim=True)])[labels].double()
        eps = (1 - a).sqrt() * (x.double() - a.sqrt() * mu) / (a * self.sigma**2 + 1 - a)
        if self.prediction == "eps":
            return eps.float()
        x0 = (x.double() - (1 - a).sqrt() * eps) / a.sqrt()
        return (a.sqrt() * eps - (1 - a).sqrt() * x0).float()


@pytest.mark.parametrize("sampler", ["ddim", "dpm++"])
def test_v_prediction_samples_the_same_ode_as_eps(sampler):
    means = torch.linspace(-0.6, 0.6, 3).view(3, 1, 1, 1).expand(3, 1, 4, 4).contiguous()
    noise = torch.randn(6, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    out = {}
    for pred in ("eps", "v"):
        s = NoiseSchedule("cosine", prediction=pred)
        out[pred] = sample(Oracle(s, means, 0.1, pred), s, labels, noise, guidance=2.0,
                           sampler=sampler, steps=20)  # fmt: skip
    torch.testing.assert_close(out["v"], out["eps"], atol=1e-3, rtol=1e-3)
    # and land near the guided mean mu_u + s (mu_c - mu_u) (the null class has mean 0 here)
    assert (out["v"].mean((1, 2, 3)) - 2.0 * means[labels].mean((1, 2, 3))).abs().max() < 0.15


def test_loss_of_the_oracle_target_is_the_irreducible_part():
    """With the exact conditional expectation the v-loss equals its closed-form variance:
    checks the target, the weighting and that labels reach the model."""
    s = NoiseSchedule("cosine", prediction="v")
    means = torch.zeros(2, 1, 8, 8)
    x0 = torch.zeros(256, 1, 8, 8)  # sigma -> 0: x0 is known, so v is predictable exactly
    oracle = Oracle(s, means, 1e-4, "v")
    t = torch.randint(0, 999, (256,), generator=torch.Generator().manual_seed(0))
    labels = torch.zeros(256, dtype=torch.long)
    out = diffusion_loss(oracle, s, x0, labels, t=t, weighting="min-snr")
    assert out.loss.item() < 1e-4 and out.per_sample.shape == (256,)
    wrong = diffusion_loss(Oracle(s, means, 1e-4, "eps"), s, x0, labels, t=t)
    assert wrong.loss.item() > 0.05  # an eps-model scored against v targets is far off


# ---------------------------------------------------------------- the conv U-Net family


def test_conv_unet_family_config_forward_and_cep():
    cfg = resolve_model_config({"family": "conv-unet", "size": "tiny",
                                "perturbation": {"name": "cep-u", "gamma": 1.0}})  # fmt: skip
    assert cfg["channels"] == [16, 32] and cfg["cond_dim"] == 64 and cfg["embed_init_std"] == 1.0
    assert cfg["class_embed"] == "projection"
    torch.manual_seed(0)
    m = build_model(cfg, in_channels=1, image_size=16, num_classes=10)
    assert m.denoiser.net.config.class_embed_type == "projection"
    assert not any("attn" in n for n, _ in m.denoiser.named_modules())  # convolutions only
    x, t, y = torch.randn(4, 1, 16, 16), torch.tensor([1, 200, 500, 999]), torch.arange(4)
    m.eval()
    with torch.no_grad():
        a, b = m(x, t, y), m(x, t, y)
        other = m(x, t, y + 4)
        m.train()
        torch.manual_seed(1)
        perturbed = m(x, t, y)
    assert a.shape == x.shape and torch.equal(a, b)
    assert (a - other).abs().max() > 1e-4  # the class vector reaches the output
    assert (a - perturbed).abs().max() > 0  # CEP on the embedding in training mode
    assert m.perturbation.stats()["mean_l2_shift"] > 0


def test_conv_unet_identity_and_bad_settings_are_one_line_errors():
    m = build_model({"family": "conv-unet", "size": "tiny", "class_embed": "identity"},
                    in_channels=1, image_size=16, num_classes=3)  # fmt: skip
    assert m.encoder.dim == 64
    bad = [({"class_embed": "identity", "cond_dim": 32}, "cond_dim must be 64"),
           ({"class_embed": "cross"}, "class_embed"), ({"channels": [16, 20]}, "divisible"),
           ({"size": "huge"}, "size")]  # fmt: skip
    for extra, msg in bad:
        with pytest.raises(UserError, match=msg):
            build_model({"family": "conv-unet", "size": "tiny", **extra}, in_channels=1,
                        image_size=16, num_classes=3)  # fmt: skip
    with pytest.raises(UserError, match="not divisible"):
        build_model({"family": "conv-unet", "size": "s"}, in_channels=1, image_size=18, num_classes=3)


def test_conv_unet_keeps_controlnet_and_lcm_doors_open():
    from diffusers import ControlNetModel, UNet2DConditionModel

    m = build_model({"family": "conv-unet", "size": "tiny"}, in_channels=1, image_size=16,
                    num_classes=10)  # fmt: skip
    unet = m.denoiser.net
    assert isinstance(unet, UNet2DConditionModel)
    cn = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16,),
                                   conditioning_channels=1)  # fmt: skip
    x, t, c = torch.randn(2, 1, 16, 16), torch.tensor([5, 500]), torch.randn(2, 64)
    with torch.no_grad():
        down, mid = cn(x, t, encoder_hidden_states=None, controlnet_cond=torch.zeros(2, 1, 16, 16),
                       class_labels=c, return_dict=False)  # fmt: skip
        out = unet(x, t, encoder_hidden_states=None, class_labels=c, down_block_additional_residuals=down,
                   mid_block_additional_residual=mid).sample  # fmt: skip
    assert out.shape == x.shape
    kwargs = {k: v for k, v in unet.config.items() if not k.startswith("_")}
    lcm = UNet2DConditionModel(**(kwargs | {"time_cond_proj_dim": 32}))  # LCM's w-embedding
    with torch.no_grad():
        assert lcm(x, t, encoder_hidden_states=None, class_labels=c,
                   timestep_cond=torch.randn(2, 32)).sample.shape == x.shape  # fmt: skip


def test_trainer_runs_v_min_snr_conv_unet_and_resumes_bitwise(tmp_path):
    from condnoise.training.config import Config
    from condnoise.training.rundir import read_metrics
    from condnoise.training.runtime import load_run
    from condnoise.training.trainer import train

    def cfg(steps):
        return Config.from_dict({
            "data": {"source": "digits", "image_size": 8},
            "model": {"family": "conv-unet", "size": "tiny", "cfg_dropout": 0.1,
                      "perturbation": {"name": "cep-u", "gamma": 1.0}},
            "diffusion": {"schedule": "cosine", "prediction": "v", "loss_weighting": "min-snr"},
            "train": {"steps": steps, "batch_size": 16, "lr": 2e-3, "ckpt_every": 4,
                      "sample_every": 0, "threads": 1, "log_every": 1},
            "run": {"name": "v", "progress": False, "tensorboard": False},
        }, origin="test")  # fmt: skip

    train(cfg(8), run_dir=tmp_path / "a")
    train(cfg(4), run_dir=tmp_path / "b")
    train(cfg(8), run_dir=tmp_path / "b", resume=True)
    la = [r["loss"] for r in read_metrics(tmp_path / "a")]
    assert la == [r["loss"] for r in read_metrics(tmp_path / "b")] and np.isfinite(la).all()
    run = load_run(tmp_path / "a")
    assert run.schedule.prediction == "v" and run.config.diffusion.loss_weighting == "min-snr"


# ---------------------------------------------------------------- evaluation at 16 px


def test_real_images_at_16px_score_like_the_real_reference(eval_env):
    """Real test images made 16 x 16 as the training data is: their condition accuracy is
    the reference's through-the-pipeline accuracy and their FID is 0."""
    from condnoise.data.transforms import resize_center_crop
    from condnoise.evaluation.evaluate import EvalConfig, Samples, evaluate_samples, load_reference
    from condnoise.evaluation.features import _resize, fit_resolution, round_trip

    images, labels = load_reference("fashion-mnist:test", 600)
    small = _resize(images, 16, resize_center_crop)
    assert fit_resolution(small, 28).shape == (600, 28, 28, 1)
    np.testing.assert_array_equal(round_trip(images, 16), fit_resolution(small, 28))
    rec = evaluate_samples(Samples(Path("s16"), small, labels),
                           EvalConfig(metrics=("fid", "condition-accuracy"), max_ref=600,
                                      shrinkage=0.01)).record  # fmt: skip
    m = {k: v["fmnist-classifier"] for k, v in rec["metrics"].items()}
    assert rec["reference"]["resolution"] == 16 and rec["evaluated_shape"] == [28, 28, 1]
    assert m["condition_accuracy"] == m["real_accuracy"] and m["fid"] == pytest.approx(0, abs=1e-6)
    assert 0.7 < m["real_accuracy"] <= m["real_accuracy_native"] + 0.02
    plain = evaluate_samples(Samples(Path("s28"), images, labels),
                             EvalConfig(metrics=("condition-accuracy",), max_ref=600)).record  # fmt: skip
    assert plain["reference"]["resolution"] is None
    acc = plain["metrics"]["condition_accuracy"]["fmnist-classifier"]
    assert acc == plain["metrics"]["real_accuracy"]["fmnist-classifier"] == m["real_accuracy_native"]


# ---------------------------------------------------------------- C3: labelled grids


def test_labelled_grid_puts_a_label_beside_each_row(tmp_path, fmnist):
    images = fmnist[0][:12, :16, :16, None]  # 16 px tiles are shown 2x
    grid = labelled_grid(images, ["T-shirt/top", "Trouser", "Bag"], 4)
    assert grid.shape[0] == 3 * 34 + 2 and grid.shape[1] > 4 * 34 + 2
    label = grid[:, : grid.shape[1] - (4 * 34 + 2), 0]
    for r in range(3):
        assert (label[2 + r * 34 : (r + 1) * 34] < 100).sum() > 10  # text in every row
    save_labelled_grid(images, ["a", "b", "c"], tmp_path / "g.png", 4)
    assert Image.open(tmp_path / "g.png").mode == "L"
    long = ["a long prompt " * 6, "short"]
    rgb = np.repeat(fmnist[0][:8, :, :, None], 3, -1)
    tall = labelled_grid(rgb, long, 4)
    assert tall.shape[1] == 4 * 30 + 2 and tall.shape[0] > 2 * 30 + 2 + 3 * 12  # wrapped above
    with pytest.raises(ValueError, match="row labels"):
        labelled_grid(images, ["a"], 4)


# ---------------------------------------------------------------- report reference rows


def test_report_prints_real_data_reference_rows(tmp_path):
    from condnoise.study.accuracy import accuracy_table, reference_labels
    from condnoise.study.blocks import Section
    from condnoise.study.report import table1
    from condnoise.study.results import StudyResults
    from condnoise.study.spec import load_study

    spec = load_study("micro", ["data.image_size=16"])
    recs = []
    for variant, acc in (("clean", 0.84), ("cep-u", 0.86)):
        for seed, jitter in enumerate((-0.01, 0.01)):
            for scale, fid in ((1.0, 20.0), (3.0, 15.0)):
                m = {"condition_accuracy/fmnist-classifier": acc + jitter - (scale == 1) * 0.1,
                     "fid/fmnist-classifier": fid + jitter, "real_accuracy/fmnist-classifier": 0.878,
                     "real_accuracy_native/fmnist-classifier": 0.906}  # fmt: skip
                recs.append({"arch": "dit", "variant": variant, "seed": seed, "scale": scale,
                             "metrics": m})  # fmt: skip
    res = StudyResults(spec, tmp_path, records=recs)
    labels = reference_labels(res, "dit")
    assert [v for _, v in labels] == [0.878, 0.906] and "16 px" in labels[0][0]
    rows = table1(res).blocks[-1].rows
    assert rows[-2][1].startswith("real data") and rows[-2][-1] == "0.878" and rows[-1][-1] == "0.906"
    sec = accuracy_table(res, Section("accuracy", "Condition accuracy"))
    text = " ".join(b.text for b in sec.blocks if hasattr(b, "text"))
    assert "best condition accuracy 0.84 ± 0.13 at s = 3" in text and "96% of real data" in text
    table = sec.blocks[-1]
    assert table.rows[0][:3] == ["dit", "clean", "3"] and table.rows[-1][3] == "0.906"


# ---------------------------------------------------------------- benchmark CI form


def test_recipe_benchmark_quick_form(tmp_path, eval_env):
    out = tmp_path / "recipe"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "recipe.py"), "--quick", "--threads", "1",
         "--out", str(out), "--json", str(tmp_path / "r.json"), "--plot", str(tmp_path / "r.png")],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "| quick-tiny-16-v |" in proc.stdout and "| dpm++-4 |" in proc.stdout
    res = json.loads((tmp_path / "r.json").read_text())["results"][0]
    pts = res["points"]
    assert [p["cpu_seconds"] >= b for p, b in zip(pts, (2, 4))] == [True, True]
    assert pts[0]["step"] < pts[1]["step"] and set(pts[-1]["eval"]) == {"1", "2"}
    e = pts[-1]["eval"]["2"]
    assert 0 <= e["accuracy"] <= 1 and e["fid"] > 0 and e["real_accuracy"] <= 1
    assert set(pts[-1]["ema"]) == {"ema0.99"} and set(pts[-1]["samplers"]) == {"ddim-4", "dpm++-4"}
    assert Image.open(tmp_path / "r.png").size[0] > 100
