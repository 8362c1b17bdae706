"""VALID 2-D convolution with two interchangeable implementations.

``"xla"`` calls ``lax.conv_general_dilated``. ``"matmul"`` gathers the patches by strided slicing and contracts them
with the kernel in one matrix product. On XLA's CPU backend the gradient of the native convolution is far slower than
the gradient of the matmul form (slices and a dot), while GPUs and TPUs run the native one best; ``"auto"`` picks the
matmul form on CPU and the native convolution elsewhere.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

CONV_IMPLS = ("auto", "matmul", "xla")


def resolve_conv_impl(impl: str) -> str:
    """Maps ``"auto"`` to ``"matmul"`` on the CPU backend and to ``"xla"`` on any other."""
    if impl not in CONV_IMPLS:
        raise ValueError(f"conv impl must be one of {CONV_IMPLS}, got {impl!r}")
    if impl == "auto":
        return "matmul" if jax.default_backend() == "cpu" else "xla"
    return impl


def conv_output_size(size: int, kernel: int, stride: int) -> int:
    """Spatial size of a VALID convolution's output; raises if the kernel does not fit."""
    if size < kernel:
        raise ValueError(f"a {kernel}x{kernel} kernel does not fit an input of size {size}")
    return (size - kernel) // stride + 1


def extract_patches(x: jax.Array, kernel_size: tuple[int, int], stride: int) -> jax.Array:
    """All VALID ``kh x kw`` patches of ``x`` [B, H, W, C] as ``[B, oh, ow, kh*kw*C]``, ordered (row, column, channel).

    Built from ``kh*kw`` strided slices, so its gradient is a handful of pads and adds.
    """
    kh, kw = kernel_size
    _, height, width, _ = x.shape
    oh = conv_output_size(height, kh, stride)
    ow = conv_output_size(width, kw, stride)
    slices = [
        x[:, i : i + stride * (oh - 1) + 1 : stride, j : j + stride * (ow - 1) + 1 : stride, :]
        for i in range(kh)
        for j in range(kw)
    ]
    return jnp.concatenate(slices, axis=-1)


def conv2d(x: jax.Array, kernel: jax.Array, stride: int = 1, impl: str = "auto") -> jax.Array:
    """VALID convolution (cross-correlation, as in every deep-learning library), no bias.

    Args:
      x: images ``[B, H, W, C_in]``.
      kernel: ``[kh, kw, C_in, C_out]``.
      stride: the same in both spatial directions.
      impl: ``"auto"``, ``"matmul"`` or ``"xla"`` (see the module docstring).

    Returns:
      ``[B, oh, ow, C_out]`` with ``oh = (H - kh) // stride + 1``.
    """
    kh, kw, c_in, c_out = kernel.shape
    if x.ndim != 4 or x.shape[-1] != c_in:
        raise ValueError(f"conv2d expects input [B, H, W, {c_in}], got {x.shape}")
    if resolve_conv_impl(impl) == "xla":
        return lax.conv_general_dilated(
            x, kernel, window_strides=(stride, stride), padding="VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
    patches = extract_patches(x, (kh, kw), stride)
    return jnp.dot(patches, kernel.reshape(kh * kw * c_in, c_out))
