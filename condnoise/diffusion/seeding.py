"""Per-sample seeds: sample i's noise and class depend only on (seed, i) (paper section 5).

Two models sampled with the same seed therefore get the same initial noise and class for
every index (paired comparisons), whatever the batch size, shard size or world size. The
seeds come from the project's one counter-based scheme, :mod:`condnoise.rng`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from condnoise import rng
from condnoise.errors import UserError

CLASS_MODES = ("balanced", "random")


def sample_seed(seed: int, index: int, stream: str = "noise") -> int:
    """A 63-bit seed for sample ``index`` of a run seeded ``seed`` (stream ``sample/{stream}``)."""
    return rng.derive_seed(seed, f"sample/{stream}", index)


def sample_generators(seed: int, indices: Sequence[int]) -> list[torch.Generator]:
    """One CPU ``torch.Generator`` per sample, seeded by :func:`sample_seed`."""
    return [torch.Generator().manual_seed(sample_seed(seed, int(i))) for i in indices]


def initial_noise(generators: Sequence[torch.Generator], shape: Sequence[int]) -> torch.Tensor:
    """x_T ~ N(0, I), float32 ``[len(generators), *shape]`` on CPU, row i from generator i.

    Drawn on CPU so the same seed gives the same noise on any device; DDPM then keeps
    drawing its ancestral noise from the same generators.
    """
    return torch.cat([torch.randn((1, *shape), generator=g) for g in generators])


def requested_labels(
    seed: int, indices: Sequence[int], num_classes: int, classes: str | Sequence[int] = "balanced"
) -> np.ndarray:
    """Requested class per sample index, int64.

    ``balanced``: index i gets class ``i % K`` (every class equally often for N a multiple of
    K); ``random``: uniform from :func:`condnoise.rng.uniform` (stream "sample/label"),
    independent of the noise; a sequence of class indices: index i gets ``classes[i % len(classes)]``.
    """
    idx = np.asarray(indices, dtype=np.int64)
    if isinstance(classes, str):
        if classes == "balanced":
            return idx % num_classes
        if classes == "random":
            u = rng.uniform(seed, "sample/label", idx)
            return (u * num_classes).floor().long().clamp_(max=num_classes - 1).numpy()
        raise UserError(f"unknown class mode {classes!r}; choose one of {', '.join(CLASS_MODES)}")
    chosen = np.asarray(list(classes), dtype=np.int64)
    if chosen.size == 0 or chosen.min() < 0 or chosen.max() >= num_classes:
        raise UserError(f"requested classes {chosen.tolist()} are not in [0, {num_classes - 1}]")
    return chosen[idx % chosen.size]


def parse_classes(text: str, class_names: Sequence[str]) -> str | list[int]:
    """``--classes`` value -> ``balanced`` / ``random`` or a list of class indices.

    A comma-separated list may mix class names (exact, or case-insensitive) and indices.
    """
    text = text.strip()
    if text in CLASS_MODES:
        return text
    out = [class_index(part, class_names) for part in text.split(",")]
    if not out:
        raise UserError("--classes is empty; use balanced, random or a list of class names")
    return out


def class_index(name: str, class_names: Sequence[str]) -> int:
    """A class given by name (exact or case-insensitive) or by index -> its index."""
    name = name.strip()
    if name in class_names:
        return list(class_names).index(name)
    lowered = [c.lower() for c in class_names]
    if name.lower() in lowered:
        return lowered.index(name.lower())
    if name.isdigit() and int(name) < len(class_names):
        return int(name)
    raise UserError(
        f"unknown class {name!r}; the run's classes are {', '.join(map(repr, class_names))} "
        f"(or an index 0..{len(class_names) - 1})"
    )
