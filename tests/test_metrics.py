"""Metrics (paper §5) against the field's reference implementations, on real features."""

from __future__ import annotations

import importlib.util
import math
import os
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist

from condnoise import stats
from condnoise.errors import UserError
from condnoise.evaluation import metrics as M
from condnoise.evaluation import neighbors

pytestmark = pytest.mark.usefixtures("eval_env")




@pytest.fixture(scope="module")
def classifier():
    from condnoise.evaluation.features import get_extractor

    return get_extractor("fmnist-classifier")


def _degrade(images: np.ndarray, seed: int, sigma: float = 40.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    noisy = images.astype(np.float64) + rng.normal(0, sigma, images.shape)
    return np.clip(noisy, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def real_fake_features(classifier):
    """Classifier features: 2,000 real test images vs 2,000 noisy train images."""
    from condnoise.data.fashion_mnist import load_fashion_mnist

    test, _ = load_fashion_mnist("test")
    train, _ = load_fashion_mnist("train")
    real = classifier.extract(test[:2000, ..., None])
    fake = classifier.extract(_degrade(train[:2000, ..., None], 0))
    return real, fake


# ------------------------------------------------------------------ FID


def test_fid_equals_torchmetrics(classifier):
    from torchmetrics.image.fid import FrechetInceptionDistance

    from condnoise.data.fashion_mnist import load_fashion_mnist

    class Feature(torch.nn.Module):
        num_features = classifier.dim

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # uint8 [B,1,H,W]
            return classifier._forward(x.float())

    test, _ = load_fashion_mnist("test")
    train, _ = load_fashion_mnist("train")
    real_u8, fake_u8 = np.array(test[:1500, None]), _degrade(train[:1500, None], 1, 25.0)
    tm = FrechetInceptionDistance(feature=Feature())
    tm.update(torch.from_numpy(real_u8), real=True)
    tm.update(torch.from_numpy(fake_u8), real=False)
    expected = float(tm.compute())
    ours = M.fid(classifier.extract(real_u8.transpose(0, 2, 3, 1)),
                 classifier.extract(fake_u8.transpose(0, 2, 3, 1)))
    assert expected > 1.0  # the degraded set is visibly different
    assert ours == pytest.approx(expected, rel=1e-4)


def test_fid_of_identical_sets_is_zero_and_symmetric(real_fake_features):
    real, fake = real_fake_features
    assert abs(M.fid(real, real)) < 1e-6
    assert M.fid(real, fake) == pytest.approx(M.fid(fake, real), rel=1e-6)


def test_fid_needs_more_samples_than_dims_or_shrinkage(real_fake_features):
    real, fake = real_fake_features
    with pytest.raises(UserError, match="shrinkage"):
        M.fid(real[:100], fake[:100])  # 100 samples, 128-d
    value = M.fid(real[:100], fake[:100], shrinkage=0.1)
    assert math.isfinite(value) and value > 0


def test_bad_feature_input_is_a_clear_error(real_fake_features):
    real, fake = real_fake_features
    bad = fake.copy()
    bad[7, 3] = np.nan
    with pytest.raises(UserError, match="row 7"):
        M.fid(real, bad)
    with pytest.raises(UserError, match="dimensions differ"):
        M.precision_recall(real, fake[:, :10])
    with pytest.raises(UserError, match="2-D"):
        M.fid(real[0], fake)
    with pytest.raises(UserError, match="inf"):
        M.precision_recall(real, np.where(fake > 0, np.inf, fake))


# ------------------------------------------------------------------ P/R, D/C


@pytest.mark.parametrize("k", [3, 5])
def test_prdc_equals_prdc_package(real_fake_features, k):
    import prdc

    real, fake = real_fake_features
    ref = prdc.compute_prdc(real, fake, k)
    ours = M.precision_recall(real, fake, k)
    for key in ("precision", "recall", "density", "coverage"):
        assert ours[key] == pytest.approx(ref[key], abs=1e-6), key
    assert 0.0 < ours["precision"] < 1.0 and 0.0 < ours["recall"] < 1.0


def test_precision_recall_and_density_coverage_share_one_pass_at_two_k(real_fake_features):
    """P/R at k=3 and D/C at k=5 from one call (the evaluate default) equal prdc at each k."""
    import prdc

    real, fake = real_fake_features
    real, fake = real[:1200], fake[:1000]
    both = M.manifold_metrics(real, fake, pr_k=3, dc_k=5)
    at3, at5 = prdc.compute_prdc(real, fake, 3), prdc.compute_prdc(real, fake, 5)
    for key, ref in (("precision", at3), ("recall", at3), ("density", at5), ("coverage", at5)):
        assert both[key] == pytest.approx(ref[key], abs=1e-6), key
    dc = M.density_coverage(real, fake, 5)
    assert dc == {"density": both["density"], "coverage": both["coverage"]}
    radii = neighbors.neighbour_radii(real, (3, 5))
    np.testing.assert_array_equal(radii[5], neighbors.kth_neighbour_radii(real, 5))


def test_chunked_neighbours_equal_full_float64_matrix():
    """Small chunks force the multi-block paths; compare with cdist in float64."""
    from sklearn.datasets import load_digits

    x = load_digits().data.astype(np.float64)
    real, fake = x[:700], x[700:1300] + 0.5
    k = 4
    full_rr, full_ff, full_rf = cdist(real, real), cdist(fake, fake), cdist(real, fake)
    r_real = np.sort(full_rr, 1)[:, k]
    r_fake = np.sort(full_ff, 1)[:, k]
    got_r = neighbors.kth_neighbour_radii(real, k, chunk=128)
    np.testing.assert_allclose(got_r, r_real, rtol=1e-12)
    np.testing.assert_allclose(neighbors.kth_neighbour_radii(fake, k, chunk=96), r_fake,
                               rtol=1e-12)
    count, rec, cov = neighbors.cross_counts(real, fake, r_real, r_fake, chunk=100)
    np.testing.assert_array_equal(count, (full_rf < r_real[:, None]).sum(0))
    np.testing.assert_array_equal(rec, (full_rf < r_fake[None, :]).any(1))
    np.testing.assert_array_equal(cov, full_rf.min(1) < r_real)
    knn = neighbors.knn_distances(fake, real, 5, chunk=64)
    np.testing.assert_allclose(knn, np.sort(full_rf.T, 1)[:, :5], rtol=1e-12)


# ------------------------------------------------------------------ TopP&R


def _reference_top_pr() -> types.ModuleType:
    """Load top_pr/top_pr.py from its installed path without `import gudhi`: gudhi (not
    installed, package installed --no-deps) is only used by its <= 3-d bandwidth search,
    which 32-d projected features never reach."""
    spec = importlib.util.find_spec("top_pr")
    path = Path(spec.origin).parent / "top_pr.py"
    source = path.read_text()
    assert source.count("import gudhi\n") == 1
    module = types.ModuleType("top_pr_reference")
    module.__file__ = str(path)
    exec(compile(source.replace("import gudhi\n", ""), str(path), "exec"), module.__dict__)
    return module


def test_top_pr_agrees_with_public_implementation(real_fake_features):
    real, fake = real_fake_features  # n = 2,000 each
    ref = _reference_top_pr().compute_top_pr(real_features=real, fake_features=fake)
    ours = [M.top_pr(real, fake, seed=s) for s in range(5)]
    f1 = np.array([o["top_f1"] for o in ours])
    # The only difference is the bootstrap draw: the reference lies in our bootstrap band.
    band = max(3 * f1.std(), 0.01)
    assert abs(ref["Top_F1"] - f1.mean()) <= band, (ref, f1)
    assert 0.05 < f1.mean() < 0.999
    prec = np.mean([o["top_precision"] for o in ours])
    assert abs(ref["fidelity"] - prec) <= max(3 * np.std([o["top_precision"] for o in ours]), 0.01)


def test_top_pr_projection_matches_reference_seed():
    torch.manual_seed(99)
    w = torch.empty(32, 128)
    torch.nn.init.xavier_normal_(w)
    assert torch.equal(M._top_projection(128), w)


# ------------------------------------------------------------------ IS, accuracy


def test_inception_score_equals_direct_computation(classifier):
    from scipy.stats import entropy

    from condnoise.data.fashion_mnist import load_fashion_mnist

    test, _ = load_fashion_mnist("test")
    probs = classifier.probs(test[:1000, ..., None]).astype(np.float64)
    probs /= probs.sum(1, keepdims=True)
    expected = []
    for part in np.array_split(probs, 10):
        py = part.mean(0)
        expected.append(np.exp(np.mean([entropy(p, py) for p in part])))
    mean, std = M.inception_score(probs, 10)
    assert mean == pytest.approx(np.mean(expected), rel=1e-9)
    assert std == pytest.approx(np.std(expected), rel=1e-6, abs=1e-9)
    assert 5.0 < mean < 10.0  # a confident classifier on 10 balanced classes


def test_condition_accuracy_on_real_labels(classifier):
    from condnoise.data.fashion_mnist import load_fashion_mnist

    test, labels = load_fashion_mnist("test")
    probs = classifier.probs(test[:1000, ..., None])
    assert M.condition_accuracy(probs, labels[:1000]) >= 0.85
    assert M.condition_accuracy(probs, (labels[:1000] + 1) % 10) <= 0.1
    with pytest.raises(UserError):
        M.condition_accuracy(probs, labels[:10])


# ------------------------------------------------------------------ RMD


def test_rmd_on_gaussians_with_known_answer():
    """Two classes N(+-m e1, I) in 4-d: the agnostic Gaussian is N(0, I + m^2 e1 e1^T), so
    RMD(mu_y, y) = m^2 / (1 + m^2) and RMD(0, y) = -m^2."""
    rng = np.random.default_rng(0)
    m, n, d = 2.0, 200_000, 4
    labels = rng.integers(0, 2, n)
    mus = np.zeros((2, d))
    mus[0, 0], mus[1, 0] = m, -m
    x = mus[labels] + rng.standard_normal((n, d))
    model = M.RMDModel(x, labels)
    scores = model.scores(np.stack([mus[0], mus[1], np.zeros(d)]), np.array([0, 1, 0]))
    np.testing.assert_allclose(scores, [m**2 / (1 + m**2)] * 2 + [-(m**2)], atol=0.03)
    # rmd_scores without fit data fits on the features themselves
    assert M.rmd_scores(x[:1000], labels[:1000]).shape == (1000,)
    assert stats.top_fraction_mean(np.arange(1000.0)) == pytest.approx(np.mean(np.arange(990, 1000)))
    with pytest.raises(UserError, match="label 7"):
        model.scores(x[:3], np.array([0, 7, 1]))


# ------------------------------------------------------------------ memorization, entropy


def test_topk_l2_and_memorization_against_brute_force():
    from sklearn.datasets import load_digits

    x = load_digits().data.astype(np.float32)
    train, fake = x[:1200], np.concatenate([x[:50], x[1200:]])  # 50 exact copies
    full = cdist(fake.astype(np.float64), train.astype(np.float64))
    assert M.avg_topk_l2(fake, train, 5) == pytest.approx(np.sort(full, 1)[:, :5].mean(), rel=1e-9)
    thr = M.memorization_threshold(x[1200:], train, 1.0)
    expected = (full.min(1) < thr).mean()
    assert M.memorization_ratio(fake, train, thr) == pytest.approx(expected)
    assert M.memorization_ratio(fake, train, thr) >= 50 / len(fake)
    with pytest.raises(UserError):
        M.memorization_ratio(fake, train, 0.0)


def test_sample_entropy_hand_computed_codebook():
    codebook = np.array([[0.0, 0.0], [1.0, 0.0]])
    # at code 0: p = (1, e^-1) / (1 + e^-1)
    q = math.exp(-1) / (1 + math.exp(-1))
    h0 = -(1 - q) * math.log(1 - q) - q * math.log(q)
    assert M.sample_entropy(np.array([[0.0, 0.0]]), codebook, 1.0) == pytest.approx(h0)
    # equidistant point: log 2; mean over positions of a [1, 2, 1, 2] latent grid
    lat = np.array([[[[0.5, 3.0]], [[0.0, 0.0]]]])
    assert M.sample_entropy(lat, codebook, 1.0) == pytest.approx((math.log(2) + h0) / 2)
    # tau -> small: near codes dominate, entropy -> 0
    assert M.sample_entropy(np.array([[0.1, 0.0]]), codebook, 1e-3) < 1e-6
    with pytest.raises(UserError):
        M.sample_entropy(np.zeros((3, 5)), codebook, 1.0)


def test_no_environment_leak():
    assert os.environ["CONDNOISE_CACHE"].endswith("condnoise-eval-cache")
