"""capsjax: Capsule Networks (Sabour, Frosst & Hinton, 2017) in JAX and Flax."""

from capsjax.conv import conv2d, extract_patches
from capsjax.layers import Conv2D, Decoder, PrimaryCapsules, RoutingCapsules
from capsjax.model import CapsNet, CapsNetOutput, ModelConfig, count_params
from capsjax.ops import dynamic_routing, margin_loss, mask_capsules, reconstruction_loss, safe_norm, squash

__version__ = "0.1.0"

__all__ = [
    "safe_norm",
    "squash",
    "dynamic_routing",
    "margin_loss",
    "reconstruction_loss",
    "mask_capsules",
    "conv2d",
    "extract_patches",
    "Conv2D",
    "PrimaryCapsules",
    "RoutingCapsules",
    "Decoder",
    "CapsNet",
    "CapsNetOutput",
    "ModelConfig",
    "count_params",
]
