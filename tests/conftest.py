import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def fmnist():
    """Real Fashion-MNIST train split from the Debian package: (uint8 images, labels)."""
    from condnoise.data.fashion_mnist import load_fashion_mnist

    return load_fashion_mnist("train")


@pytest.fixture(scope="session")
def eval_cache(tmp_path_factory):
    """One fmnist-classifier trained per test session, shared by evaluation and study tests."""
    from condnoise.evaluation.classifier import CARD_NAME, train_classifier

    cache = tmp_path_factory.getbasetemp() / "condnoise-eval-cache"
    if not (cache / CARD_NAME).is_file():
        train_classifier(cache, progress=False)
    return cache


@pytest.fixture
def one_thread():
    """Small models and tensors run fastest on one torch thread."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def eval_env(monkeypatch, eval_cache):
    """Point CONDNOISE_CACHE at the session's trained fmnist-classifier."""
    import torch

    monkeypatch.setenv("CONDNOISE_CACHE", str(eval_cache))
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def scenes_cache(tmp_path_factory):
    """One cache folder per session: each full scenes split is generated once, on first use."""
    return tmp_path_factory.getbasetemp() / "condnoise-scenes-cache"


@pytest.fixture
def scenes_env(monkeypatch, scenes_cache):
    """Point CONDNOISE_CACHE at the session's scenes cache."""
    monkeypatch.setenv("CONDNOISE_CACHE", str(scenes_cache))
    return scenes_cache
