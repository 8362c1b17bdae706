"""The CapsNet of Sabour et al. (2017): conv1 -> primary capsules -> routing capsules -> lengths (+ decoder)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from flax import nnx

from capsjax import ops
from capsjax.config import ModelConfig
from capsjax.layers import Conv2D, Decoder, PrimaryCapsules, RoutingCapsules

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class CapsNetOutput(NamedTuple):
    """What :class:`CapsNet` returns."""

    capsules: jax.Array  # [B, num_classes, class_dim]
    lengths: jax.Array  # [B, num_classes], the class probabilities
    reconstructions: jax.Array | None  # [B, H, W, C] in [0, 1] ([B, k, H, W, C] for k targets), None without decoder


class CapsNet(nnx.Module):
    """The three-layer CapsNet with its reconstruction decoder.

    Call with images ``[B, H, W, C]`` (float in ``[0, 1]``) and, in training, the integer labels ``[B]``: the decoder
    then reconstructs from the labelled capsule; without labels it uses the longest capsule (the prediction). With
    ``config.num_targets = k > 1`` (MultiMNIST) the labels are k-hot ``[B, K]`` and the decoder runs once per object
    (:func:`reconstruct_each`): from each labelled capsule in training, from each of the k longest at inference.
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
            k = self.config.num_targets
            if k == 1:
                reconstructions = self.decoder(ops.mask_capsules(capsules, labels))
            else:
                reconstructions = reconstruct_each(self.decoder, capsules, lengths if labels is None else labels, k)
        return CapsNetOutput(capsules, lengths, reconstructions)


def reconstruct_each(decoder: Decoder, capsules: jax.Array, scores: jax.Array, k: int) -> jax.Array:
    """One reconstruction per object of a k-object image (MultiMNIST), with the one shared ``decoder``.

    The ``k`` classes with the highest ``scores`` ``[B, K]`` (k-hot targets in training, the capsule lengths at
    inference) are taken in ascending class order; reconstruction ``j`` is decoded from the capsules masked to
    keep the ``j``-th of them only. Returns ``[B, k, H, W, C]``.
    """
    classes = jnp.sort(lax.top_k(scores, k)[1], axis=-1)  # [B, k]
    b, n, d = capsules.shape
    masked = capsules[:, None] * jax.nn.one_hot(classes, n, dtype=capsules.dtype)[..., None]  # [B, k, K, D]
    images = decoder(masked.reshape(b * k, n, d))
    return images.reshape(b, k, *images.shape[1:])


def count_params(model: nnx.Module) -> int:
    """Number of trainable scalars in ``model``."""
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
