"""Noise schedules (cross-checked against diffusers) and the eps-prediction loss."""

import pytest
import torch

from condnoise.diffusion.loss import bin_losses, diffusion_loss
from condnoise.diffusion.schedule import NoiseSchedule
from condnoise.errors import UserError
from condnoise.models import build_model

pytestmark = pytest.mark.usefixtures("one_thread")




@pytest.mark.parametrize("kind", ["linear", "scaled-linear", "cosine"])
def test_betas_match_diffusers(kind):
    from diffusers import DDPMScheduler

    s = NoiseSchedule(kind, 1000)
    ref = DDPMScheduler(**s.diffusers_config())
    torch.testing.assert_close(s.betas, ref.betas.float(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(s.alphas_cumprod, ref.alphas_cumprod.float(), rtol=1e-4, atol=1e-7)
    assert s.alphas_cumprod.shape == (1000,)
    assert torch.all(s.alphas_cumprod[1:] < s.alphas_cumprod[:-1])


def test_linear_endpoints_and_config_roundtrip():
    s = NoiseSchedule()
    assert s.betas[0].item() == pytest.approx(1e-4) and s.betas[-1].item() == pytest.approx(0.02)
    s2 = NoiseSchedule(**s.config())
    assert torch.equal(s.alphas_cumprod, s2.alphas_cumprod)
    # diffusers' add_noise is the same forward process
    from diffusers import DDPMScheduler

    x0, noise = torch.randn(6, 1, 8, 8), torch.randn(6, 1, 8, 8)
    t = torch.tensor([0, 10, 200, 500, 900, 999])
    ref = DDPMScheduler(**s.diffusers_config()).add_noise(x0, noise, t)
    torch.testing.assert_close(s.q_sample(x0, t, noise), ref, rtol=1e-5, atol=1e-5)


def test_q_sample_marginals():
    s = NoiseSchedule("linear", 1000)
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((20000, 1), 0.7)
    t = torch.full((20000,), 300)
    xt = s.q_sample(x0, t, torch.randn(x0.shape, generator=g))
    a = s.alphas_cumprod[300]
    assert xt.mean().item() == pytest.approx(0.7 * a.sqrt().item(), abs=0.02)
    assert xt.var().item() == pytest.approx((1 - a).item(), rel=0.05)


@pytest.mark.parametrize("bad", [{"kind": "sigmoid"}, {"num_steps": 1}, {"beta_start": 0.5, "beta_end": 0.1}])
def test_bad_schedule_raises_user_error(bad):
    with pytest.raises(UserError):
        NoiseSchedule(**bad)


def _tiny_model(**pert):
    torch.manual_seed(0)
    cfg = {"family": "dit", "size": "T/4", "depth": 1, "perturbation": pert or {"name": "none"}}
    return build_model(cfg, in_channels=1, image_size=16, num_classes=10)


class Recorder(torch.nn.Module):
    """Wraps a real model and keeps the x_t it was fed."""

    def __init__(self, model):
        super().__init__()
        self.model, self.seen = model, []

    @property
    def input_perturbation(self):
        return self.model.input_perturbation

    def forward(self, x_t, t, labels, **kw):
        self.seen.append(x_t.clone())
        return self.model(x_t, t, labels, **kw)


def test_loss_is_eps_mse_with_per_sample_values():
    model = _tiny_model()
    with torch.no_grad():  # make the prediction non-trivial (adaLN-Zero starts at 0)
        model.denoiser.final.bias.normal_()
    s = NoiseSchedule()
    x0, noise = torch.randn(4, 1, 16, 16), torch.randn(4, 1, 16, 16)
    t, y = torch.tensor([1, 50, 500, 999]), torch.tensor([0, 3, 7, 10])
    model.eval()
    out = diffusion_loss(model, s, x0, y, t=t, noise=noise)
    pred = model(s.q_sample(x0, t, noise), t, y)
    manual = (pred - noise).pow(2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(out.per_sample, manual)
    assert out.loss.item() == pytest.approx(manual.mean().item(), rel=1e-6)
    assert torch.equal(out.t, t) and not out.per_sample.requires_grad


def test_input_perturbation_changes_input_not_target():
    s = NoiseSchedule()
    rec = Recorder(_tiny_model(name="ip"))
    assert rec.input_perturbation == pytest.approx(0.1)
    x0, noise, t, y = torch.randn(64, 1, 16, 16), torch.randn(64, 1, 16, 16), torch.randint(0, 1000, (64,)), torch.zeros(64, dtype=torch.long)
    rec.train()
    torch.manual_seed(1)
    out = diffusion_loss(rec, s, x0, y, t=t, noise=noise)
    clean = s.q_sample(x0, t, noise)
    diff = (rec.seen[-1] - clean) / s.sqrt_one_minus_alphas_cumprod[t].view(-1, 1, 1, 1)
    assert diff.std().item() == pytest.approx(0.1, rel=0.05)  # x_t built with eps + 0.1 eps'
    # target stays eps: at init the DiT predicts exactly 0, so the loss is E[eps^2]
    assert out.loss.item() == pytest.approx(noise.pow(2).mean().item(), rel=1e-5)
    rec.eval()
    diffusion_loss(rec, s, x0, y, t=t, noise=noise)
    assert torch.equal(rec.seen[-1], clean)  # never at evaluation
    diffusion_loss(rec, s, x0, y, t=t, noise=noise, ip_xi=0.0)
    assert torch.equal(rec.seen[-1], clean)


def test_bin_losses():
    per = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    t = torch.tensor([0, 99, 100, 550, 999])
    sums, counts = bin_losses(per, t, 1000, num_bins=10)
    assert counts.tolist() == [2, 1, 0, 0, 0, 1, 0, 0, 0, 1]
    assert sums[0].item() == 3.0 and sums[5].item() == 4.0 and sums[9].item() == 5.0
