"""Efficient-CapsNet (Mazzia, Salvetti & Chiaberge, *Efficient-CapsNet: Capsule Network with Self-Attention Routing*,
Scientific Reports 2021; arXiv:2101.12491): a convolutional stem, depthwise primary capsules, self-attention routing.

The MNIST model of the paper and of the authors' released code, with its 161,824 trainable parameters (162,400 with
Batch Normalization's running statistics; the reconstruction decoder adds 1,411,344)::

    conv 5x5, 32, ReLU, BN -> conv 3x3, 64, ReLU, BN -> conv 3x3, 64, ReLU, BN -> conv 3x3 stride 2, 128, ReLU, BN
      (28 -> 24 -> 22 -> 20 -> 9; VALID padding)
    primary capsules: a depthwise convolution whose kernel covers the whole 9x9 map (one 9x9 filter and a bias per
      channel), the 128 outputs grouped into 16 capsules of 8 dimensions, squashed with (1 - e^-|s|) s / |s|
    class capsules: 10 x 16-D by self-attention routing (capsjax.routing.self_attention; W [16, 10, 16, 8] and log
      priors [16, 10])
    class scores: the capsules' lengths; decoder 512-1024-784 (ReLU, ReLU, sigmoid) on the masked capsules.

Trained with the margin loss (m+ 0.9, m- 0.1, lambda 0.5) plus 0.392 x the mean squared reconstruction error, which
is capsjax's 0.0005 x the summed squared error on 784 pixels.

Differences from the released code: Keras initialises the convolutions and ``W`` with a truncated He normal, here an
untruncated one of the same standard deviation; the decoder uses the Flax default initialiser.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from capsjax import ops, routing
from capsjax.config import ModelConfig, conv_output_size
from capsjax.layers import Conv2D, Decoder, check_images
from capsjax.model import CapsNet, CapsNetOutput
from capsjax.routing_layers import CapsuleLayer



def stem_output_size(size: int, kernels: tuple[int, ...], strides: tuple[int, ...]) -> int:
    """Spatial size after the stem's VALID convolutions; raises if a kernel does not fit."""
    for kernel, stride in zip(kernels, strides):
        size = conv_output_size(size, kernel, stride)
    return size


