"""Flax NNX modules that hold the parameters and call the pure functions of :mod:`capsjax.ops`."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from capsjax import ops
from capsjax.conv import check_conv_impl, conv2d


class Conv2D(nnx.Module):
    """VALID convolution with a bias and a switchable implementation (see :func:`capsjax.conv.conv2d`).

    ``dtype`` (e.g. ``jnp.bfloat16``) is the compute dtype of the product; parameters stay float32.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: int,
        stride: int = 1,
        *,
        impl: str = "auto",
        dtype=None,
        rngs: nnx.Rngs,
    ):
        check_conv_impl(impl)  # validate early
        init = nnx.initializers.lecun_normal()
        self.kernel = nnx.Param(init(rngs.params(), (kernel_size, kernel_size, in_features, out_features)))
        self.bias = nnx.Param(jnp.zeros((out_features,)))
        self.stride = stride
        self.impl = impl
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x`` [B, H, W, in_features] -> [B, oh, ow, out_features]."""
        kernel = self.kernel[...]
        if self.dtype is not None:
            x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        y = conv2d(x, kernel, self.stride, self.impl)
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
        impl: str = "auto",
        dtype=None,
        rngs: nnx.Rngs,
    ):
        self.conv = Conv2D(in_features, num_maps * capsule_dim, kernel_size, stride, impl=impl, dtype=dtype, rngs=rngs)
        self.num_maps = num_maps
        self.capsule_dim = capsule_dim

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.conv(x)  # [B, oh, ow, maps * d]
        batch, oh, ow, _ = y.shape
        return ops.squash(y.reshape(batch, oh * ow * self.num_maps, self.capsule_dim))


class RoutingCapsules(nnx.Module):
    """Fully connected capsule layer with routing by agreement.

    Holds ``W`` of shape ``[n_in, n_out, d_out, d_in]``; the predictions ``u_hat[b, i, j] = W[i, j] @ u[b, i]`` use
    ``W`` shared across the batch, never tiled. The layer computes them with
    :func:`capsjax.ops.parent_major_predictions`, so it is differentiable in reverse mode (``jax.grad``, ``jax.vjp``)
    but not in forward mode (``jax.jvp``); :meth:`predictions` (the plain batched product) supports both. ``use_bias``
    adds the per-parent bias of the authors' released code to ``s_j`` (not in the paper; off by default).
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
        rngs: nnx.Rngs,
    ):
        init = nnx.initializers.normal(stddev=init_std)
        self.W = nnx.Param(init(rngs.params(), (num_in, num_out, out_dim, in_dim)))
        self.bias = nnx.Param(jnp.zeros((num_out, out_dim))) if use_bias else None
        self.num_iterations = num_iterations
        self.stop_gradient = stop_gradient

    def _check_capsules(self, u: jax.Array) -> None:
        n_in, _, _, d_in = self.W.shape
        if u.ndim < 2 or u.shape[-2:] != (n_in, d_in):
            raise ValueError(f"RoutingCapsules expects capsules [B, {n_in}, {d_in}], got {u.shape}")

    def predictions(self, u: jax.Array) -> jax.Array:
        """``u`` [B, n_in, d_in] -> ``u_hat`` [B, n_in, n_out, d_out]."""
        self._check_capsules(u)
        return ops.capsule_predictions(self.W[...], u)

    def __call__(self, u: jax.Array, return_coupling: bool = False):
        """``u`` [B, n_in, d_in] -> ``v`` [B, n_out, d_out] (and the final coupling coefficients if asked)."""
        self._check_capsules(u)
        n_in, n_out, d_out, d_in = self.W.shape
        u_hat = ops.parent_major_predictions(self.W[...], u.reshape(-1, n_in, d_in))  # [B, n_out, n_in, d_out]
        # dynamic_routing takes [..., n_in, n_out, d] and works parent-major inside: the two swaps cancel in XLA.
        u_hat = jnp.swapaxes(u_hat, 1, 2).reshape(*u.shape[:-2], n_in, n_out, d_out)
        bias = None if self.bias is None else self.bias[...]
        return ops.dynamic_routing(u_hat, self.num_iterations, self.stop_gradient, return_coupling, bias)


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
