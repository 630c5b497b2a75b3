"""Condition encoders: map conditions to the embedding ``c = c_theta(y)`` (paper Sec. 3).

A batch's conditions travel as ONE int64 tensor ``cond``: class labels ``[B]`` or token
ids ``[B, L]`` (text encoders, :mod:`condnoise.conditioning.text`). Every encoder offers

- ``kind`` (``"class"`` or ``"text"``), ``dim`` (token width D);
- ``embed(cond) -> CondEmbedding`` (tokens ``[B, L, D]``, mask, null rows, pooled);
- ``null_like(cond) -> cond`` (null rows of the same shape) and ``is_null(cond) -> [B]``;
- ``check(cond)`` (UserError for a condition of the wrong kind, shape or range);
- ``as_cond(values) -> cond`` (labels or captions of a dataset as a condition tensor).

For class labels the null (unconditional) condition is an extra learned class with index
``num_classes`` (``null_index``), used by classifier-free guidance.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from condnoise.conditioning.embedding import CondEmbedding
from condnoise.errors import UserError


class ClassEmbedder(nn.Module):
    """``nn.Embedding(num_classes + 1, dim)``; row ``num_classes`` is the learned null class.

    ``init_std``: DiT initialises the table with N(0, 0.02^2); LDM keeps torch's N(0, 1).
    The output is used as a vector (DiT adaLN) or a one-token context (U-Net cross-attention).
    """

    kind = "class"

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

    def embed(self, labels: torch.Tensor) -> CondEmbedding:
        """The class vectors as one-token embeddings (``pooled`` = the vector)."""
        return CondEmbedding.from_vectors(self.encode(labels), self.is_null(labels))

    def null_like(self, labels: torch.Tensor) -> torch.Tensor:
        return torch.full_like(labels, self.num_classes)

    def is_null(self, labels: torch.Tensor) -> torch.Tensor:
        return labels == self.num_classes

    def null_embedding(self) -> torch.Tensor:
        return self.embedding.weight[self.num_classes]

    def class_table(self) -> torch.Tensor:
        """The real classes' embeddings ``[num_classes, dim]`` (no null row)."""
        return self.embedding.weight[: self.num_classes]

    def null_labels(self, batch: int, device: torch.device | str = "cpu") -> torch.Tensor:
        return torch.full((batch,), self.num_classes, dtype=torch.long, device=device)

    def as_cond(self, values: Sequence[int] | np.ndarray) -> torch.Tensor:
        """Class indices -> int64 ``[N]`` (captions are a UserError: this model takes classes)."""
        if len(values) and isinstance(values[0], str):
            raise UserError("this model conditions on class labels, but the data has captions "
                            "(train a text model: model.encoder.name bert-embed, minilm or clip)")  # fmt: skip
        return torch.from_numpy(np.array(values, dtype=np.int64))

    def check(self, cond: torch.Tensor) -> None:
        """UserError for token ids (a text condition) or labels outside ``[0, num_classes]``."""
        if cond.dim() != 1:
            raise UserError(f"this model conditions on class labels [B], got a condition of shape "
                            f"{tuple(cond.shape)} (token ids are for text models)")  # fmt: skip
        self.check_labels(cond)

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
    cond: torch.Tensor,
    p: float,
    null: int | torch.Tensor,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Replace each row of ``cond`` by the null condition with probability ``p``
    (classifier-free guidance training, Ho & Salimans 2022; paper Sec. 4: p = 0.1).

    ``null``: the null rows (``encoder.null_like(cond)``) or a class model's null index.
    """
    if p <= 0:
        return cond
    drop = torch.rand(cond.shape[:1], device=cond.device, generator=generator) < p
    if not isinstance(null, torch.Tensor):
        null = torch.full_like(cond, int(null))
    return torch.where(drop.view(-1, *([1] * (cond.dim() - 1))), null, cond)
