"""Samplers, classifier-free guidance, per-sample seeding, grids and the noise walk."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from condnoise.diffusion.grids import make_grid, save_grid, to_uint8
from condnoise.diffusion.samplers import guided_eps, make_scheduler, null_condition, sample
from condnoise.diffusion.sampling import generate, parse_guidance, sample_grid, scale_dirname
from condnoise.diffusion.schedule import NoiseSchedule
from condnoise.diffusion.seeding import (
    class_index,
    initial_noise,
    parse_classes,
    requested_labels,
    sample_generators,
    sample_seed,
)
from condnoise.diffusion.walk import circle_noise, circle_thetas, noise_walk
from condnoise.errors import UserError
from condnoise.models.autoencoder import IdentityAutoencoder
from condnoise.models.conditional import build_model

torch.set_num_threads(1)


def digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn digits, 8x8 gray in [-1, 1], 10 classes."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0 * 2 - 1).unsqueeze(1)
    return x, torch.from_numpy(d.target.astype(np.int64))


@pytest.fixture(scope="module")
def tiny():
    """A real DiT briefly trained on digits (so class and null embeddings differ)."""
    from condnoise.diffusion.loss import diffusion_loss

    torch.manual_seed(0)
    cfg = {"family": "dit", "size": "S/4", "hidden": 32, "depth": 2, "heads": 2, "patch": 2}
    model = build_model(cfg, in_channels=1, image_size=8, num_classes=10)
    schedule = NoiseSchedule("linear", 1000)
    x, y = digits_tensors()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(40):
        idx = torch.randint(0, len(x), (64,), generator=gen)
        loss = diffusion_loss(model, schedule, x[idx], y[idx], generator=gen).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), schedule


class GaussianDenoiser(torch.nn.Module):
    """The exact eps-predictor for data N(mu_y, sigma^2 I): E[eps | x_t] in closed form.

    An oracle with a known answer for the samplers (not a stand-in for a trained model):
    x_t ~ N(sqrt(a) mu, a sigma^2 + 1 - a), so E[eps | x_t] = sqrt(1-a)(x_t - sqrt(a) mu) /
    (a sigma^2 + 1 - a).
    """

    def __init__(self, schedule: NoiseSchedule, means: torch.Tensor, sigma: float) -> None:
        super().__init__()
        self.register_buffer("abar", schedule.alphas_cumprod.double())
        null_mean = means.mean(0, keepdim=True)  # unused by s=1 sampling
        self.register_buffer("means", torch.cat([means, null_mean]).double())
        self.sigma, self.null_index = sigma, means.shape[0]
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives the module a device

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        a = self.abar[t].view(-1, 1, 1, 1)
        mu = self.means[labels]
        eps = (1 - a).sqrt() * (x.double() - a.sqrt() * mu) / (a * self.sigma**2 + 1 - a)
        return eps.float()


# ---------------------------------------------------------------- guidance algebra


def test_guidance_algebra_on_trained_model(tiny):
    model, _ = tiny
    torch.manual_seed(1)
    x, t = torch.randn(6, 1, 8, 8), torch.randint(0, 1000, (6,))
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    null = model.null_like(labels)
    with torch.no_grad():
        eps_c, eps_u = model(x, t, labels), model(x, t, null)
        assert (eps_c - eps_u).abs().max() > 1e-3  # the condition matters after training
        g1 = guided_eps(model, x, t, labels, guidance=1.0)
        g0 = guided_eps(model, x, t, labels, guidance=0.0)
        g3 = guided_eps(model, x, t, labels, guidance=3.0)
    assert torch.equal(g1, eps_c)
    assert torch.equal(g0, eps_u)
    torch.testing.assert_close(g3, eps_u + 3.0 * (eps_c - eps_u), atol=1e-5, rtol=1e-5)


def test_null_condition_comes_from_the_model(tiny):
    labels = torch.tensor([0, 4, 9])
    assert null_condition(tiny[0], labels).tolist() == [10, 10, 10]
    assert tiny[0].is_null(torch.tensor([10, 3])).tolist() == [True, False]
    with pytest.raises(UserError, match="null condition"):
        null_condition(torch.nn.Linear(2, 2), labels)


def test_ddim_equals_hand_written_ddim(tiny):
    """Our DDIM (trailing spacing, eta=0) = x0 = (x - sqrt(1-a) eps)/sqrt(a), then re-noise."""
    model, schedule = tiny
    steps, s = 10, 2.5
    noise = initial_noise(sample_generators(3, range(4)), (1, 8, 8))
    labels = torch.tensor([1, 3, 5, 7])
    ours = sample(model, schedule, labels, noise, guidance=s, sampler="ddim", steps=steps)
    abar = schedule.alphas_cumprod.double()
    ts = [round(1000 - k * 1000 / steps) - 1 for k in range(steps)]  # 999, 899, ..., 99
    x = noise.double()
    with torch.no_grad():
        for k, t in enumerate(ts):
            tb = torch.full((4,), t)
            eps_c = model(x.float(), tb, labels).double()
            eps_u = model(x.float(), tb, torch.full_like(labels, 10)).double()
            eps = eps_u + s * (eps_c - eps_u)
            a, a_prev = abar[t], (abar[ts[k + 1]] if k + 1 < steps else torch.tensor(1.0))
            x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
            x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    torch.testing.assert_close(ours.double(), x, atol=2e-3, rtol=1e-3)


def gaussian_samples(sampler: str, steps: int, n: int = 600) -> tuple[torch.Tensor, torch.Tensor]:
    schedule = NoiseSchedule("linear", 1000)
    means = torch.tensor([-0.5, 0.6]).view(2, 1, 1, 1).expand(2, 1, 2, 2).contiguous()
    model = GaussianDenoiser(schedule, means, sigma=0.3)
    gens = sample_generators(0, range(n))
    labels = torch.arange(n) % 2
    x = sample(model, schedule, labels, initial_noise(gens, (1, 2, 2)), guidance=1.0,
               sampler=sampler, steps=steps, generator=gens)  # fmt: skip
    return x, labels


@pytest.mark.parametrize(("sampler", "steps"), [("ddpm", 200), ("ddim", 200), ("dpm++", 50)])
def test_samplers_reproduce_a_known_gaussian(sampler, steps):
    """With the exact denoiser of N(mu_y, 0.3^2 I), samples have mean mu_y and std 0.3."""
    x, labels = gaussian_samples(sampler, steps)
    for y, mu in ((0, -0.5), (1, 0.6)):
        v = x[labels == y].flatten()
        assert abs(v.mean().item() - mu) < 0.03, (sampler, y, v.mean())
        assert abs(v.std().item() - 0.3) < 0.03, (sampler, y, v.std())


def test_dpm_solver_is_higher_order_than_ddim():
    """Same 50 steps: DPM-Solver++ 2M lands much closer to the true class std than DDIM."""
    err = {}
    for sampler in ("ddim", "dpm++"):
        x, labels = gaussian_samples(sampler, 50)
        err[sampler] = abs(x[labels == 0].std().item() - 0.3)
    assert err["dpm++"] < 0.5 * err["ddim"], err


def test_scheduler_uses_the_training_betas():
    schedule = NoiseSchedule("cosine", 500)
    for name in ("ddpm", "ddim", "dpm++"):
        sch = make_scheduler(schedule, name)
        torch.testing.assert_close(sch.alphas_cumprod, schedule.alphas_cumprod, atol=1e-6, rtol=1e-5)
        sch.set_timesteps(10)
        assert int(sch.timesteps[0]) == 499  # trailing: the first step starts at pure noise


def test_sampler_input_errors(tiny):
    model, schedule = tiny
    noise, labels = torch.randn(2, 1, 8, 8), torch.tensor([0, 1])
    with pytest.raises(UserError, match="unknown sampler 'euler'"):
        sample(model, schedule, labels, noise, guidance=2, sampler="euler", steps=5)
    with pytest.raises(UserError, match="--steps 0"):
        sample(model, schedule, labels, noise, guidance=2, sampler="ddim", steps=0)
    with pytest.raises(UserError, match=">= 0"):
        sample(model, schedule, labels, noise, guidance=-1, sampler="ddim", steps=5)


# ---------------------------------------------------------------- determinism / pairing


@pytest.mark.parametrize("sampler", ["ddpm", "dpm++"])
def test_samples_do_not_depend_on_batching(tiny, sampler):
    model, schedule = tiny
    ae = IdentityAutoencoder()
    idx = list(range(10))
    labels = requested_labels(7, idx, 10)
    kw = dict(shape=(1, 8, 8), guidance=2.0, sampler=sampler, steps=8, seed=7)
    whole = generate(model, schedule, ae, idx, labels, batch_size=10, **kw)
    split = generate(model, schedule, ae, idx, labels, batch_size=3, **kw)
    shard = generate(model, schedule, ae, idx[6:], labels[6:], batch_size=4, **kw)
    assert whole.shape == (10, 8, 8, 1) and whole.dtype == np.uint8
    assert np.abs(whole.astype(int) - split.astype(int)).max() <= 1
    assert np.abs(whole[6:].astype(int) - shard.astype(int)).max() <= 1
    assert len({whole[i].tobytes() for i in range(10)}) == 10  # distinct noise per index
    again = generate(model, schedule, ae, idx, labels, batch_size=10, **kw)
    assert np.array_equal(whole, again)


def test_seeds_are_per_index_and_stable():
    assert sample_seed(0, 5) == sample_seed(0, 5)
    assert len({sample_seed(0, i) for i in range(1000)}) == 1000
    assert sample_seed(0, 5) != sample_seed(1, 5) != sample_seed(0, 5, "label")
    a = initial_noise(sample_generators(0, [3, 4]), (2, 2))
    b = initial_noise(sample_generators(0, [4]), (2, 2))
    assert torch.equal(a[1], b[0])


def test_requested_labels_modes():
    idx = range(25)
    assert requested_labels(0, idx, 10).tolist() == [i % 10 for i in idx]
    rnd = requested_labels(0, idx, 10, "random")
    assert rnd.min() >= 0 and rnd.max() < 10 and len(set(rnd.tolist())) > 3
    assert np.array_equal(rnd[5:], requested_labels(0, range(5, 25), 10, "random"))
    assert requested_labels(0, range(4), 10, [2, 7]).tolist() == [2, 7, 2, 7]
    names = ("T-shirt/top", "Trouser", "Bag")
    assert parse_classes("random", names) == "random"
    assert parse_classes("bag, 1", names) == [2, 1]
    assert class_index("T-shirt/top", names) == 0
    with pytest.raises(UserError, match="unknown class 'Hat'"):
        class_index("Hat", names)
    with pytest.raises(UserError, match="not in"):
        requested_labels(0, idx, 3, [5])


def test_parse_guidance_and_dir_names():
    assert parse_guidance("1.5, 2,3") == [1.5, 2.0, 3.0]
    assert [scale_dirname(s) for s in (1.5, 2.0, 1.75, 10)] == ["s1.5", "s2", "s1.75", "s10"]
    for bad, msg in (("1.5,x", "'x' is not a number"), ("-1", ">= 0"), ("2,2.0", "twice"),
                     ("", "is not a number"), ("nan", "finite")):  # fmt: skip
        with pytest.raises(UserError, match=msg):
            parse_guidance(bad)


# ---------------------------------------------------------------- grids / trainer hook / walk


def test_save_grid_layout(tmp_path, fmnist):
    images = fmnist[0][:7, :, :, None]
    save_grid(images, tmp_path / "g.png", nrow=3)
    img = np.asarray(Image.open(tmp_path / "g.png"))
    assert img.shape == (3 * 30 + 2, 3 * 30 + 2)  # 3 rows, 3 cols, 2px padding
    assert np.array_equal(img[2:30, 32:60], fmnist[0][1])
    floats = torch.from_numpy(images.transpose(0, 3, 1, 2) / 127.5 - 1.0)
    assert np.array_equal(make_grid(floats, 3), make_grid(images, 3))
    assert np.array_equal(to_uint8(floats), images)


def test_sample_grid_hook(tiny, tmp_path):
    model, schedule = tiny
    model.train()
    images = sample_grid(model, schedule, 3, 2, tmp_path / "s.png", shape=(1, 8, 8), steps=5)
    assert model.training  # restored
    model.eval()
    assert images.shape == (6, 8, 8, 1)
    assert Image.open(tmp_path / "s.png").size == (2 * 10 + 2, 3 * 10 + 2)
    again = sample_grid(model, schedule, 3, 2, tmp_path / "t.png", shape=(1, 8, 8), steps=5)
    assert np.array_equal(images, again)


def test_circle_noise_is_a_closed_gaussian_loop():
    z = initial_noise(sample_generators(0, range(2)), (4, 32, 32))
    thetas = circle_thetas(8)
    xs = circle_noise(z[0], z[1], thetas)
    assert xs.shape == (8, 4, 32, 32)
    torch.testing.assert_close(xs[0], z[0])
    torch.testing.assert_close(xs[2], z[1], atol=1e-6, rtol=0)  # theta = pi/2
    closed = circle_noise(z[0], z[1], np.array([2 * math.pi]))[0]
    torch.testing.assert_close(closed, z[0], atol=1e-5, rtol=0)
    for x in xs:  # every frame is standard normal (norm kept): std within sampling error
        assert abs(x.std().item() - 1.0) < 0.03


def test_noise_walk(tiny):
    model, schedule = tiny
    ae = IdentityAutoencoder()
    images, thetas = noise_walk(model, schedule, ae, 4, shape=(1, 8, 8), frames=6, rows=2,
                                steps=5, seed=1)  # fmt: skip
    assert images.shape == (12, 8, 8, 1) and len(thetas) == 6
    assert len({im.tobytes() for im in images}) > 6
    with pytest.raises(UserError, match="deterministic sampler"):
        noise_walk(model, schedule, ae, 4, shape=(1, 8, 8), sampler="ddpm")
    with pytest.raises(UserError, match="--frames"):
        noise_walk(model, schedule, ae, 4, shape=(1, 8, 8), frames=1)
