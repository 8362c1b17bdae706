"""The models: the CapsNet of Sabour et al. (2017), the registry of architectures, and the contract they keep.

``ModelConfig.arch`` names the model; :data:`MODELS` maps each name to its builder and :func:`build_model` is the one
place a model is built (the train state, evaluation, figures, notebook and benchmarks all go through it). To add an
architecture: write its module (an ``nnx.Module`` keeping the contract below), add ``name: builder`` to
:data:`MODELS` and the name to :data:`capsjax.config.ARCHS` (a test keeps the two equal), and list the
``ModelConfig`` fields only it reads in :data:`capsjax.config.ARCH_FIELDS`.

The contract (what :mod:`capsjax.steps` and :mod:`capsjax.evaluate` call; nothing else is assumed):

- ``Model(config: ModelConfig, *, rngs: nnx.Rngs)`` builds it; its state is its parameters (``nnx.Param``) and,
  optionally, running statistics (``nnx.BatchStat``, e.g. Batch Normalization's) that a training call updates and
  an evaluation call reads; ``nnx.split`` gives the pytree that is checkpointed. The train step differentiates the
  whole state (statistics get zero gradients) and then takes the statistics the forward pass left in the model.
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

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from flax import nnx

from capsjax import ops
from capsjax.baseline import BaselineCNN
from capsjax.config import LossConfig, ModelConfig
from capsjax.layers import Conv2D, Decoder, PrimaryCapsules, RoutingCapsules, check_images
from capsjax.routing_layers import CapsuleLayer, PrimaryMatrixCapsules


class CapsNetOutput(NamedTuple):
    """What :class:`CapsNet` returns."""

    capsules: jax.Array  # [B, num_classes, class_dim]
    lengths: jax.Array  # [B, num_classes], the class probabilities (the routing's activations, see ModelConfig.routing)
    reconstructions: jax.Array | None  # [B, H, W, C] in [0, 1] ([B, k, H, W, C] for k targets), None without decoder


class CapsNet(nnx.Module):
    """The three-layer CapsNet with its reconstruction decoder.

    Call with images ``[B, H, W, C]`` (float in ``[0, 1]``) and, in training, the integer labels ``[B]``: the decoder
    then reconstructs from the labelled capsule; without labels it uses the predicted one (the longest capsule). With
    ``config.num_targets = k > 1`` (MultiMNIST) the labels are k-hot ``[B, K]`` and the decoder runs once per object
    (:func:`reconstruct_each`): from each labelled capsule in training, from each of the k highest-scoring at
    inference.

    ``config.routing`` chooses the class capsules' routing (:mod:`capsjax.routing`); every other layer stays the
    paper's, except that with ``"em"`` the primary capsules are pose matrices with activations
    (:class:`capsjax.routing_layers.PrimaryMatrixCapsules`). The class scores (``lengths``) are then the routing's
    activations (:mod:`capsjax.routing_layers`) and the prediction is the highest score.
    """

    def __init__(self, config: ModelConfig = ModelConfig(), *, rngs: nnx.Rngs):
        self.config = config
        precision = config.precision
        channels = config.image_shape[-1]
        self.conv1 = Conv2D(
            channels, config.conv1_channels, config.conv1_kernel, kernels=config.kernels, precision=precision, rngs=rngs
        )
        if config.routing == "dynamic":  # the paper's model: parameters and CPU path unchanged by the routing switch
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
        else:
            primary_args = (config.conv1_channels, config.primary_maps)
            conv_args = dict(
                kernel_size=config.primary_kernel, stride=config.primary_stride, kernels=config.kernels, precision=precision
            )
            in_dim = config.class_dim if config.routing == "em" else config.primary_dim
            if config.routing == "em":
                self.primary = PrimaryMatrixCapsules(*primary_args, config.class_dim, **conv_args, rngs=rngs)
            else:
                self.primary = PrimaryCapsules(*primary_args, config.primary_dim, **conv_args, rngs=rngs)
            self.classes = CapsuleLayer(
                config.num_primary_capsules,
                in_dim,
                config.num_classes,
                config.class_dim,
                routing=config.routing,
                num_iterations=config.routing_iterations,
                init_std=config.routing_init_std,
                em_inverse_temperature=config.routing_em_inverse_temperature,
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

    def _route(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Images -> class capsules ``[B, num_classes, class_dim]`` and class scores ``[B, num_classes]``."""
        check_images(images, self.config.image_shape, "CapsNet")
        x = jax.nn.relu(self.conv1(images.astype(jnp.float32)))
        if self.config.routing == "dynamic":
            capsules = self.classes(self.primary(x))
            return capsules, ops.safe_norm(capsules, axis=-1)
        primary = self.primary(x)
        out = self.classes(*primary) if self.config.routing == "em" else self.classes(primary)
        capsules = out.poses.reshape(*out.poses.shape[:2], math.prod(out.poses.shape[2:]))  # EM's p x p poses flat
        return capsules, out.activations

    def encode(self, images: jax.Array) -> jax.Array:
        """Images ``[B, H, W, C]`` -> class capsules ``[B, num_classes, class_dim]``."""
        return self._route(images)[0]

    def __call__(
        self, images: jax.Array, labels: jax.Array | None = None, *, key: jax.Array | None = None
    ) -> CapsNetOutput:
        """``labels`` (class ids [B] or k-hot [B, K]; k-hot only with ``num_targets > 1``) mask the decoder; without
        them the predicted capsule does (the longest, or the highest score). ``key`` is accepted for the model contract
        and not used (no randomness)."""
        capsules, lengths = self._route(images)
        reconstructions = None
        if self.decoder is not None:
            k = self.config.num_targets
            if k == 1:
                if labels is None and self.config.routing != "dynamic":
                    labels = jnp.argmax(lengths, axis=-1)  # the predicted class (dynamic routing: the longest capsule)
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


def _efficient_capsnet(config: ModelConfig, *, rngs: nnx.Rngs) -> nnx.Module:
    from capsjax.efficient_capsnet import EfficientCapsNet  # imports this module (CapsNetOutput)

    return EfficientCapsNet(config, rngs=rngs)


MODELS: dict[str, Callable[..., nnx.Module]] = {
    "capsnet": CapsNet,
    "cnn": BaselineCNN,
    "efficient_capsnet": _efficient_capsnet,
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
    if jnp.shape(scores) != capsules.shape[:2]:  # class ids would be read as scores: the wrong classes, no error
        raise ValueError(
            f"with num_targets={k}, labels must be k-hot [B, num_classes] = {list(capsules.shape[:2])}, got shape "
            f"{list(jnp.shape(scores))} (class ids [B, {k}]: jax.nn.one_hot(ids, num_classes).sum(axis=-2))"
        )
    classes = jnp.sort(lax.top_k(scores, k)[1], axis=-1)  # [B, k]
    b, n, d = capsules.shape
    masked = capsules[:, None] * jax.nn.one_hot(classes, n, dtype=capsules.dtype)[..., None]  # [B, k, K, D]
    images = decoder(masked.reshape(b * k, n, d))
    return images.reshape(b, k, *images.shape[1:])


def count_params(model: nnx.Module) -> int:
    """Number of trainable scalars in ``model``."""
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
