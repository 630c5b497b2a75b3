import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def fmnist():
    """Real Fashion-MNIST train split from the Debian package: (uint8 images, labels)."""
    from condnoise.data.fashion_mnist import load_fashion_mnist

    return load_fashion_mnist("train")
