"""Condition encoders: map conditions to the embedding ``c = c_theta(y)`` (paper Sec. 3).

Interface shared by all encoders (text encoders come later):
``encode(conditions) -> [B, dim]``, ``null_embedding() -> [dim]``, ``dim``.
For class labels the null (unconditional) condition is an extra learned class with index
``num_classes`` (``null_index``), used by classifier-free guidance.
"""

from __future__ import annotations

import torch
from torch import nn

from condnoise.errors import UserError


class ClassEmbedder(nn.Module):
    """``nn.Embedding(num_classes + 1, dim)``; row ``num_classes`` is the learned null class.

    ``init_std``: DiT initialises the table with N(0, 0.02^2); LDM keeps torch's N(0, 1).
    The output is used as a vector (DiT adaLN) or a one-token context (U-Net cross-attention).
    """

    def __init__(self, num_classes: int, dim: int, *, init_std: float = 0.02) -> None:
        super().__init__()
        if num_classes < 1 or dim < 1:
            raise UserError(f"ClassEmbedder needs num_classes >= 1 and dim >= 1, got {num_classes}, {dim}")
        self.num_classes = num_classes
        self.dim = dim
        self.embedding = nn.Embedding(num_classes + 1, dim)
        nn.init.normal_(self.embedding.weight, std=init_std)

    @property
    def null_index(self) -> int:
        return self.num_classes

    def encode(self, labels: torch.Tensor) -> torch.Tensor:
        """int64 [B] in ``[0, num_classes]`` (``num_classes`` = null) -> float [B, dim]."""
        return self.embedding(labels)

    forward = encode

    def null_embedding(self) -> torch.Tensor:
        return self.embedding.weight[self.num_classes]

    def class_table(self) -> torch.Tensor:
        """The real classes' embeddings ``[num_classes, dim]`` (no null row)."""
        return self.embedding.weight[: self.num_classes]

    def null_labels(self, batch: int, device: torch.device | str = "cpu") -> torch.Tensor:
        return torch.full((batch,), self.num_classes, dtype=torch.long, device=device)

    def check_labels(self, labels: torch.Tensor) -> None:
        """Raise a UserError for labels outside ``[0, num_classes]`` (CPU-side check)."""
        if labels.dtype not in (torch.int64, torch.int32):
            raise UserError(f"class labels must be int64, got {labels.dtype}")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) > self.num_classes):
            raise UserError(
                f"class label out of range [0, {self.num_classes}] (null = {self.num_classes}): "
                f"min {int(labels.min())}, max {int(labels.max())}"
            )


def cfg_drop(
    labels: torch.Tensor, p: float, null_index: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Replace each label by ``null_index`` with probability ``p`` (classifier-free guidance
    training, Ho & Salimans 2022; paper Sec. 4: p = 0.1)."""
    if p <= 0:
        return labels
    drop = torch.rand(labels.shape, device=labels.device, generator=generator) < p
    return torch.where(drop, torch.full_like(labels, null_index), labels)
