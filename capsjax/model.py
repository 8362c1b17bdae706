"""The models: the CapsNet of Sabour et al. (2017), the registry of architectures, and the contract they keep.

``ModelConfig.arch`` names the model; :data:`MODELS` maps each name to its builder and :func:`build_model` is the one
place a model is built (the train state, evaluation, figures, notebook and benchmarks all go through it). To add an
architecture: write its module (an ``nnx.Module`` keeping the contract below), add ``name: Class`` to
:data:`MODELS` and the name to :data:`capsjax.config.ARCHS` (a test keeps the two equal), and list the
``ModelConfig`` fields only it reads in :data:`capsjax.config.ARCH_FIELDS`.

The contract (what :mod:`capsjax.steps` and :mod:`capsjax.evaluate` call; nothing else is assumed):

- ``Model(config: ModelConfig, *, rngs: nnx.Rngs)`` builds it; its state is its parameters only (``nnx.Param``), so
  ``nnx.split`` gives the pytree that is trained and checkpointed.
- ``model(images, targets=None, *, key=None) -> output``: ``images`` float32 ``[B, H, W, C]`` in ``[0, 1]`` (the
  steps convert uint8 and augment first); ``targets`` as below, given in training (CapsNet masks its decoder with
  them) and None at evaluation and prediction; ``key`` a PRNG key in training only, for dropout or other
  randomness (the train step derives it from the per-step key ``fold_in(state.key, state.step)``, so a resumed run
  draws the same), None otherwise (deterministic). ``output`` is a ``NamedTuple`` of arrays with a leading batch
  axis (None for an absent part): it is what :func:`capsjax.evaluate.predict` returns.
- ``model.per_example_losses(output, images, targets, loss_config) -> dict[str, [B]]``: the loss terms per
  example, with the objective under ``"loss"``; the train step takes batch means, the eval step masked sums.
- ``model.class_scores(output) -> [B, K]``: higher is more likely; the argmax is the prediction (the top k for
  k-hot targets), for accuracy and the confusion matrix.
- ``targets``: int class ids ``[B]``, or k-hot float ``[B, K]`` (MultiMNIST: k = 2).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from flax import nnx

from capsjax import ops
from capsjax.baseline import BaselineCNN
from capsjax.config import LossConfig, ModelConfig
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

    def __call__(
        self, images: jax.Array, labels: jax.Array | None = None, *, key: jax.Array | None = None
    ) -> CapsNetOutput:
        """``labels`` (class ids [B] or k-hot [B, K]) mask the decoder; without them the longest capsule does.
        ``key`` is accepted for the model contract and not used (the CapsNet has no randomness)."""
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

    def per_example_losses(
        self, output: CapsNetOutput, images: jax.Array, targets: jax.Array, config: LossConfig
    ) -> dict[str, jax.Array]:
        """``margin_loss``, ``recon_loss`` (with a decoder) and their weighted sum ``loss``, each ``[B]``."""
        margin = ops.margin_loss(output.lengths, targets, config.m_plus, config.m_minus, config.lambda_)
        terms = {"margin_loss": margin}
        loss = margin
        if output.reconstructions is not None:
            recon = ops.reconstruction_loss(images, output.reconstructions, config.recon_reduction)
            terms["recon_loss"] = recon
            loss = loss + config.recon_weight * recon
        terms["loss"] = loss
        return terms

    def class_scores(self, output: CapsNetOutput) -> jax.Array:
        """The capsule lengths ``[B, num_classes]``."""
        return output.lengths


MODELS: dict[str, Callable[..., nnx.Module]] = {
    "capsnet": CapsNet,
    "cnn": BaselineCNN,
}
"""``ModelConfig.arch`` -> the model's builder, called as ``builder(config, rngs=rngs)``."""


def build_model(config: ModelConfig, *, rngs: nnx.Rngs) -> nnx.Module:
    """The model ``config.arch`` names (:data:`MODELS`), built with ``rngs``."""
    try:
        builder = MODELS[config.arch]
    except KeyError:
        raise ValueError(f"unknown model arch {config.arch!r}; choose one of: {', '.join(MODELS)}") from None
    return builder(config, rngs=rngs)


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
