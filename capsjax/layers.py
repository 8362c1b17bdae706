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
    is VALID only). ``dtype`` (e.g. ``jnp.bfloat16``) is the compute dtype of the product; parameters stay float32.
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
        dtype=None,
        rngs: nnx.Rngs,
    ):
        check_kernels(kernels)  # validate early
        if padding not in ("VALID", "SAME"):
            raise ValueError(f"padding must be 'VALID' or 'SAME', got {padding!r}")
        init = nnx.initializers.lecun_normal()
        self.kernel = nnx.Param(init(rngs.params(), (kernel_size, kernel_size, in_features, out_features)))
        self.bias = nnx.Param(jnp.zeros((out_features,)))
        self.stride = stride
        self.padding = padding
        self.kernels = kernels
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x`` [B, H, W, in_features] -> [B, oh, ow, out_features]."""
        kernel = self.kernel[...]
        if self.dtype is not None:
            x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        if self.padding == "SAME":
            kh, kw = kernel.shape[:2]
            pads = (same_padding(x.shape[1], kh, self.stride), same_padding(x.shape[2], kw, self.stride))
            x = jnp.pad(x, ((0, 0), *pads, (0, 0)))
        if resolve_kernels(self.kernels) == "fast":
            y = fast.conv2d(x, kernel, self.stride)
        else:
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
        dtype=None,
        rngs: nnx.Rngs,
    ):
        self.conv = Conv2D(
            in_features, num_maps * capsule_dim, kernel_size, stride, kernels=kernels, dtype=dtype, rngs=rngs
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
    images ``[B, *image_shape]`` in ``[0, 1]``."""

    def __init__(self, in_features: int, hidden: tuple[int, ...], image_shape: tuple[int, ...], *, rngs: nnx.Rngs):
        sizes = (in_features, *hidden)
        self.hidden = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])])
        self.out = nnx.Linear(sizes[-1], math.prod(image_shape), rngs=rngs)
        self.image_shape = tuple(image_shape)

    def __call__(self, capsules: jax.Array) -> jax.Array:
        x = capsules.reshape(capsules.shape[0], -1)
        for layer in self.hidden:
            x = jax.nn.relu(layer(x))
        return jax.nn.sigmoid(self.out(x)).reshape(x.shape[0], *self.image_shape)
