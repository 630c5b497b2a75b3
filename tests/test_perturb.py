"""Statistics and invariants of the condition-embedding perturbations (paper Sec. 3)."""

import math

import pytest
import torch

from condnoise.conditioning import ClassEmbedder, build_perturbation, cfg_drop, perturbation_choices
from condnoise.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")

K, D, B = 10, 256, 4096




@pytest.fixture
def enc():
    torch.manual_seed(0)
    return ClassEmbedder(K, D)


def _batch(enc, n=B, seed=1):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, K, (n,), generator=g)
    return labels, enc.encode(labels).detach()


def _delta(p, enc, labels, c, **kw):
    p.train()
    return p(c, labels, encoder=enc, **kw) - c


@pytest.mark.parametrize("gamma", [0.5, 1.0, 5.0])
def test_cep_u_statistics(enc, gamma):
    p = build_perturbation("cep-u", gamma=gamma)
    labels, c = _batch(enc)
    d = _delta(p, enc, labels, c)
    bound = gamma / math.sqrt(D)
    assert d.abs().max().item() <= bound * (1 + 1e-5)
    assert d.abs().max().item() > 0.99 * bound  # fills the interval
    assert abs(d.mean().item()) < 0.01 * bound
    assert d.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.01)
    assert d.norm(dim=1).mean().item() == pytest.approx(gamma / math.sqrt(3), rel=0.01)
    st = p.stats()
    assert st["mean_l2_shift"] == pytest.approx(d.norm(dim=1).mean().item(), rel=1e-4)
    assert st["perturbed_fraction"] == 1.0
    assert p.stats()["mean_l2_shift"] == 0.0  # reset


def test_cep_g_statistics(enc):
    labels, c = _batch(enc)
    d = _delta(build_perturbation("cep-g", gamma=2.0), enc, labels, c)
    assert abs(d.mean().item()) < 0.01 * 2 / math.sqrt(D)
    assert d.std().item() == pytest.approx(2 / math.sqrt(D), rel=0.01)
    assert d.norm(dim=1).mean().item() == pytest.approx(2.0, rel=0.01)
    # the literal reading N(0, gamma/sqrt(d) I): gamma/sqrt(d) is the variance
    d_var = _delta(build_perturbation("cep-g", gamma=2.0, scale="variance"), enc, labels, c)
    assert d_var.var().item() == pytest.approx(2 / math.sqrt(D), rel=0.01)


@pytest.mark.parametrize("name", ["cep-u", "cep-g", "dropout", "random-flip", "label-smoothing", "cep-fixed"])
def test_eval_mode_is_identity_and_null_rows_untouched(enc, name):
    p = build_perturbation(name)
    labels, c = _batch(enc, 512)
    labels[::4] = enc.null_index
    c = enc.encode(labels).detach()
    idx = torch.arange(512)
    p.eval()
    assert torch.equal(p(c, labels, encoder=enc, sample_index=idx, step=3), c)
    p.train()
    out = p(c, labels, encoder=enc, sample_index=idx, step=3)
    assert torch.equal(out[::4], c[::4])
    assert not torch.equal(out, c)
    assert 0 < p.stats()["mean_l2_shift"]


def test_fresh_noise_each_step_and_bitwise_resume(enc):
    p = build_perturbation("cep-u")
    labels, c = _batch(enc, 64)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    d1, d2 = _delta(p, enc, labels, c), _delta(p, enc, labels, c)
    assert not torch.equal(d1, d2)
    assert (d1 - d2).abs().mean() > 0.1 / math.sqrt(D)
    torch.set_rng_state(state)  # a resumed trainer restores the RNG state
    assert torch.equal(_delta(p, enc, labels, c), d1)
    p.generator = torch.Generator().manual_seed(5)
    d3 = _delta(p, enc, labels, c)
    p.generator = torch.Generator().manual_seed(5)
    assert torch.equal(_delta(p, enc, labels, c), d3)


def test_cep_fixed_stable_across_steps_resumes_and_batches(enc):
    labels, c = _batch(enc, 2048)
    idx = torch.arange(1000, 3048)
    p = build_perturbation("cep-fixed", gamma=1.0, fraction=0.3, seed=7)
    torch.manual_seed(0)
    d1 = _delta(p, enc, labels, c, sample_index=idx)
    torch.manual_seed(99)  # no dependence on the global RNG
    assert torch.equal(_delta(p, enc, labels, c, sample_index=idx), d1)
    # a fresh module (resume) and a different batch composition give the same delta per index
    q = build_perturbation("cep-fixed", gamma=1.0, fraction=0.3, seed=7)
    perm = torch.randperm(2048)[:300]
    torch.testing.assert_close(_delta(q, enc, labels[perm], c[perm], sample_index=idx[perm]), d1[perm])
    member = d1.abs().sum(1) > 0
    assert member.float().mean().item() == pytest.approx(0.3, abs=0.04)
    dm = d1[member]
    assert dm.abs().max().item() <= 1 / math.sqrt(D) * (1 + 1e-5)
    assert abs(dm.mean().item()) < 0.02 / math.sqrt(D)
    assert dm.norm(dim=1).mean().item() == pytest.approx(1 / math.sqrt(3), rel=0.02)
    assert len({tuple(r[:4].tolist()) for r in dm}) == len(dm)  # distinct per sample
    other_seed = build_perturbation("cep-fixed", gamma=1.0, fraction=0.3, seed=8)
    assert not torch.equal(_delta(other_seed, enc, labels, c, sample_index=idx), d1)
    assert p.stats()["perturbed_fraction"] == pytest.approx(0.3, abs=0.04)


