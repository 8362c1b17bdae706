"""The CapsNet of Sabour et al. (2017): conv1 -> primary capsules -> routing capsules -> lengths (+ decoder)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from capsjax import ops
from capsjax.config import ModelConfig
from capsjax.layers import Conv2D, Decoder, PrimaryCapsules, RoutingCapsules


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
        precision = config.precision
        channels = config.image_shape[-1]
        self.conv1 = Conv2D(
            channels, config.conv1_channels, config.conv1_kernel, kernels=config.kernels, precision=precision, rngs=rngs
        )
        self.primary = PrimaryCapsules(
            config.conv1_channels,
            config.primary_maps,
            config.primary_dim,
            config.primary_kernel,
            config.primary_stride,
            kernels=config.kernels,
            precision=precision,
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
            Decoder(
                config.num_classes * config.class_dim,
                config.decoder_hidden,
                config.image_shape,
                precision=precision,
                rngs=rngs,
            )
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
