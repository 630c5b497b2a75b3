"""Condition encoders and condition-embedding perturbations (CEP, paper Sec. 3)."""

from condnoise.conditioning.embedding import CondEmbedding, pool_tokens, token_shift
from condnoise.conditioning.encoders import ClassEmbedder, cfg_drop
from condnoise.conditioning.noise import cep_delta, perturb_tokens
from condnoise.conditioning.perturb import (
    PERTURBATIONS,
    Perturbation,
    build_perturbation,
    perturbation_choices,
)

__all__ = [
    "PERTURBATIONS",
    "ClassEmbedder",
    "CondEmbedding",
    "Perturbation",
    "build_perturbation",
    "cep_delta",
    "cfg_drop",
    "perturb_tokens",
    "perturbation_choices",
    "pool_tokens",
    "token_shift",
]
