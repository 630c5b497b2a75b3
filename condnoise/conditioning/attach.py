"""CEP for any diffusers U-Net training loop: ``attach(unet)`` (paper Sec. 3), public as
``condnoise.cep.attach``.

The handle perturbs the condition embedding the U-Net receives, ``c + delta`` with the CEP
noise of :mod:`condnoise.conditioning.noise` (the same function the condnoise trainer
uses): the ``encoder_hidden_states`` of a text model (every real token; positions where
``encoder_attention_mask`` is 0 keep their value), or the output of the class embedding
(``unet.class_embedding``) of a class-conditional one. It acts only while
``handle.enabled`` is True: an explicit flag, not ``module.training`` (a distillation
target or an EMA copy may sit in train mode and must not be perturbed). Turn it off for
validation and sampling (``handle.enabled = False`` or ``with handle.paused(): ...``).
Every row is perturbed, including rows the caller dropped to the empty caption for CFG
(the handle cannot tell them apart); condnoise's own trainer leaves null rows untouched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from condnoise.conditioning.noise import check_noise, perturb_tokens
from condnoise.errors import UserError

TARGETS = ("auto", "text", "class")


class CEPHandle:
    """What :func:`attach` returns: ``.enabled``, ``.remove()``, ``paused()``, ``stats()``;
    a context manager that removes the hook on exit."""

    def __init__(self, unet: nn.Module, gamma: float, noise: str, scale: str, target: str,
                 generator: torch.Generator | None) -> None:  # fmt: skip
        self.gamma, self.noise, self.scale, self.target = float(gamma), noise, scale, target
        self.generator, self.enabled = generator, True
        self._l2_sum, self._tokens = 0.0, 0
        if target == "text":
            self._hook = unet.register_forward_pre_hook(self._text_hook, with_kwargs=True)
        else:
            self._hook = unet.class_embedding.register_forward_hook(self._class_hook)

    def _perturb(self, c: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        out = perturb_tokens(c, mask, self.gamma, self.noise, scale=self.scale, generator=self.generator)
        with torch.no_grad():
            shift = (out.float() - c.float()).norm(dim=-1)
            real = shift.new_ones(shift.shape) if mask is None else mask.to(shift.dtype)
            self._l2_sum += float((shift * real).sum())
            self._tokens += int(real.sum())
        return out

    def _text_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if not self.enabled:
            return args, kwargs
        mask = kwargs.get("encoder_attention_mask")
        if "encoder_hidden_states" in kwargs and kwargs["encoder_hidden_states"] is not None:
            kwargs = {**kwargs, "encoder_hidden_states": self._perturb(kwargs["encoder_hidden_states"], mask)}
        elif len(args) > 2 and args[2] is not None:
            args = (*args[:2], self._perturb(args[2], mask), *args[3:])
        return args, kwargs

    def _class_hook(self, module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        return self._perturb(out, None) if self.enabled else out

    def stats(self, reset: bool = True) -> dict[str, float]:
        """``mean_l2_shift``: mean ``||delta||`` per perturbed token (paper Fig. 8a x-axis)."""
        out = {"mean_l2_shift": self._l2_sum / self._tokens if self._tokens else 0.0}
        if reset:
            self._l2_sum, self._tokens = 0.0, 0
        return out

    @contextlib.contextmanager
    def paused(self) -> Iterator[CEPHandle]:
        """Temporarily disabled (validation, sampling)."""
        before, self.enabled = self.enabled, False
        try:
            yield self
        finally:
            self.enabled = before

    def remove(self) -> None:
        self._hook.remove()
        self.enabled = False

    def __enter__(self) -> CEPHandle:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


def _target(unet: nn.Module, target: str) -> str:
    if target not in TARGETS:
        raise UserError(f"cep.attach: target must be one of {', '.join(TARGETS)}, got {target!r}")
    blocks = tuple(getattr(getattr(unet, "config", None), "down_block_types", ()) or ())
    has_class = getattr(unet, "class_embedding", None) is not None
    if target == "auto":
        target = "text" if any("CrossAttn" in b for b in blocks) or not has_class else "class"
    if target == "class" and not has_class:
        raise UserError("cep.attach: target 'class' needs a U-Net with a class embedding "
                        "(num_class_embeds or class_embed_type)")  # fmt: skip
    return target


def attach(
    unet: nn.Module,
    gamma: float = 1.0,
    noise: str = "uniform",
    *,
    scale: str = "std",
    target: str = "auto",
    generator: torch.Generator | None = None,
) -> CEPHandle:
    """Perturb the conditions of a diffusers ``UNet2DConditionModel`` (or ``UNet2DModel``
    with a class embedding) with CEP: ``noise`` ``uniform`` (CEP-U) or ``gaussian`` (CEP-G,
    ``scale`` std | variance), strength ``gamma`` (paper: 1) over the width D of a token.

    ``target``: ``text`` (``encoder_hidden_states``), ``class`` (the class embedding's
    output) or ``auto`` (text when the U-Net has cross-attention blocks, else class).
    Returns a :class:`CEPHandle`; ``with attach(unet) as cep: ...`` removes it afterwards.
    """
    check_noise(noise, scale)
    if not 0.0 <= float(gamma) <= 1e4:
        raise UserError(f"cep.attach: gamma must be in [0, 1e4], got {gamma}")
    return CEPHandle(unet, gamma, noise, scale, _target(unet, target), generator)
