"""``CondEmbedding``: what a condition encoder gives the denoiser (paper Sec. 3, ``c = c_theta(y)``).

One form for class labels and captions, so every perturbation and denoiser handles both:

- ``tokens`` ``[B, L, D]``: the token embeddings (a class label is one token, L = 1);
- ``mask`` ``[B, L]`` bool: True for real tokens (False = padding);
- ``null`` ``[B]`` bool: rows holding the null (unconditional) condition of CFG;
- ``pooled`` ``[B, D]``: one vector per row (DiT adaLN, a U-Net's added embedding). With
  L = 1 it is the token itself; otherwise the mean of the real tokens (masked mean, as
  sentence-transformers pools MiniLM). :meth:`CondEmbedding.with_tokens` recomputes it,
  so a perturbation of the tokens reaches the pooled vector too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def pool_tokens(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[B, L, D]``, ``[B, L]`` -> ``[B, D]``: the token itself for L = 1, else the mean of
    the real tokens (rows without a real token give 0)."""
    if tokens.shape[1] == 1:
        return tokens[:, 0]
    m = mask.to(tokens.dtype)[..., None]
    return (tokens * m).sum(1) / m.sum(1).clamp(min=1.0)


@dataclass
class CondEmbedding:
    """Token embeddings of a batch of conditions (see the module docstring)."""

    tokens: torch.Tensor  # [B, L, D]
    mask: torch.Tensor  # [B, L] bool, True = real token
    null: torch.Tensor  # [B] bool, True = the null (unconditional) condition
    pooled: torch.Tensor  # [B, D]

    @classmethod
    def from_tokens(cls, tokens: torch.Tensor, mask: torch.Tensor, null: torch.Tensor) -> CondEmbedding:
        return cls(tokens, mask, null, pool_tokens(tokens, mask))

    @classmethod
    def from_vectors(cls, c: torch.Tensor, null: torch.Tensor) -> CondEmbedding:
        """One vector per row ``[B, D]`` (a class embedding) as a one-token embedding."""
        mask = torch.ones(c.shape[0], 1, dtype=torch.bool, device=c.device)
        return cls(c[:, None], mask, null, c)

    def with_tokens(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> CondEmbedding:
        """The same rows with new tokens (and mask); ``pooled`` recomputed from them."""
        mask = self.mask if mask is None else mask
        return CondEmbedding(tokens, mask, self.null, pool_tokens(tokens, mask))

    @property
    def dim(self) -> int:
        return int(self.tokens.shape[-1])

    def __len__(self) -> int:
        return int(self.tokens.shape[0])


def token_shift(before: CondEmbedding, after: CondEmbedding) -> torch.Tensor:
    """Per row: the mean over real tokens (of either embedding) of ``||after - before||``,
    float32 ``[B]`` (for one token: the L2 distance of the class vectors, paper Fig. 8a)."""
    d = (after.tokens.float() - before.tokens.float()).norm(dim=-1)
    real = (before.mask | after.mask).to(d.dtype)
    if d.shape[1] == 1:
        return d[:, 0] * real[:, 0]
    return (d * real).sum(1) / real.sum(1).clamp(min=1.0)
