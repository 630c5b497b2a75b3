"""Feature extractors (paper §5): fmnist-classifier, Inception FID / sFID, registry, cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from condnoise.errors import UserError
from condnoise.evaluation import features as F

pytestmark = pytest.mark.usefixtures("eval_env")




@pytest.fixture(scope="module")
def test_images():
    from condnoise.data.fashion_mnist import load_fashion_mnist

    images, labels = load_fashion_mnist("test")
    return images[..., None], labels


def test_classifier_trained_to_90_percent(eval_cache, test_images):
    from condnoise.evaluation.classifier import evaluate_accuracy, load_classifier

    model, card = load_classifier(eval_cache, train_if_missing=False)
    images, labels = test_images
    assert card["test_accuracy"] >= 0.90
    assert evaluate_accuracy(model, images[..., 0], labels) == pytest.approx(card["test_accuracy"])
    assert (eval_cache / "fmnist-classifier.safetensors").is_file()


def test_missing_classifier_without_training_is_a_clear_error(tmp_path):
    from condnoise.evaluation.classifier import load_classifier

    with pytest.raises(UserError, match="condnoise features train"):
        load_classifier(tmp_path, train_if_missing=False)


def test_classifier_features_crop_padded_32px_samples(test_images):
    ex = F.get_extractor("fmnist-classifier")
    images = test_images[0][:64]
    padded = np.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0)))  # model trained on 32x32 padding
    feats = ex.extract(images)
    assert feats.shape == (64, 128) and feats.dtype == np.float32
    np.testing.assert_allclose(ex.extract(padded), feats, rtol=1e-5, atol=1e-5)
    rgb = np.repeat(images, 3, axis=-1)  # gray -> RGB gives the same luma
    np.testing.assert_allclose(ex.extract(rgb), feats, atol=1e-4)
    probs = ex.probs(images)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    with pytest.raises(UserError, match="centre-cropped"):
        ex.extract(images[:, :27, :26])


def test_fit_resolution_rules(test_images):
    images = test_images[0][:4]
    assert F.fit_resolution(images, 28) is images
    np.testing.assert_array_equal(F.fit_resolution(np.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0))),
                                                   28), images)
    with pytest.raises(UserError, match="uint8"):
        F.fit_resolution(images.astype(np.float32), 28)
    with pytest.raises(UserError, match="no images"):
        F.fit_resolution(images[:0], 28)


def test_inception_input_scaling_and_resize():
    x = torch.full((2, 1, 28, 28), 128.0)
    x[1] = 0.0
    out = F.inception_input(x)
    assert out.shape == (2, 3, 299, 299)  # gray -> RGB, resized to 299
    assert torch.all(out[0] == 0.0) and torch.all(out[1] == -1.0)  # x / 128 - 1
    ramp = torch.arange(28.0).repeat(28, 1)[None, None] * 9  # horizontal ramp survives resize
    r = F.inception_input(ramp)[0, 0]
    assert torch.all(r[:, 1:] >= r[:, :-1]) and float(r[0, 0]) == pytest.approx(-1.0)


def test_inception_pool_and_spatial_features(test_images):
    images = test_images[0][:3]
    pool = F.get_extractor("inception")
    feats = pool.extract(images)
    assert feats.shape == (3, 2048) and np.isfinite(feats).all() and (feats >= 0).all()
    np.testing.assert_allclose(pool.extract(np.repeat(images, 3, axis=-1)), feats, rtol=1e-4,
                               atol=1e-5)
    spatial = F.get_extractor("inception-spatial")
    sp = spatial.extract(images[:2])
    assert sp.shape == (2, 17 * 17 * 7)
    # independent path: the full mixed_6 block output (conv branch is concatenated first)
    with torch.no_grad():
        x = F.inception_input(torch.from_numpy(images[:2]).permute(0, 3, 1, 2).float())
        for name, layer in pool.layers.named_children():
            x = layer(x)
            if name == "mixed_6":
                break
    expected = x[:, :7].permute(0, 2, 3, 1).reshape(2, -1).numpy()
    np.testing.assert_allclose(sp, expected, rtol=1e-5, atol=1e-5)


def test_registered_module_extractor(test_images):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.AdaptiveAvgPool2d(1))
    F.register_extractor("tiny-test-net", lambda: net, channels=3, size=32)
    assert "tiny-test-net" in F.available_extractors()
    ex = F.get_extractor("tiny-test-net")
    feats = ex.extract(test_images[0][:5])
    assert feats.shape == (5, 8)
    with torch.no_grad():
        x = torch.from_numpy(test_images[0][:5]).permute(0, 3, 1, 2).float().repeat(1, 3, 1, 1)
        x = torch.nn.functional.interpolate(x / 127.5 - 1, size=(32, 32), mode="bilinear")
        np.testing.assert_allclose(feats, net(x).flatten(1).numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(UserError, match="unknown feature extractor 'nope'"):
        F.get_extractor("nope")
    F.register_extractor("not-a-module", lambda: 42)
    with pytest.raises(UserError, match="int"):
        F.get_extractor("not-a-module")


def test_reference_features_are_cached(eval_cache):
    from condnoise.evaluation.evaluate import reference_features

    ex = F.get_extractor("fmnist-classifier")
    first = reference_features(ex, "fashion-mnist:test", 300, with_probs=True)
    files = list((eval_cache / "features").glob("fashion-mnist-test-n300-fmnist-classifier-*.npz"))
    assert len(files) == 1
    mtime = files[0].stat().st_mtime_ns
    second = reference_features(ex, "fashion-mnist:test", 300, with_probs=True)
    assert files[0].stat().st_mtime_ns == mtime
    for key in ("features", "labels", "mu", "sigma", "probs"):
        np.testing.assert_array_equal(first[key], second[key])
    assert first["features"].shape == (300, 128) and first["sigma"].shape == (128, 128)