class DepthwisePrimaryCapsules(nnx.Module):
    """Efficient-CapsNet's primary capsules: one depthwise filter per channel covering the whole ``[h, w]`` map (a
    VALID depthwise convolution with a single output position), the channels grouped into capsules and squashed.

    Input ``[B, h, w, C]``; output ``[B, C / capsule_dim, capsule_dim]``.
    """

    def __init__(self, height: int, width: int, channels: int, capsule_dim: int, *, rngs: nnx.Rngs):
        if channels % capsule_dim:
            raise ValueError(f"the stem's {channels} channels do not divide into capsules of {capsule_dim} dimensions")
        # Keras's default (Glorot uniform) for its kernel [h, w, 1, C]: fan_in h*w, fan_out h*w*C
        kernel = nnx.initializers.glorot_uniform()(rngs.params(), (height, width, 1, channels))
        self.kernel = nnx.Param(kernel.reshape(height, width, channels))
        self.bias = nnx.Param(jnp.zeros((channels,)))
        self.capsule_dim = capsule_dim

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.einsum("bhwc,hwc->bc", x, self.kernel[...].astype(x.dtype)).astype(jnp.float32)
        y = y + jnp.broadcast_to(self.bias[...], y.shape)
        return routing.exp_squash(y.reshape(y.shape[0], y.shape[1] // self.capsule_dim, self.capsule_dim))


class EfficientCapsNet(nnx.Module):
    """Efficient-CapsNet (module docstring) for ``config.arch == "efficient_capsnet"``; the defaults are the paper's
    MNIST model. It reads ``image_shape``, ``num_classes``, ``effcaps_stem_*``, ``primary_dim``, ``class_dim``,
    ``decoder_hidden``, ``use_decoder``, ``kernels`` and ``precision`` (the stem's convolutions; the small decoder
    stays float32).

    Keeps the model contract of :mod:`capsjax.model`, with one addition: Batch Normalization's running statistics are
    ``nnx.BatchStat`` variables beside the parameters. Called with a ``key`` (training), or after ``model.train()``
    (NNX's training mode), it normalises with the batch's statistics and updates the running ones; otherwise
    (evaluation, prediction; ``model.eval()``) it uses the running statistics.
    Returns a :class:`capsjax.model.CapsNetOutput`; the loss and the class scores are CapsNet's.
    """

    def __init__(self, config: ModelConfig = ModelConfig(arch="efficient_capsnet"), *, rngs: nnx.Rngs):
        height, width, channels = config.image_shape
        self.config = config
        he_normal = nnx.initializers.variance_scaling(2.0, "fan_in", "normal")
        convs, norms = [], []
        stem = zip(config.effcaps_stem_channels, config.effcaps_stem_kernels, config.effcaps_stem_strides)
        for out, kernel, stride in stem:
            conv = Conv2D(channels, out, kernel, stride, kernels=config.kernels, precision=config.precision,
                          rngs=rngs)  # fmt: skip
            conv.kernel = nnx.Param(he_normal(rngs.params(), conv.kernel.shape))  # Keras's he_normal
            convs.append(conv)
            # Keras's defaults; evaluation mode unless model.train() (or a key) says otherwise
            norms.append(nnx.BatchNorm(out, momentum=0.99, epsilon=1e-3, use_running_average=True, rngs=rngs))
            channels = out
        self.convs, self.norms = nnx.List(convs), nnx.List(norms)
        sizes = [stem_output_size(s, config.effcaps_stem_kernels, config.effcaps_stem_strides) for s in (height, width)]
        self.primary = DepthwisePrimaryCapsules(*sizes, channels, config.primary_dim, rngs=rngs)
        num_primary, num_classes = channels // config.primary_dim, config.num_classes
        init_std = math.sqrt(2.0 / (num_classes * num_primary * config.primary_dim))  # Keras's he_normal of W
        self.classes = CapsuleLayer(num_primary, config.primary_dim, num_classes, config.class_dim,
                                    routing="self_attention", init_std=init_std, kernels=config.kernels,
                                    rngs=rngs)  # fmt: skip
        self.decoder = (
            Decoder(num_classes * config.class_dim, config.decoder_hidden, config.image_shape, rngs=rngs)
            if config.use_decoder
            else None
        )

    def __call__(
        self, images: jax.Array, targets: jax.Array | None = None, *, key: jax.Array | None = None
    ) -> CapsNetOutput:
        """``targets`` (class ids [B] or k-hot [B, K]) mask the decoder; without them the longest capsule does. A
        ``key`` (training; it draws nothing from it) or ``model.train()`` switches Batch Normalization to the batch's
        statistics. One reconstruction per image, ``[B, H, W, C]``, whatever ``num_targets``."""
        check_images(images, self.config.image_shape, "EfficientCapsNet")
        x = images.astype(jnp.float32)
        for conv, norm in zip(self.convs, self.norms):  # (an empty batch has no statistics: it would store NaN)
            running = (key is None and norm.use_running_average) or images.shape[0] == 0
            x = norm(jax.nn.relu(conv(x)), use_running_average=running)
        out = self.classes(self.primary(x))
        reconstructions = None
        if self.decoder is not None:
            reconstructions = self.decoder(ops.mask_capsules(out.poses, targets))
        return CapsNetOutput(out.poses, out.activations, reconstructions)

    # The margin loss + reconstruction and the lengths as class scores, exactly as CapsNet's (they use no state).
    per_example_losses = CapsNet.per_example_losses
    class_scores = CapsNet.class_scores
