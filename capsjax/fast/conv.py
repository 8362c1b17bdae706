"""VALID 2-D convolution as matrix products, for XLA's CPU backend.

On XLA's CPU backend the gradient of the native convolution (``lax.conv_general_dilated``, which the layers use
elsewhere) is far slower than the gradient of the same convolution written as patches times the flattened kernel
(gathers and dots). :func:`conv2d` is that form, tested equal, values and gradients, to the native convolution.

It comes in two shapes. With few input channels (the image) it gathers all patches into one matrix and multiplies
once. With many (the primary capsules' 256) that matrix would be the largest buffer of a training step (285 MiB at
batch 100), so it loops over the kernel's rows instead, and within a row over its taps: tap ``(i, j)`` reads one
strided slice of the input, ``[B*oh*ow, C]``, and adds its product with that tap's ``[C, C_out]`` kernel. The gradient
runs the same loop and slices the input again rather than keeping it, so neither pass ever holds more than one
row's input. (Gathering a row's patches into one ``[B*oh*ow, kw*C]`` matrix for a single product per row, the form
before, took 1.2-1.4x as long at batch 100 on a CPU with AMX: the slices feed the products directly.)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from capsjax.config import conv_output_size
from capsjax.ops import reduction_dtype
from capsjax.precision import row_major_transpose

_GATHER_MIN_CHANNELS = 16  # below this a pixel is too short for a gather to beat slicing
_ROW_LOOP_MIN_CHANNELS = 16  # below this a tap's slice is too narrow for an efficient product


def _sliced_patches(x: jax.Array, kernel_size: tuple[int, int], stride: int) -> jax.Array:
    """The patches as a concatenation of ``kh*kw`` strided slices (whose gradient is a fused set of pads and adds)."""
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


def _patch_rows(height: int, width: int, kernel_size: tuple[int, int], stride: int) -> np.ndarray:
    """For each (output pixel, kernel tap), in patch order, the flat input pixel it reads."""
    kh, kw = kernel_size
    oh = conv_output_size(height, kh, stride)
    ow = conv_output_size(width, kw, stride)
    rows = stride * np.arange(oh)[:, None, None, None] + np.arange(kh)[None, None, :, None]
    cols = stride * np.arange(ow)[None, :, None, None] + np.arange(kw)[None, None, None, :]
    return (rows * width + cols).reshape(-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _gathered_patches(x: jax.Array, kernel_size: tuple[int, int], stride: int) -> jax.Array:
    """The patches by one gather of whole pixels (``C`` contiguous values each): one pass over the output, where
    ``kh*kw`` slices and a concatenation take several on XLA's CPU backend."""
    batch, height, width, channels = x.shape
    kh, kw = kernel_size
    oh = conv_output_size(height, kh, stride)
    ow = conv_output_size(width, kw, stride)
    flat = x.reshape(batch, height * width, channels)
    patches = jnp.take(flat, jnp.asarray(_patch_rows(height, width, kernel_size, stride)), axis=1)
    return patches.reshape(batch, oh, ow, kh * kw * channels)


def _gathered_patches_fwd(x, kernel_size, stride):
    return _gathered_patches(x, kernel_size, stride), x.shape


def _gathered_patches_bwd(kernel_size, stride, shape, cotangent):
    # The transpose of the slices (pads and adds, fused) rather than a scatter-add.
    _, vjp = jax.vjp(lambda x: _sliced_patches(x, kernel_size, stride), jnp.zeros(shape, cotangent.dtype))
    return vjp(cotangent)


_gathered_patches.defvjp(_gathered_patches_fwd, _gathered_patches_bwd)


def extract_patches(x: jax.Array, kernel_size: tuple[int, int], stride: int) -> jax.Array:
    """All VALID ``kh x kw`` patches of ``x`` [B, H, W, C] as ``[B, oh, ow, kh*kw*C]``, ordered (row, column, channel).

    With several channels the patches come from one gather of whole pixels and the gradient from the transpose of
    strided slices; with few channels (e.g. the input image) from ``kh*kw`` strided slices.
    """
    if x.ndim != 4:
        raise ValueError(f"extract_patches expects [B, H, W, C], got {x.shape}")
    if x.shape[-1] >= _GATHER_MIN_CHANNELS:
        return _gathered_patches(x, tuple(kernel_size), stride)
    return _sliced_patches(x, kernel_size, stride)


