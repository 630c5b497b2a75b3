"""condnoise: condition corruption and condition-embedding perturbation (CEP) for
conditional diffusion models, after Chen et al., "Slight Corruption in Pre-training Data
Makes Better Diffusion Models" (NeurIPS 2024)."""

__version__ = "0.1.0"
