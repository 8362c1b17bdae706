"""The CapsNet of Sabour et al. (2017): conv1 -> primary capsules -> routing capsules -> lengths (+ decoder)."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from capsjax import ops
from capsjax.fast.conv import conv_output_size
from capsjax.layers import Conv2D, Decoder, PrimaryCapsules, RoutingCapsules, check_kernels

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Every size of the network. The defaults are the paper's MNIST model (8,215,568 parameters)."""

    image_shape: tuple[int, int, int] = (28, 28, 1)  # H, W, C
    num_classes: int = 10
    conv1_channels: int = 256
    conv1_kernel: int = 9
    primary_maps: int = 32  # capsule types in the primary layer
    primary_dim: int = 8
    primary_kernel: int = 9
    primary_stride: int = 2
    class_dim: int = 16  # pose dimension of the class ("digit") capsules
    routing_iterations: int = 3
    routing_stop_gradient: bool = False
    routing_bias: bool = False  # the per-parent bias of the authors' released code (+ num_classes * class_dim params)
    routing_init_std: float = 0.1
    decoder_hidden: tuple[int, ...] = (512, 1024)
    use_decoder: bool = True
    kernels: str = "auto"  # "auto" | "fast" | "textbook": capsjax.fast or capsjax.ops (see capsjax.layers)
    conv_dtype: str = "float32"  # compute dtype of the two convolutions ("bfloat16" on accelerators); routing stays fp32

    def __post_init__(self):
        if len(self.image_shape) != 3 or min(self.image_shape) < 1:
            raise ValueError(f"image_shape must be (height, width, channels), got {self.image_shape}")
        if self.routing_iterations < 1:
            raise ValueError(f"routing_iterations must be >= 1, got {self.routing_iterations}")
        if self.conv_dtype not in _DTYPES:
            raise ValueError(f"conv_dtype must be one of {sorted(_DTYPES)}, got {self.conv_dtype!r}")
        check_kernels(self.kernels)  # "auto" is resolved in the layers: here it would start JAX's backend
        self.primary_grid  # raises if the convolution kernels do not fit the image

    @property
    def primary_grid(self) -> tuple[int, int]:
        """Spatial size of the primary-capsule grid (6 x 6 for MNIST)."""
        height, width, _ = self.image_shape
        return tuple(
            conv_output_size(conv_output_size(size, self.conv1_kernel, 1), self.primary_kernel, self.primary_stride)
            for size in (height, width)
        )

    @property
    def num_primary_capsules(self) -> int:
        """Number of primary capsules (1152 for MNIST)."""
        gh, gw = self.primary_grid
        return gh * gw * self.primary_maps


class CapsNetOutput(NamedTuple):
    """What :class:`CapsNet` returns."""

    capsules: jax.Array  # [B, num_classes, class_dim]
    lengths: jax.Array  # [B, num_classes], the class probabilities
    reconstructions: jax.Array | None  # [B, H, W, C] in [0, 1], None without decoder


class CapsNet(nnx.Module):
    """The three-layer CapsNet with its reconstruction decoder.

    Call with images ``[B, H, W, C]`` (float in ``[0, 1]``) and, in training, the integer labels ``[B]``: the decoder
    then reconstructs from the labelled capsule; without labels it uses the longest capsule (the prediction).
    """

    def __init__(self, config: ModelConfig = ModelConfig(), *, rngs: nnx.Rngs):
        self.config = config
        dtype = _DTYPES[config.conv_dtype]
        channels = config.image_shape[-1]
        self.conv1 = Conv2D(
            channels, config.conv1_channels, config.conv1_kernel, kernels=config.kernels, dtype=dtype, rngs=rngs
        )
        self.primary = PrimaryCapsules(
            config.conv1_channels,
            config.primary_maps,
            config.primary_dim,
            config.primary_kernel,
            config.primary_stride,
            kernels=config.kernels,
            dtype=dtype,
            rngs=rngs,
        )
        self.classes = RoutingCapsules(
            config.num_primary_capsules,
            config.primary_dim,
            config.num_classes,
            config.class_dim,
            num_iterations=config.routing_iterations,
            stop_gradient=config.routing_stop_gradient,
            use_bias=config.routing_bias,
            init_std=config.routing_init_std,
            kernels=config.kernels,
            rngs=rngs,
        )
        self.decoder = (
            Decoder(config.num_classes * config.class_dim, config.decoder_hidden, config.image_shape, rngs=rngs)
            if config.use_decoder
            else None
        )

    def encode(self, images: jax.Array) -> jax.Array:
        """Images ``[B, H, W, C]`` -> class capsules ``[B, num_classes, class_dim]``."""
        expected = tuple(self.config.image_shape)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"CapsNet expects images [batch, {', '.join(map(str, expected))}], got {images.shape}")
        x = jax.nn.relu(self.conv1(images.astype(jnp.float32)))
        return self.classes(self.primary(x))

    def __call__(self, images: jax.Array, labels: jax.Array | None = None) -> CapsNetOutput:
        capsules = self.encode(images)
        lengths = ops.safe_norm(capsules, axis=-1)
        reconstructions = None
        if self.decoder is not None:
            reconstructions = self.decoder(ops.mask_capsules(capsules, labels))
        return CapsNetOutput(capsules, lengths, reconstructions)


def count_params(model: nnx.Module) -> int:
    """Number of trainable scalars in ``model``."""
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
