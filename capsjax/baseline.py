"""The paper's baseline CNN (Sabour et al. 2017, section 5): three convolutions, two fully connected layers, dropout,
and a linear output layer whose logits the cross-entropy takes.

The paper: "three convolutional layers of 256, 256, 128 channels. Each has 5x5 kernels and stride of 1. The last
convolutional layers are followed by two fully connected layers of size 328, 192. The last fully connected layer is
connected with dropout to a 10 class softmax layer with cross entropy loss." With SAME padding and no pooling the
328-unit layer reads 28 x 28 x 128 values on MNIST, which gives the paper's 35.4M parameters (35,445,522). (The
authors' released baseline differs: two pooled convolutions and one 1024-unit layer.)

It follows the model contract of :mod:`capsjax.model`: int labels train a softmax cross-entropy, k-hot targets
(MultiMNIST's two digits) a per-class sigmoid cross-entropy summed over the classes; the class scores are the logits
(the top-k logits are a k-hot prediction).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from capsjax.config import LossConfig, ModelConfig
from capsjax.layers import Conv2D, check_images
from capsjax.precision import matmul


class CNNOutput(NamedTuple):
    """What :class:`BaselineCNN` returns."""

    logits: jax.Array  # [B, num_classes]


def dropout(key: jax.Array, x: jax.Array, rate: float) -> jax.Array:
    """Inverted dropout: each value zeroed with probability ``rate``, the others scaled by ``1 / (1 - rate)``."""
    if rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros((), x.dtype))


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Per example ``[B]``: softmax cross-entropy for int labels ``[B]``; for k-hot targets ``[B, K]`` the sum over
    the classes of the sigmoid (binary) cross-entropy, ``softplus(z) - t z`` (each class present or not)."""
    if targets.ndim == logits.ndim - 1:
        log_p = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.take_along_axis(log_p, targets.astype(jnp.int32)[..., None], axis=-1)[..., 0]
    if targets.shape != logits.shape:
        raise ValueError(f"targets {targets.shape} must be class ids [B] or k-hot [B, K] for logits {logits.shape}")
    return jnp.sum(jax.nn.softplus(logits) - targets.astype(logits.dtype) * logits, axis=-1)


class BaselineCNN(nnx.Module):
    """SAME convolutions (``cnn_channels``, ``cnn_kernel`` x ``cnn_kernel``, stride 1, ReLU) -> flatten -> fully
    connected ReLU layers (``cnn_hidden``) -> dropout (``cnn_dropout``, training only) -> linear logits
    ``[B, num_classes]``. Images ``[B, H, W, C]`` in ``[0, 1]``."""

    def __init__(self, config: ModelConfig = ModelConfig(arch="cnn"), *, rngs: nnx.Rngs):
        self.config = config
        height, width, channels = config.image_shape
        sizes = (channels, *config.cnn_channels)
        self.convs = nnx.List(
            [
                Conv2D(a, b, config.cnn_kernel, padding="SAME", kernels=config.kernels, precision=config.precision, rngs=rngs)
                for a, b in zip(sizes[:-1], sizes[1:])
            ]
        )
        widths = (height * width * config.cnn_channels[-1], *config.cnn_hidden)
        self.hidden = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(widths[:-1], widths[1:])])
        self.out = nnx.Linear(widths[-1], config.num_classes, rngs=rngs)
        self.deterministic = True  # NNX's model.train() sets it False: dropout then needs a key

    def __call__(
        self, images: jax.Array, targets: jax.Array | None = None, *, key: jax.Array | None = None
    ) -> CNNOutput:
        """``targets`` are not used (the contract passes them); ``key`` switches dropout on (training). After
        ``model.train()`` a ``key`` is required (NNX's training mode without one would silently skip dropout)."""
        if key is None and not self.deterministic:
            raise ValueError("BaselineCNN is in training mode (model.train()): pass key=... for its dropout, or call "
                             "model.eval()")  # fmt: skip
        check_images(images, self.config.image_shape, "BaselineCNN")
        x = images.astype(jnp.float32)
        for conv in self.convs:
            x = jax.nn.relu(conv(x))
        x = x.reshape(x.shape[0], math.prod(x.shape[1:]))
        for layer in self.hidden:  # the first, 100,352 x 328 on MNIST, holds nearly all the parameters
            x = jax.nn.relu(matmul(x, layer.kernel[...], self.config.precision) + layer.bias[...][None, :])
        if key is not None:
            x = dropout(key, x, self.config.cnn_dropout)
        return CNNOutput(self.out(x))

    def per_example_losses(
        self, output: CNNOutput, images: jax.Array, targets: jax.Array, config: LossConfig
    ) -> dict[str, jax.Array]:
        """``cross_entropy`` and ``loss`` (the same), each ``[B]`` (:func:`cross_entropy`)."""
        ce = cross_entropy(output.logits, targets)
        return {"cross_entropy": ce, "loss": ce}

    def class_scores(self, output: CNNOutput) -> jax.Array:
        """The logits ``[B, num_classes]``."""
        return output.logits
