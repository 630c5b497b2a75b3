"""Losses of the LDM first stage (Rombach et al. 2022, App. G; Esser et al. 2021, Sec. 3.1).

``L = L1 + w_p * perceptual + lambda * d_factor * L_gan + (VQ: codebook/commitment | KL: w_kl * KL)``

- Perceptual term. LPIPS (Zhang et al. 2018) needs a VGG / AlexNet backbone that is not
  available offline, so the default stand-in is :class:`ClassifierPerceptual`: LPIPS's
  recipe (unit-normalised activations per channel, squared differences, spatial mean, summed
  over layers; uniform layer weights, i.e. LPIPS without its learned linear heads) on the
  two convolution layers of the locally trained ``fmnist-classifier`` network (loaded by
  the caller with ``condnoise.evaluation.classifier.load_classifier`` and passed in: the
  training stage does not import evaluation). The network is fully convolutional up to those
  layers, so any image size works; RGB images are compared channel by channel (each as a
  gray image, averaged), which keeps colour differences that a gray conversion would lose.
  It is a weak stand-in outside Fashion-MNIST-like images. :class:`TorchScriptPerceptual`
  loads a real LPIPS (or any) distance ``f(x, y) -> [B]`` saved with ``torch.jit.save``.
- GAN term: PatchGAN hinge losses (Lim & Ye 2017), the discriminator on from
  ``disc_start``; the generator weight is the adaptive weight of Esser et al. 2021 (Eq. 7).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from condnoise.errors import UserError

PERCEPTUAL_KINDS = ("classifier", "lpips", "none")


class ClassifierPerceptual(nn.Module):
    """LPIPS-style distance on the fmnist-classifier's two conv layers (frozen); [B] per image."""

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        body = classifier.body  # Conv(1,32,5,s2) ReLU Conv(32,64,3,s2) ReLU Flatten Linear ReLU
        self.stages = nn.ModuleList([nn.Sequential(body[0], body[1]), nn.Sequential(body[2], body[3])])
        self.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> ClassifierPerceptual:  # always frozen
        return super().train(False)

    def _gray_distance(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        total = x.new_zeros(len(x))
        for stage in self.stages:
            x, y = stage(x), stage(y)
            nx = x / (x.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            ny = y / (y.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + (nx - ny).pow(2).sum(1).mean((1, 2))
        return total

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``x``, ``y``: [B, C, H, W] in [-1, 1]; channels compared one by one, averaged."""
        c = x.shape[1]
        d = self._gray_distance(x.reshape(-1, 1, *x.shape[2:]), y.reshape(-1, 1, *y.shape[2:]))
        return d.reshape(len(x), c).mean(1)


class TorchScriptPerceptual(nn.Module):
    """A user's LPIPS saved as TorchScript: ``f(x, y)`` on RGB in [-1, 1] -> distances."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self.net = torch.jit.load(check_lpips_path(path), map_location="cpu")
        self.net.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> TorchScriptPerceptual:
        return super().train(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x, y = x.repeat(1, 3, 1, 1), y.repeat(1, 3, 1, 1)
        return self.net(x, y).reshape(len(x), -1).mean(1)


def check_lpips_path(path: str | None) -> str:
    if not path or not Path(path).is_file():
        raise UserError(
            f"loss.lpips_path: file not found: {path!r} (a TorchScript LPIPS module f(x, y) -> "
            "distance, e.g. torch.jit.trace of lpips.LPIPS; offline the lpips package lacks its "
            "VGG/AlexNet backbone, so use loss.perceptual=classifier instead)")
    return str(path)


def build_perceptual(kind: str, *, lpips_path: str | None = None,
                     classifier: nn.Module | None = None) -> nn.Module | None:
    """The perceptual distance of ``loss.perceptual`` (``none`` -> ``None``); ``classifier``:
    the fmnist-classifier network that ``classifier`` needs."""
    if kind == "none":
        return None
    if kind == "lpips":
        return TorchScriptPerceptual(check_lpips_path(lpips_path))
    if kind == "classifier":
        if classifier is None:
            raise UserError("loss.perceptual=classifier needs the fmnist-classifier network "
                            "(train_autoencoder(..., classifier=load_classifier(dir)[0]))")
        return ClassifierPerceptual(classifier)
    raise UserError(f"loss.perceptual: invalid value {kind!r}; valid options: "
                    + ", ".join(PERCEPTUAL_KINDS))


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss ``(E relu(1 - D(x)) + E relu(1 + D(x_rec))) / 2`` (taming)."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator side of the hinge GAN: ``-E D(x_rec)``."""
    return -logits_fake.mean()


def adaptive_weight(rec_loss: torch.Tensor, gan_loss: torch.Tensor, last_layer: torch.Tensor,
                    *, max_weight: float = 1e4, eps: float = 1e-4) -> torch.Tensor:
    """Esser et al. 2021, Eq. 7: ``||grad_L L_rec|| / (||grad_L L_gan|| + 1e-4)`` at the
    decoder's last layer ``L``, clamped to ``[0, max_weight]`` and detached."""
    g_rec = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_gan = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
    return (g_rec.norm() / (g_gan.norm() + eps)).clamp(0.0, max_weight).detach()


def kl_divergence(posterior: object) -> torch.Tensor:
    """KL(q(z|x) || N(0, I)) summed over latent dims, mean over the batch (LDM's ``kl_loss``)."""
    return posterior.kl().mean()  # type: ignore[attr-defined]
