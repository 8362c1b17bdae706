"""Flax NNX modules that hold the parameters and call the pure functions of :mod:`capsjax.ops`.

One switch, ``kernels``, chooses how the convolutions and the routing layer compute (:data:`capsjax.config.KERNELS`):
``"textbook"`` uses XLA's native convolution, :func:`capsjax.ops.capsule_predictions` and
:func:`capsjax.ops.dynamic_routing`; ``"fast"`` uses their XLA:CPU-tuned equivalents in :mod:`capsjax.fast` (the same
values and gradients, tested); ``"auto"`` (the default) means ``"fast"`` on the CPU backend and ``"textbook"`` on any
other. ``"auto"`` is resolved when a layer runs, not when it is built, so building a model or a config does not start
JAX's backend.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from capsjax import fast, ops
from capsjax.config import check_kernels
from capsjax.precision import compute_dtype, matmul


def check_images(images: jax.Array, image_shape, model: str) -> None:
    """Raises a one-line error unless ``images`` are a batch ``[B, *image_shape]`` of floats (the models take pixels in
    [0, 1]; uint8 images read as 0..255 would train and score without a word, but wrongly)."""
    expected = tuple(image_shape)
    if images.ndim != 4 or tuple(images.shape[1:]) != expected:
        raise ValueError(f"{model} expects images [batch, {', '.join(map(str, expected))}], got {images.shape}")
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise TypeError(
            f"{model} expects float images in [0, 1], got {images.dtype}: divide uint8 images by 255 "
            "(capsjax.evaluate.predict does)"
        )


def resolve_kernels(kernels: str) -> str:
    """``"fast"`` or ``"textbook"``: ``"auto"`` is ``"fast"`` on the CPU backend and ``"textbook"`` on any other."""
    check_kernels(kernels)
    if kernels == "auto":
        return "fast" if jax.default_backend() == "cpu" else "textbook"
    return kernels


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """The zeros added before and after an axis of ``size`` so that a convolution keeps ``ceil(size / stride)``
    outputs (TensorFlow's and XLA's "SAME": the odd one goes after)."""
    total = max((-(-size // stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class Conv2D(nnx.Module):
    """Convolution with a bias: XLA's native convolution, or :func:`capsjax.fast.conv2d` (``kernels``).

    ``padding`` is "VALID" (the CapsNet's) or "SAME" (zeros around the input, then the VALID product: the fast form
    is VALID only). ``precision`` (:mod:`capsjax.precision`): ``"float32"``, or ``"mixed"`` for bfloat16 operands in
    the products; parameters and the result stay float32.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: int,
        stride: int = 1,
        *,
        padding: str = "VALID",
        kernels: str = "auto",
        precision: str = "float32",
        rngs: nnx.Rngs,
    ):
        check_kernels(kernels)  # validate early
        compute_dtype(precision)
        if padding not in ("VALID", "SAME"):
            raise ValueError(f"padding must be 'VALID' or 'SAME', got {padding!r}")
        init = nnx.initializers.lecun_normal()
        self.kernel = nnx.Param(init(rngs.params(), (kernel_size, kernel_size, in_features, out_features)))
        self.bias = nnx.Param(jnp.zeros((out_features,)))
        self.stride = stride
        self.padding = padding
        self.kernels = kernels
        self.precision = precision

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x`` [B, H, W, in_features] -> [B, oh, ow, out_features]."""
        kernel, dtype = self.kernel[...], compute_dtype(self.precision)
        if jnp.ndim(x) != 4 or x.shape[-1] != kernel.shape[2]:
            raise ValueError(f"Conv2D expects inputs [B, H, W, {kernel.shape[2]}] (NHWC), got {jnp.shape(x)}")
        if self.padding == "SAME":
            kh, kw = kernel.shape[:2]
            pads = (same_padding(x.shape[1], kh, self.stride), same_padding(x.shape[2], kw, self.stride))
            x = jnp.pad(x, ((0, 0), *pads, (0, 0)))
        if resolve_kernels(self.kernels) == "fast":
            # bfloat16 operands, float32 accumulation and result, forward and backward
            y = fast.conv2d(x, kernel, self.stride, compute_dtype=dtype)
        else:
            if dtype is not None:  # XLA's native convolution accumulates bfloat16 in float32 on GPU/TPU
                x, kernel = x.astype(dtype), kernel.astype(dtype)
            strides = (self.stride, self.stride)
            y = lax.conv_general_dilated(x, kernel, strides, "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y.astype(jnp.float32) + self.bias[...][None, None, None, :]


class PrimaryCapsules(nnx.Module):
    """Convolutional capsules: a convolution whose channels are ``num_maps`` capsule types of ``capsule_dim``
    dimensions, reshaped to a list of capsules and squashed.

    Input ``[B, H, W, in_features]``; output ``[B, oh * ow * num_maps, capsule_dim]``.
    """

    def __init__(
        self,
        in_features: int,
        num_maps: int = 32,
        capsule_dim: int = 8,
        kernel_size: int = 9,
        stride: int = 2,
        *,
        kernels: str = "auto",
        precision: str = "float32",
        rngs: nnx.Rngs,
    ):
        self.conv = Conv2D(
            in_features, num_maps * capsule_dim, kernel_size, stride, kernels=kernels, precision=precision, rngs=rngs
        )
        self.num_maps = num_maps
        self.capsule_dim = capsule_dim

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.conv(x)  # [B, oh, ow, maps * d]
        batch, oh, ow, _ = y.shape
        return ops.squash(y.reshape(batch, oh * ow * self.num_maps, self.capsule_dim))


class RoutingCapsules(nnx.Module):
    """Fully connected capsule layer with routing by agreement.

    Holds ``W`` of shape ``[n_in, n_out, d_out, d_in]``; the predictions ``u_hat[..., i, j] = W[i, j] @ u[..., i]``
    use ``W`` shared across the batch, never tiled. ``kernels`` (:data:`capsjax.config.KERNELS`) chooses
    :func:`capsjax.ops.capsule_predictions` + :func:`capsjax.ops.dynamic_routing` or their parent-major equivalents
    in :mod:`capsjax.fast.routing`; the fast form is differentiable in reverse mode (``jax.grad``, ``jax.vjp``) but
    not in forward mode (``jax.jvp``). ``use_bias`` adds the per-parent bias of the authors' released code to ``s_j``
    (not in the paper; off by default).
    """

    def __init__(
        self,
        num_in: int,
        in_dim: int,
        num_out: int,
        out_dim: int,
        *,
        num_iterations: int = 3,
        stop_gradient: bool = False,
        use_bias: bool = False,
        init_std: float = 0.1,
        kernels: str = "auto",
        rngs: nnx.Rngs,
    ):
        check_kernels(kernels)
        init = nnx.initializers.normal(stddev=init_std)
        self.W = nnx.Param(init(rngs.params(), (num_in, num_out, out_dim, in_dim)))
        self.bias = nnx.Param(jnp.zeros((num_out, out_dim))) if use_bias else None
        self.num_iterations = num_iterations
        self.stop_gradient = stop_gradient
        self.kernels = kernels

    def _check_capsules(self, u: jax.Array) -> None:
        n_in, _, _, d_in = self.W.shape
        if u.ndim < 2 or u.shape[-2:] != (n_in, d_in):
            raise ValueError(f"RoutingCapsules expects capsules [B, {n_in}, {d_in}], got {u.shape}")

    def predictions(self, u: jax.Array) -> jax.Array:
        """``u`` [..., n_in, d_in] -> ``u_hat`` [..., n_in, n_out, d_out] (:func:`capsjax.ops.capsule_predictions`)."""
        self._check_capsules(u)
        return ops.capsule_predictions(self.W[...], u)

    def __call__(self, u: jax.Array, return_coupling: bool = False):
        """``u`` [..., n_in, d_in] -> ``v`` [..., n_out, d_out] (and the final coupling coefficients
        [..., n_in, n_out] if asked)."""
        self._check_capsules(u)
        routing_args = (self.num_iterations, self.stop_gradient, return_coupling)
        bias = None if self.bias is None else self.bias[...]
        if resolve_kernels(self.kernels) == "textbook":
            return ops.dynamic_routing(self.predictions(u), *routing_args, bias=bias)
        n_in, n_out, d_out, d_in = self.W.shape
        u_hat = fast.parent_major_predictions(self.W[...], u.reshape(-1, n_in, d_in))  # [B, n_out, n_in, d_out]
        u_hat = u_hat.reshape(*u.shape[:-2], n_out, n_in, d_out)
        return fast.parent_major_routing(u_hat, *routing_args, bias=bias)


class Decoder(nnx.Module):
    """Reconstruction network: masked capsules ``[B, n_out, d]`` -> MLP (ReLU hidden layers, sigmoid output) ->
    images ``[B, *image_shape]`` in ``[0, 1]``. ``precision`` as in :class:`Conv2D`."""

    def __init__(
        self,
        in_features: int,
        hidden: tuple[int, ...],
        image_shape: tuple[int, ...],
        *,
        precision: str = "float32",
        rngs: nnx.Rngs,
    ):
        compute_dtype(precision)  # validate early
        sizes = (in_features, *hidden)
        self.hidden = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])])
        self.out = nnx.Linear(sizes[-1], math.prod(image_shape), rngs=rngs)
        self.image_shape = tuple(image_shape)
        self.precision = precision

    def _dense(self, layer: nnx.Linear, x: jax.Array) -> jax.Array:
        return matmul(x, layer.kernel[...], self.precision) + layer.bias[...][None, :]

    def __call__(self, capsules: jax.Array) -> jax.Array:
        width = (self.hidden[0] if self.hidden else self.out).in_features
        if jnp.ndim(capsules) < 2 or math.prod(capsules.shape[1:]) != width:
            raise ValueError(f"Decoder expects masked capsules [B, n_out, d] with n_out * d = {width}, got "
                             f"{jnp.shape(capsules)}")  # fmt: skip
        x = capsules.reshape(capsules.shape[0], math.prod(capsules.shape[1:]))  # (not -1: an empty batch has no -1)
        for layer in self.hidden:
            x = jax.nn.relu(self._dense(layer, x))
        return jax.nn.sigmoid(self._dense(self.out, x)).reshape(x.shape[0], *self.image_shape)
