"""Condition encoders and condition-embedding perturbations (CEP, paper Sec. 3)."""

from condnoise.conditioning.encoders import ClassEmbedder, cfg_drop
from condnoise.conditioning.perturb import (
    PERTURBATIONS,
    Perturbation,
    build_perturbation,
    perturbation_choices,
)

__all__ = [
    "PERTURBATIONS",
    "ClassEmbedder",
    "Perturbation",
    "build_perturbation",
    "cfg_drop",
    "perturbation_choices",
]
