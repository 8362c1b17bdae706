"""Numerical precision of a model: ``"float32"`` everywhere, or ``"mixed"`` bfloat16 matrix products.

Under ``"mixed"`` the large matrix products (the two convolutions and the decoder's layers, forward and backward) take
bfloat16 operands and accumulate in float32 (``preferred_element_type``), so their results, the gradients they pass
on, the parameters, the optimizer state, the routing, ``squash``, the losses and every reduction stay float32. Only the
products' operands are rounded to bfloat16.

Why the backward products need a custom gradient: JAX differentiates a product with bfloat16 operands and a float32
result by upcasting the operands to float32, so the gradient products would run in float32. :func:`matmul` (and the
CPU convolutions of :mod:`capsjax.fast.conv`, which take a ``compute_dtype``) round the float32 cotangent to bfloat16
instead and accumulate the gradient products in float32 too, as the forward product does.

On XLA's native convolution (GPU/TPU, ``kernels="textbook"``) the layers compute the convolution in bfloat16 and
convert its result to float32, the usual mixed-precision recipe there: those backends accumulate bfloat16
convolutions in float32 internally.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

PRECISIONS = ("float32", "mixed")  # ModelConfig.precision (also in capsjax.config, which imports no JAX)


def compute_dtype(precision: str):
    """The operand dtype of the large products: ``None`` (the inputs' own) for ``"float32"``, bfloat16 for
    ``"mixed"``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return jnp.bfloat16 if precision == "mixed" else None


def row_major_transpose(a: jax.Array, axes: tuple[int, ...] | None = None) -> jax.Array:
    """``a.transpose(axes)`` written out in row-major order, for an operand of a bfloat16 product.

    XLA's CPU backend folds a transpose into the product that reads it (as a transposed operand layout), and its
    bfloat16 products run fast only on row-major operands: the gradient products of the primary-capsule convolution
    ran 2-4x slower with the transpose folded on a CPU with AMX (``python benchmarks/matmul.py --gradients``). A
    reshape needs its operand in row-major order, so flattening the transpose, behind a barrier that keeps the pair
    from being simplified away, makes XLA write it out: a copy of the smaller operand (a kernel, or the cotangent).
    """
    t = a.transpose(axes)
    return jax.lax.optimization_barrier(t.reshape(-1)).reshape(t.shape)


def _product(x: jax.Array, w: jax.Array, out_dtype) -> jax.Array:
    return jnp.dot(x, w, preferred_element_type=out_dtype)


@jax.custom_vjp
def _bf16_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    return _product(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), jnp.float32)


def _bf16_matmul_fwd(x, w):
    xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    return _product(xb, wb, jnp.float32), (xb, wb)


def _bf16_matmul_bwd(residuals, cotangent):
    xb, wb = residuals
    g = cotangent.astype(jnp.bfloat16)
    x_grad = _product(g, row_major_transpose(wb), jnp.float32)
    w_grad = _product(row_major_transpose(xb), g, jnp.float32)
    return x_grad, w_grad


_bf16_matmul.defvjp(_bf16_matmul_fwd, _bf16_matmul_bwd)


def matmul(x: jax.Array, w: jax.Array, precision: str = "float32") -> jax.Array:
    """``x @ w`` for ``x`` [B, d_in] and ``w`` [d_in, d_out] in float32: a plain product, or under ``"mixed"`` with
    bfloat16 operands and float32 accumulation, forward and backward (module docstring). Returns float32 (under
    ``"float32"``, the plain product in the operands' dtype). Other ranks are refused: the mixed gradient is written
    for matrices."""
    if jnp.ndim(x) != 2 or jnp.ndim(w) != 2 or jnp.shape(x)[1] != jnp.shape(w)[0]:
        raise ValueError(f"matmul multiplies x [B, d_in] by w [d_in, d_out], got {jnp.shape(x)} and {jnp.shape(w)}")
    if compute_dtype(precision) is None:
        return jnp.dot(x, w)
    if x.dtype != jnp.float32 or w.dtype != jnp.float32:
        raise ValueError(f"mixed-precision matmul expects float32 operands, got {x.dtype} and {w.dtype}")
    return _bf16_matmul(x, w)
