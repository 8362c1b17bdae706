"""The CapsNet of Sabour et al. (2017): conv1 -> primary capsules -> routing capsules -> lengths (+ decoder)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from capsjax import ops
from capsjax.config import ModelConfig
from capsjax.layers import Conv2D, Decoder, PrimaryCapsules, RoutingCapsules
from capsjax.routing_layers import CapsuleLayer, PrimaryMatrixCapsules

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class CapsNetOutput(NamedTuple):
    """What :class:`CapsNet` returns."""

    capsules: jax.Array  # [B, num_classes, class_dim]
    lengths: jax.Array  # [B, num_classes], the class probabilities (the routing's activations, see ModelConfig.routing)
    reconstructions: jax.Array | None  # [B, H, W, C] in [0, 1], None without decoder


class CapsNet(nnx.Module):
    """The three-layer CapsNet with its reconstruction decoder.

    Call with images ``[B, H, W, C]`` (float in ``[0, 1]``) and, in training, the integer labels ``[B]``: the decoder
    then reconstructs from the labelled capsule; without labels it uses the predicted one (the longest capsule).

    ``config.routing`` chooses the class capsules' routing (:mod:`capsjax.routing`); every other layer stays the
    paper's, except that with ``"em"`` the primary capsules are pose matrices with activations
    (:class:`capsjax.routing_layers.PrimaryMatrixCapsules`). The class scores (``lengths``) are then the routing's
    activations (:mod:`capsjax.routing_layers`) and the prediction is the highest score.
    """

    def __init__(self, config: ModelConfig = ModelConfig(), *, rngs: nnx.Rngs):
        self.config = config
        dtype = _DTYPES[config.conv_dtype]
        channels = config.image_shape[-1]
        self.conv1 = Conv2D(
            channels, config.conv1_channels, config.conv1_kernel, kernels=config.kernels, dtype=dtype, rngs=rngs
        )
        if config.routing == "dynamic":  # the paper's model: parameters and CPU path unchanged by the routing switch
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
        else:
            primary_args = (config.conv1_channels, config.primary_maps)
            conv_args = dict(kernel_size=config.primary_kernel, stride=config.primary_stride, kernels=config.kernels)
            in_dim = config.class_dim if config.routing == "em" else config.primary_dim
            if config.routing == "em":
                self.primary = PrimaryMatrixCapsules(*primary_args, config.class_dim, **conv_args, dtype=dtype, rngs=rngs)
            else:
                self.primary = PrimaryCapsules(*primary_args, config.primary_dim, **conv_args, dtype=dtype, rngs=rngs)
            self.classes = CapsuleLayer(
                config.num_primary_capsules,
                in_dim,
                config.num_classes,
                config.class_dim,
                routing=config.routing,
                num_iterations=config.routing_iterations,
                init_std=config.routing_init_std,
                kernels=config.kernels,
                rngs=rngs,
            )
        self.decoder = (
            Decoder(config.num_classes * config.class_dim, config.decoder_hidden, config.image_shape, rngs=rngs)
            if config.use_decoder
            else None
        )

    def _check_images(self, images: jax.Array) -> None:
        expected = tuple(self.config.image_shape)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"CapsNet expects images [batch, {', '.join(map(str, expected))}], got {images.shape}")

    def _route(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Images -> class capsules ``[B, num_classes, class_dim]`` and class scores ``[B, num_classes]``."""
        self._check_images(images)
        x = jax.nn.relu(self.conv1(images.astype(jnp.float32)))
        if self.config.routing == "dynamic":
            capsules = self.classes(self.primary(x))
            return capsules, ops.safe_norm(capsules, axis=-1)
        primary = self.primary(x)
        out = self.classes(*primary) if self.config.routing == "em" else self.classes(primary)
        capsules = out.poses.reshape(*out.poses.shape[:2], -1)  # EM's p x p poses flattened
        return capsules, out.activations

    def encode(self, images: jax.Array) -> jax.Array:
        """Images ``[B, H, W, C]`` -> class capsules ``[B, num_classes, class_dim]``."""
        return self._route(images)[0]

    def __call__(self, images: jax.Array, labels: jax.Array | None = None) -> CapsNetOutput:
        capsules, lengths = self._route(images)
        reconstructions = None
        if self.decoder is not None:
            if labels is None and self.config.routing != "dynamic":
                labels = jnp.argmax(lengths, axis=-1)  # the predicted class (for dynamic routing, the longest capsule)
            reconstructions = self.decoder(ops.mask_capsules(capsules, labels))
        return CapsNetOutput(capsules, lengths, reconstructions)


def count_params(model: nnx.Module) -> int:
    """Number of trainable scalars in ``model``."""
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