def conv2d(x: jax.Array, kernel: jax.Array, stride: int = 1, compute_dtype=None) -> jax.Array:
    """VALID convolution (cross-correlation, as in every deep-learning library), no bias, as matrix products.

    Equal to ``lax.conv_general_dilated(x, kernel, (stride, stride), "VALID")`` in NHWC / HWIO layout.

    Args:
      x: images ``[B, H, W, C_in]``.
      kernel: ``[kh, kw, C_in, C_out]``.
      stride: the same in both spatial directions.
      compute_dtype: the operand dtype of the products (e.g. ``jnp.bfloat16``, see :mod:`capsjax.precision`), forward
        and backward; they accumulate in float32 (float64 for float64 inputs). ``None``: ``x``'s dtype. The result and
        the gradients keep the inputs' dtypes.

    Returns:
      ``[B, oh, ow, C_out]`` with ``oh = (H - kh) // stride + 1``, in ``x``'s dtype.
    """
    _, _, c_in, _ = kernel.shape
    if x.ndim != 4 or x.shape[-1] != c_in:
        raise ValueError(f"conv2d expects input [B, H, W, {c_in}], got {x.shape}")
    compute_dtype = jnp.dtype(compute_dtype or x.dtype)
    if c_in >= _ROW_LOOP_MIN_CHANNELS:
        return _row_loop_matmul(x, kernel, stride, compute_dtype)
    return _patch_matmul(x, kernel, stride, compute_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _patch_matmul(x: jax.Array, kernel: jax.Array, stride: int, compute_dtype) -> jax.Array:
    """The patches of ``x`` times the flattened kernel; the gradient orders its two big products (below)."""
    return _patch_matmul_fwd(x, kernel, stride, compute_dtype)[0]


def _patch_matmul_fwd(x, kernel, stride, compute_dtype):
    kh, kw, c_in, c_out = kernel.shape
    patches = extract_patches(x.astype(compute_dtype), (kh, kw), stride)
    flat_kernel = kernel.reshape(kh * kw * c_in, c_out).astype(compute_dtype)
    out = jnp.dot(patches, flat_kernel, preferred_element_type=reduction_dtype(x.dtype))
    return out.astype(x.dtype), (patches, kernel, x.shape)


def _patch_matmul_bwd(stride, compute_dtype, residuals, cotangent):
    patches, kernel, x_shape = residuals
    kh, kw, c_in, c_out = kernel.shape
    x_dtype = cotangent.dtype  # the result's dtype is x's
    acc_dtype = reduction_dtype(x_dtype)
    flat_kernel = kernel.reshape(kh * kw * c_in, c_out).astype(compute_dtype)
    cotangent = cotangent.reshape(-1, c_out).astype(compute_dtype)
    # The kernel gradient transposed, [C_out, kh*kw*C_in], is a plain row-major product that XLA's CPU backend hands
    # to its fast matmul library; untransposed, with the patches as the transposed operand, it takes a slower path.
    kernel_grad_t = jnp.dot(cotangent.T, patches.reshape(-1, kh * kw * c_in), preferred_element_type=acc_dtype)
    # The barrier keeps XLA from folding the transpose back into the product. It also makes the patch gradient (as
    # large as the patches) wait for the kernel gradient, the patches' last use, so the two share one buffer (the
    # default train step at batch 100 needs 120 MB less scratch memory).
    cotangent, kernel_grad_t = lax.optimization_barrier((cotangent, kernel_grad_t))
    kernel_grad = kernel_grad_t.T
    patch_grad = jnp.dot(cotangent, flat_kernel.T, preferred_element_type=acc_dtype)
    # the transpose of the patch gather, summed in the accumulation dtype
    _, patches_vjp = jax.vjp(lambda x: extract_patches(x, (kh, kw), stride), jnp.zeros(x_shape, acc_dtype))
    (x_grad,) = patches_vjp(patch_grad.reshape(*patches.shape))
    return x_grad.astype(x_dtype), kernel_grad.reshape(kernel.shape).astype(kernel.dtype)


_patch_matmul.defvjp(_patch_matmul_fwd, _patch_matmul_bwd)


def _rows_by_phase(x: jax.Array, stride: int) -> jax.Array:
    """``x`` [B, H, W, C] as [B, ceil(H/s), s, W, C], zero rows appended: input row ``i + s*y`` is at
    ``[:, i//s + y, i%s]``, so the rows that kernel row ``i`` reads are one slice, even for an ``i`` known only inside a
    loop."""
    batch, height, width, channels = x.shape
    padded = -(-height // stride) * stride
    if padded != height:
        x = jnp.pad(x, ((0, 0), (0, padded - height), (0, 0), (0, 0)))
    return x.reshape(batch, padded // stride, stride, width, channels)


def _kernel_row_input(x_phased: jax.Array, i: jax.Array, out_height: int) -> jax.Array:
    """The input rows ``i + s*y`` (``y < out_height``) that kernel row ``i`` reads: [B, out_height, W, C]."""
    batch, _, stride, width, channels = x_phased.shape
    rows = lax.dynamic_slice(x_phased, (0, i // stride, i % stride, 0, 0), (batch, out_height, 1, width, channels))
    return rows.reshape(batch, out_height, width, channels)


def _tap(rows: jax.Array, j: int, out_width: int, stride: int) -> jax.Array:
    """The pixels that kernel tap ``(i, j)`` reads from ``rows`` [B, oh, W, C] (the input rows of kernel row ``i``),
    as a matrix ``[B*oh*ow, C]``: a strided slice."""
    return rows[:, :, j : j + stride * (out_width - 1) + 1 : stride, :].reshape(-1, rows.shape[-1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _row_loop_matmul(x: jax.Array, kernel: jax.Array, stride: int, compute_dtype) -> jax.Array:
    """The convolution as a loop over kernel rows, each the sum of its taps' products (module docstring)."""
    return _row_loop_matmul_fwd(x, kernel, stride, compute_dtype)[0]


def _row_loop_matmul_fwd(x, kernel, stride, compute_dtype):
    kh, kw, c_in, c_out = kernel.shape
    batch, height, width, _ = x.shape
    oh, ow = conv_output_size(height, kh, stride), conv_output_size(width, kw, stride)
    x_c = x.astype(compute_dtype)
    x_phased = _rows_by_phase(x_c, stride)
    acc_dtype = reduction_dtype(x.dtype)

    def add_row(acc, i_and_kernel_row):
        i, kernel_row = i_and_kernel_row
        rows = _kernel_row_input(x_phased, i, oh)
        for j in range(kw):
            acc = acc + jnp.dot(_tap(rows, j, ow, stride), kernel_row[j], preferred_element_type=acc_dtype)
        return acc, None

    kernel_c = kernel.astype(compute_dtype)
    out, _ = lax.scan(add_row, jnp.zeros((batch * oh * ow, c_out), acc_dtype), (jnp.arange(kh), kernel_c))
    # x kept in the compute dtype (half the memory under mixed precision); its own dtype is the result's
    return out.astype(x.dtype).reshape(batch, oh, ow, c_out), (x_c, kernel)


def _row_loop_matmul_bwd(stride, compute_dtype, residuals, cotangent):
    x_c, kernel = residuals
    kh, kw, c_in, c_out = kernel.shape
    batch, height, width, _ = x_c.shape
    oh, ow = conv_output_size(height, kh, stride), conv_output_size(width, kw, stride)
    x_phased = _rows_by_phase(x_c, stride)
    x_dtype = cotangent.dtype  # the result's dtype is x's
    acc_dtype = reduction_dtype(x_dtype)
    cotangent = cotangent.reshape(-1, c_out).astype(compute_dtype)
    # Both gradient products of every tap with row-major operands (capsjax.precision.row_major_transpose): the
    # transposed cotangent [C_out, B*oh*ow] and the transposed kernel taps [kh, kw, C_out, C_in].
    cotangent_t = row_major_transpose(cotangent)
    kernel_t = row_major_transpose(kernel.astype(compute_dtype), (0, 1, 3, 2))
    zero = jnp.zeros((), acc_dtype)

    def row_grads(x_grad, i_and_kernel_row_t):
        i, kernel_row_t = i_and_kernel_row_t
        # This row's input again (a slice) rather than a residual of the forward loop.
        rows = _kernel_row_input(x_phased, i, oh)
        kernel_grads, rows_grad = [], jnp.zeros((batch, oh, width, c_in), acc_dtype)
        for j in range(kw):
            # The kernel gradient transposed, [C_out, C_in]: a plain row-major product for XLA's CPU backend.
            kernel_grads.append(jnp.dot(cotangent_t, _tap(rows, j, ow, stride), preferred_element_type=acc_dtype))
            tap_grad = jnp.dot(cotangent, kernel_row_t[j], preferred_element_type=acc_dtype)
            # the transpose of the tap's strided slice: a pad with stride - 1 zeros between the pixels
            right = width - (j + stride * (ow - 1) + 1)
            padding = ((0, 0, 0), (0, 0, 0), (j, right, stride - 1), (0, 0, 0))
            rows_grad = rows_grad + lax.pad(tap_grad.reshape(batch, oh, ow, c_in), zero, padding)
        start = (0, i // stride, i % stride, 0, 0)
        current = lax.dynamic_slice(x_grad, start, (batch, oh, 1, width, c_in))
        x_grad = lax.dynamic_update_slice(x_grad, current + rows_grad.reshape(current.shape), start)
        return x_grad, jnp.stack(kernel_grads)

    x_grad, kernel_grad_t = lax.scan(row_grads, jnp.zeros(x_phased.shape, acc_dtype), (jnp.arange(kh), kernel_t))
    x_grad = x_grad.reshape(batch, -1, width, c_in)[:, :height].astype(x_dtype)
    kernel_grad = kernel_grad_t.transpose(0, 1, 3, 2).astype(kernel.dtype)
    return x_grad, kernel_grad


_row_loop_matmul.defvjp(_row_loop_matmul_fwd, _row_loop_matmul_bwd)
