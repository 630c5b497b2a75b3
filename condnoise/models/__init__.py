"""Denoisers (own DiT, diffusers U-Nets), autoencoders and the conditional model (paper Sec. 4)."""

from condnoise.models.autoencoder import (
    DiffusersAutoencoder,
    IdentityAutoencoder,
    build_autoencoder,
)
from condnoise.models.conditional import ConditionalDiffusionModel, build_model
from condnoise.models.config import (
    FAMILIES,
    AutoencoderConfig,
    ConvUNetConfig,
    DiTConfig,
    ModelConfig,
    UNetConfig,
    model_choices,
    resolve_model_config,
)
from condnoise.models.conv_unet import ConvUNet
from condnoise.models.dit import DiT
from condnoise.models.unet import UNet

__all__ = [
    "FAMILIES",
    "AutoencoderConfig",
    "ConditionalDiffusionModel",
    "ConvUNet",
    "ConvUNetConfig",
    "DiTConfig",
    "ModelConfig",
    "UNetConfig",
    "DiT",
    "DiffusersAutoencoder",
    "IdentityAutoencoder",
    "UNet",
    "build_autoencoder",
    "build_model",
    "model_choices",
    "resolve_model_config",
]
