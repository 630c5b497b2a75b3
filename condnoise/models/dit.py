"""Diffusion Transformer (Peebles & Xie 2023) with adaLN-Zero blocks (paper Sec. 4: DiT-XL/2).

Conditioned on a condition-embedding *vector* ``c [B, cond_dim]`` (so every perturbation of
Sec. 3 applies to it) added to the timestep embedding. Fused QKV, one adaLN linear per
block for the 6 modulation vectors, ``scaled_dot_product_attention``, fixed 2-D sin-cos
position embeddings, optional per-block activation checkpointing. No data-dependent
control flow inside a block (``torch.compile`` friendly); bf16-autocast safe.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from condnoise.conditioning.embedding import CondEmbedding
from condnoise.errors import UserError

#: DiT family: name -> (hidden, depth, heads); sizes are "<name>/<patch>", patch in 2, 4, 8.
DIT_CONFIGS: dict[str, tuple[int, int, int]] = {
    "T": (128, 6, 4),  # tiny, not in the DiT paper: the 2-core CPU demo size
    "S": (384, 12, 6),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
    "XL": (1152, 28, 16),
}
DIT_PATCHES = (2, 4, 8)


def dit_sizes() -> list[str]:
    return [f"{n}/{p}" for n in DIT_CONFIGS for p in DIT_PATCHES]


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (int or float) timesteps ``[B] -> float32 [B, dim]`` (DiT/ADM)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def sincos_pos_embed_2d(dim: int, grid: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding ``[grid*grid, dim]`` (MAE / DiT layout)."""
    if dim % 4:
        raise UserError(f"DiT hidden size must be divisible by 4 for 2-D sin-cos embeddings, got {dim}")

    def one_axis(pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    gw, gh = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64))
    emb = np.concatenate([one_axis(gw), one_axis(gh)], axis=1)  # DiT: w first, then h
    return torch.from_numpy(emb).float()


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class CrossAttention(nn.Module):
    """``x += proj(attn(q = W_q LN(x), k, v = W_kv ctx))`` over the real context tokens; the
    output projection starts at zero, so the block starts as the identity (as adaLN-Zero;
    the cross-attention placement of PixArt-alpha, Chen et al. 2023)."""

    def __init__(self, hidden: int, heads: int, ctx_dim: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(hidden, eps=1e-6)
        self.q = nn.Linear(hidden, hidden)
        self.kv = nn.Linear(ctx_dim, 2 * hidden)
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, n, h = x.shape
        d = h // self.heads
        q = self.q(self.norm(x)).view(b, n, self.heads, d).transpose(1, 2)
        k, v = self.kv(ctx.to(x.dtype)).view(b, ctx.shape[1], 2, self.heads, d).permute(2, 0, 3, 1, 4).unbind(0)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
        return x + self.proj(a.transpose(1, 2).reshape(b, n, h))


class DiTBlock(nn.Module):
    """adaLN-Zero transformer block: ``x += gate * f(modulate(LN(x)))`` for attention and MLP;
    with ``ctx_dim`` a cross-attention layer on the condition tokens sits between them."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: float = 4.0, ctx_dim: int | None = None) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        mlp = int(hidden * mlp_ratio)
        self.fc1 = nn.Linear(hidden, mlp)
        self.fc2 = nn.Linear(mlp, hidden)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))
        self.cross = CrossAttention(hidden, heads, ctx_dim) if ctx_dim else None

    def forward(self, x: torch.Tensor, c: torch.Tensor, ctx: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        b, n, h = x.shape
        sh1, sc1, g1, sh2, sc2, g2 = self.ada(c).chunk(6, dim=-1)
        qkv = self.qkv(modulate(self.norm1(x), sh1, sc1))
        q, k, v = qkv.view(b, n, 3, self.heads, h // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, h)
        x = x + g1[:, None] * self.proj(a)
        if self.cross is not None and ctx is not None:
            x = self.cross(x, ctx, mask)
        m = self.fc2(F.gelu(self.fc1(modulate(self.norm2(x), sh2, sc2)), approximate="tanh"))
        return x + g2[:, None] * m


class DiT(nn.Module):
    """``forward(x [B,C,H,W], t [B], emb: CondEmbedding) -> eps [B,C,H,W]`` (or ``[B,2C,H,W]``
    with ``learn_sigma``). ``emb.pooled [B, cond_dim]`` conditions adaLN (projected to
    ``hidden`` when ``cond_dim != hidden``); with ``text`` every block also cross-attends to
    ``emb.tokens`` (real tokens only, ``emb.mask``)."""

    def __init__(
        self,
        *,
        in_channels: int,
        image_size: int,
        cond_dim: int,
        hidden: int = 384,
        depth: int = 12,
        heads: int = 6,
        patch: int = 2,
        mlp_ratio: float = 4.0,
        learn_sigma: bool = False,
        checkpointing: bool | int = False,
        freq_dim: int = 256,
        text: bool = False,
        guidance_dim: int | None = None,
    ) -> None:
        super().__init__()
        if image_size % patch:
            raise UserError(f"DiT: image size {image_size} is not divisible by patch size {patch}")
        if hidden % heads:
            raise UserError(f"DiT: hidden size {hidden} is not divisible by heads {heads}")
        self.in_channels, self.patch, self.hidden = in_channels, patch, hidden
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.grid = image_size // patch
        self.freq_dim = freq_dim
        #: blocks 0..k-1 recompute their activations in backward (True = all, False/0 = none):
        #: checkpoint only as many as the memory needs: each costs one more forward pass
        #: (Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost")
        self.checkpoint_blocks = depth if checkpointing is True else int(checkpointing)
        self.x_embed = nn.Conv2d(in_channels, hidden, patch, stride=patch)
        self.register_buffer("pos_embed", sincos_pos_embed_2d(hidden, self.grid)[None], persistent=False)
        self.t_embed = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        #: an LCM student's guidance embedding, projected onto the timestep features before
        #: t_embed (as diffusers' TimestepEmbedding with cond_proj_dim), zero-initialised
        self.w_proj = nn.Linear(guidance_dim, freq_dim, bias=False) if guidance_dim else None
        self.c_proj = nn.Identity() if cond_dim == hidden else nn.Linear(cond_dim, hidden)
        self.text = text
        ctx = cond_dim if text else None
        self.blocks = nn.ModuleList(DiTBlock(hidden, heads, mlp_ratio, ctx) for _ in range(depth))
        self.final_norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))
        self.final = nn.Linear(hidden, patch * patch * self.out_channels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """DiT initialisation: xavier linears, N(0, 0.02) timestep MLP, zeroed adaLN + output."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        w = self.x_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embed.bias)
        nn.init.normal_(self.t_embed[0].weight, std=0.02)
        nn.init.normal_(self.t_embed[2].weight, std=0.02)
        zeroed = [blk.ada[1] for blk in self.blocks] + [blk.cross.proj for blk in self.blocks if blk.cross]
        for lin in zeroed + [self.final_ada[1], self.final]:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)
        if self.w_proj is not None:
            nn.init.zeros_(self.w_proj.weight)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        b, p, g, c = x.shape[0], self.patch, self.grid, self.out_channels
        x = x.view(b, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(b, c, g * p, g * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, emb: CondEmbedding, **extra: Any) -> torch.Tensor:
        """``extra["timestep_cond"]`` ``[B, guidance_dim]``: an LCM student's guidance embedding."""
        w_cond = extra.pop("timestep_cond", None)
        if any(v is not None for v in extra.values()):
            raise UserError(f"DiT takes no extra inputs {sorted(extra)}")
        if (w_cond is None) != (self.w_proj is None):
            raise UserError("DiT: timestep_cond (the guidance embedding) is needed by an LCM student "
                            "and taken by no other DiT")  # fmt: skip
        freqs = timestep_embedding(t, self.freq_dim)
        if self.w_proj is not None:
            freqs = freqs + self.w_proj(w_cond.to(self.w_proj.weight.dtype))
        h = self.x_embed(x).flatten(2).transpose(1, 2) + self.pos_embed
        te = self.t_embed(freqs.to(self.t_embed[0].weight.dtype))
        cond = te + self.c_proj(emb.pooled)
        ctx, mask = (emb.tokens, emb.mask) if self.text else (None, None)
        k = self.checkpoint_blocks if self.training else 0
        for i, blk in enumerate(self.blocks):
            if i < k:
                h = checkpoint(blk, h, cond, ctx, mask, use_reentrant=False)
            else:
                h = blk(h, cond, ctx, mask)
        shift, scale = self.final_ada(cond).chunk(2, dim=-1)
        return self.unpatchify(self.final(modulate(self.final_norm(h), shift, scale)))