def test_cep_fixed_gaussian_and_missing_index(enc):
    labels, c = _batch(enc, 2048)
    p = build_perturbation("cep-fixed", noise="gaussian", gamma=1.0)
    d = _delta(p, enc, labels, c, sample_index=torch.arange(2048))
    assert d.std().item() == pytest.approx(1 / math.sqrt(D), rel=0.02)
    assert abs(d.mean().item()) < 0.02 / math.sqrt(D)
    with pytest.raises(UserError, match="sample_index"):
        _delta(p, enc, labels, c)


def test_dropout_on_embedding(enc):
    labels, c = _batch(enc)
    p = build_perturbation("dropout", p=0.2)
    p.train()
    out = p(c, labels, encoder=enc)
    zero = out == 0
    assert zero.float().mean().item() == pytest.approx(0.2, abs=0.01)
    torch.testing.assert_close(out[~zero], c[~zero] / 0.8)


def test_label_smoothing_formula(enc):
    labels, c = _batch(enc, 64)
    p = build_perturbation("label-smoothing", eps=0.1)
    p.train()
    out = p(c, labels, encoder=enc)
    table = enc.class_table().detach()
    for i in range(0, 64, 7):
        others = torch.cat([table[: labels[i]], table[labels[i] + 1 :]]).mean(0)
        torch.testing.assert_close(out[i], 0.9 * table[labels[i]] + 0.1 * others)


def test_random_flip_rate_prior_and_determinism(enc):
    p = build_perturbation("random-flip", eta=0.25, seed=3)
    lab, c = _batch(enc, 8000)
    idx = torch.arange(8000)
    out1 = p.train()(c, lab, encoder=enc, sample_index=idx, step=1)
    out2 = p(c, lab, encoder=enc, sample_index=idx, step=2)
    ch1, ch2 = (out1 != c).any(1), (out2 != c).any(1)
    assert ch1.float().mean().item() == pytest.approx(0.25, abs=0.02)  # never flips to itself
    assert (ch1 != ch2).float().mean().item() > 0.2  # re-drawn every step
    table = enc.class_table().detach()
    assert torch.isclose(out1[ch1][:, None, :], table[None]).all(-1).any(-1).all()  # a class embedding
    torch.manual_seed(42)  # no dependence on the global RNG: a resumed run repeats the draws
    assert torch.equal(p(c, lab, encoder=enc, sample_index=idx, step=1), out1)
    # drawn from the prior restricted to the other classes
    q = build_perturbation("random-flip", eta=1.0, prior=[0.5, 0.3, 0.2] + [0.0] * (K - 3))
    zeros = torch.zeros(30000, dtype=torch.long)
    new = q.train()(enc.encode(zeros).detach(), zeros, encoder=enc, sample_index=torch.arange(30000), step=0)
    got = (new[:, None, :] == table[None]).all(-1).float().argmax(1)
    frac = torch.bincount(got, minlength=K).float() / len(got)
    assert frac[:3].tolist() == pytest.approx([0.0, 0.6, 0.4], abs=0.015)
    with pytest.raises(UserError, match="step"):
        p(c, lab, encoder=enc, sample_index=idx)
    with pytest.raises(UserError, match="prior"):
        build_perturbation("random-flip", prior=[1.0, 0.0]).train()(c, lab, encoder=enc, sample_index=idx, step=0)


def test_cfg_drop_rate():
    torch.manual_seed(0)
    labels = torch.randint(0, K, (20000,))
    out = cfg_drop(labels, 0.1, K)
    dropped = out == K
    assert dropped.float().mean().item() == pytest.approx(0.1, abs=0.007)
    assert torch.equal(out[~dropped], labels[~dropped])


def test_registry_and_errors():
    names = set(perturbation_choices())
    assert names == {"none", "cep-u", "cep-g", "cep-fixed", "dropout", "label-smoothing", "random-flip", "ip"}
    assert perturbation_choices()["cep-u"]["gamma"] == 1.0
    with pytest.raises(UserError, match="cep-q"):
        build_perturbation("cep-q")
    with pytest.raises(UserError, match="sigma"):
        build_perturbation("cep-u", sigma=1)
    with pytest.raises(UserError, match="gamma"):
        build_perturbation("cep-g", gamma=-1)
    with pytest.raises(UserError, match="scale"):
        build_perturbation("cep-g", scale="var")
    p = build_perturbation("cep-g", gamma=0.5, ip=0.1)
    assert p.input_perturbation == 0.1 and p.params() == {"gamma": 0.5, "scale": "std", "ip": 0.1}
