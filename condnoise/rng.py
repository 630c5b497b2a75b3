"""The one deterministic random scheme of every stage: a counter-based hash.

``hash64(seed, stream, *counters)`` mixes a seed, a named stream and any number of integer
counters (sample index, optimiser step, column, rank, ...) through the SplitMix64
finaliser (Steele, Lea & Flood, "Fast splittable pseudorandom number generators",
OOPSLA 2014) into 64 random bits. A draw is a pure function of its key, so it does not
depend on batch composition, worker or rank count, device or resume point. Counters are
Python ints (the result is an ``int`` in ``[0, 2**64)``) or integer tensors on any device
(an int64 tensor, broadcast over the counters, the 64 bits in two's complement).

Derived draws: :func:`uniform` (float64 in [0, 1), 53 bits), :func:`normal` (Box-Muller on
two sub-keys), :func:`categorical` (inverse CDF), :func:`relabel` (symmetric label noise),
:func:`derive_seed` (63 bits for a ``torch.Generator``) and :func:`generator`.

Users: the sampler's per-sample seeds and random classes (``diffusion.seeding``), random
label flips and caption swaps (``data.random_flip`` and the ``random-flip`` perturbation),
fixed CEP (``conditioning.perturb``), the per-epoch shard order of ``wds:`` training
streams (``data.webdataset``), the trainer's per-step and per-rank seeds (``training``).
:data:`VERSION` changes whenever any draw changes; checkpoints, sample folders and study
cells record it, so a resume never mixes draws of two schemes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

VERSION = 2  # 1: the per-stage schemes (BLAKE2b, SplitMix64, multiplicative) before this module

_MASK64 = (1 << 64) - 1
_GOLDEN, _M1, _M2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
_SHIFT_MASKS = {s: (1 << (64 - s)) - 1 for s in (11, 27, 30, 31)}

Counter = int | np.integer | np.ndarray | torch.Tensor


def _signed(c: int) -> int:
    """An unsigned 64-bit constant as the int64 with the same bits."""
    c &= _MASK64
    return c - (1 << 64) if c >= 1 << 63 else c


def _srl(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's ``>>`` is arithmetic)."""
    return (x >> s) & _SHIFT_MASKS[s]


def splitmix64(x: Any) -> Any:
    """The SplitMix64 step ``x + golden`` then its finaliser; int -> int, int64 tensor ->
    int64 tensor (two's-complement wrap-around arithmetic)."""
    if isinstance(x, torch.Tensor):
        z = x + _signed(_GOLDEN)
        z = (z ^ _srl(z, 30)) * _signed(_M1)
        z = (z ^ _srl(z, 27)) * _signed(_M2)
        return z ^ _srl(z, 31)
    z = (int(x) + _GOLDEN) & _MASK64
    z = ((z ^ (z >> 30)) * _M1) & _MASK64
    z = ((z ^ (z >> 27)) * _M2) & _MASK64
    return z ^ (z >> 31)


def stream_id(stream: str | int) -> int:
    """A stream name as a 64-bit constant (FNV-1a of its UTF-8 bytes; ints pass through)."""
    if isinstance(stream, int):
        return stream & _MASK64
    h = 0xCBF29CE484222325
    for byte in stream.encode():
        h = ((h ^ byte) * 0x100000001B3) & _MASK64
    return h


def _as_counter(c: Counter) -> int | torch.Tensor:
    if isinstance(c, torch.Tensor):
        return c.to(torch.int64)
    if isinstance(c, np.ndarray):
        return torch.from_numpy(np.asarray(c, dtype=np.int64))
    return int(c)


def hash64(seed: int, stream: str | int, *counters: Counter) -> int | torch.Tensor:
    """64 random bits keyed by ``(seed, stream, *counters)``: an int, or an int64 tensor
    (broadcast) when any counter is a tensor / array."""
    h: int | torch.Tensor = splitmix64(splitmix64(int(seed) & _MASK64) ^ stream_id(stream))
    for c in map(_as_counter, counters):
        if isinstance(h, int) and isinstance(c, int):
            h = splitmix64(h ^ (c & _MASK64))
        elif isinstance(h, int):
            h = splitmix64(c ^ _signed(h))
        else:
            h = splitmix64(h ^ (c if isinstance(c, torch.Tensor) else _signed(c)))
    return h


def uniform(seed: int, stream: str | int, *counters: Counter) -> float | torch.Tensor:
    """Uniform in [0, 1) from the top 53 bits: a float, or a float64 tensor."""
    h = hash64(seed, stream, *counters)
    if isinstance(h, torch.Tensor):
        return _srl(h, 11).to(torch.float64) * 2.0**-53
    return (h >> 11) * 2.0**-53


def normal(seed: int, stream: str | int, *counters: Counter) -> float | torch.Tensor:
    """Standard normal (Box-Muller on the sub-keys ``(*counters, 0)`` and ``(*counters, 1)``)."""
    u1 = uniform(seed, stream, *counters, 0)
    u2 = uniform(seed, stream, *counters, 1)
    if isinstance(u1, torch.Tensor):
        return torch.sqrt(-2.0 * torch.log1p(-u1)) * torch.cos(2.0 * math.pi * u2)
    return math.sqrt(-2.0 * math.log1p(-u1)) * math.cos(2.0 * math.pi * u2)


def derive_seed(seed: int, stream: str | int, *counters: int) -> int:
    """A 63-bit seed (for ``torch.Generator.manual_seed`` / numpy) keyed like :func:`hash64`."""
    return int(hash64(seed, stream, *(int(c) for c in counters))) & ((1 << 63) - 1)


def generator(
    seed: int, stream: str | int, *counters: int, device: str | torch.device = "cpu"
) -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with :func:`derive_seed`."""
    return torch.Generator(device=device).manual_seed(derive_seed(seed, stream, *counters))


def categorical(
    u: torch.Tensor, weights: torch.Tensor, exclude: torch.Tensor | None = None
) -> torch.Tensor:
    """Inverse-CDF draw per row from class ``weights`` [K] given uniforms ``u`` [B]; with
    ``exclude`` [B] that class gets weight 0 in its row (the others renormalised)."""
    w = weights.to(device=u.device, dtype=torch.float64).expand(u.shape[0], -1).clone()
    if exclude is not None:
        w.scatter_(1, exclude.to(torch.int64)[:, None], 0.0)
    cdf = w.cumsum(1)
    out = (cdf <= (u * cdf[:, -1])[:, None]).sum(1).clamp_(max=w.shape[1] - 1)
    bad = w.gather(1, out[:, None])[:, 0] == 0  # u * total rounded onto a zero-weight edge
    if bad.any():
        cols = torch.arange(w.shape[1], device=w.device)
        out[bad] = torch.where(w[bad] > 0, cols, -1).max(1).values
    return out


def relabel(
    labels: torch.Tensor,
    index: torch.Tensor,
    step: int | torch.Tensor,
    *,
    prior: Sequence[float] | torch.Tensor,
    ratio: float,
    seed: int,
) -> torch.Tensor:
    """Random symmetric label noise (paper appendix E.4): with probability ``ratio`` per
    sample a new label from ``prior`` restricted to the other classes, else the label; a
    pure function of ``(seed, step, index)`` on tensors of any device."""
    labels = torch.as_tensor(labels)
    if ratio == 0 or labels.numel() == 0:
        return labels.clone()
    index = torch.as_tensor(index, device=labels.device)
    step = torch.as_tensor(step, dtype=torch.int64, device=labels.device)
    flip = uniform(seed, "relabel/flip", step, index) < ratio
    prior = torch.as_tensor(prior, dtype=torch.float64, device=labels.device)
    new = categorical(uniform(seed, "relabel/class", step, index), prior, exclude=labels)
    return torch.where(flip, new.to(labels.dtype), labels)
