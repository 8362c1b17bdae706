"""The capsule maths of Sabour, Frosst & Hinton (2017) as small pure JAX functions.

Nothing here holds state or parameters: every function maps arrays to arrays and works under ``jit``, ``vmap`` and
``grad``. Reductions run in at least float32 (bfloat16 inputs are upcast internally and the result is cast back), so
the same code serves float64 gradient checks and bfloat16 activations.

Shape names used in the docstrings: ``n_in`` child (input) capsules, ``n_out`` parent (output) capsules, ``d`` a
capsule's pose dimension, ``...`` any leading batch axes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

__all__ = [
    "safe_norm",
    "squash",
    "capsule_predictions",
    "parent_major_predictions",
    "dynamic_routing",
    "margin_loss",
    "reconstruction_loss",
    "mask_capsules",
]


def _compute_dtype(dtype) -> jnp.dtype:
    """The dtype reductions run in: the input's, but never narrower than float32."""
    return jnp.promote_types(dtype, jnp.float32)


def safe_norm(s: jax.Array, axis: int = -1, epsilon: float = 1e-7, keepdims: bool = False) -> jax.Array:
    """Euclidean norm with ``epsilon`` inside the square root: ``sqrt(sum(s**2, axis) + epsilon)``.

    The epsilon keeps the gradient finite at ``s = 0`` (a plain ``jnp.linalg.norm`` gives NaN there).

    Args:
      s: any array, e.g. capsules ``[..., n, d]``.
      axis: the axis to reduce (the capsule dimension).
      epsilon: added to the squared norm before the square root.
      keepdims: keep the reduced axis with size 1.

    Returns:
      The norms, ``s``'s shape without ``axis`` (or with it as 1), in ``s``'s dtype.
    """
    x = s.astype(_compute_dtype(s.dtype))
    norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=keepdims) + epsilon)
    return norm.astype(s.dtype)


def squash(s: jax.Array, axis: int = -1, epsilon: float = 1e-7) -> jax.Array:
    """The capsule non-linearity (paper eq. 1): ``|s|^2 / (1 + |s|^2) * s / sqrt(|s|^2 + epsilon)``.

    Short vectors shrink towards length 0, long ones towards length 1; the direction is kept. The epsilon sits inside
    the square root, so ``squash(0) = 0`` with a finite gradient.

    Args:
      s: vectors ``[..., d]`` (or with the vector axis at ``axis``).
      axis: the vector axis.
      epsilon: added to the squared norm inside the square root.

    Returns:
      The squashed vectors, same shape and dtype as ``s``.
    """
    x = s.astype(_compute_dtype(s.dtype))
    squared_norm = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
    scale = squared_norm / (1.0 + squared_norm) / jnp.sqrt(squared_norm + epsilon)
    return (scale * x).astype(s.dtype)


def capsule_predictions(weights: jax.Array, u: jax.Array) -> jax.Array:
    """The child capsules' predictions for their parents (paper eq. 2): ``u_hat[..., i, j] = weights[i, j] @ u[..., i]``.

    One batched matrix product over the children ``i``; ``weights`` is shared by every example, never tiled.

    Args:
      weights: ``[n_in, n_out, d_out, d_in]``.
      u: child capsules ``[..., n_in, d_in]``.

    Returns:
      ``u_hat`` of shape ``[..., n_in, n_out, d_out]``.
    """
    n_in, n_out, d_out, d_in = weights.shape
    if u.ndim < 2 or u.shape[-2:] != (n_in, d_in):
        raise ValueError(f"capsules must have shape [..., {n_in}, {d_in}] for weights {weights.shape}, got {u.shape}")
    lead = u.shape[:-2]
    u_t = jnp.moveaxis(u.reshape(-1, n_in, d_in), 1, 0)  # [i, B, d_in]
    w_t = jnp.transpose(weights, (0, 3, 1, 2)).reshape(n_in, d_in, n_out * d_out)  # [i, d_in, (j, d_out)]
    # u as the left operand: the transpose of this product gives dW as [i, d_in, (j, d_out)] straight from a batched
    # matmul over i, where the other operand order makes XLA's CPU backend re-lay out u_hat's cotangent with the batch
    # minor first (~0.1 s per step at batch 100).
    u_hat = lax.dot_general(u_t, w_t, (((2,), (1,)), ((0,), (0,))))  # [i, B, (j, d_out)]
    return jnp.moveaxis(u_hat, 0, 1).reshape(*lead, n_in, n_out, d_out)


@jax.custom_vjp
def parent_major_predictions(weights: jax.Array, u: jax.Array) -> jax.Array:
    """:func:`capsule_predictions` laid out for routing, ``[B, n_out, n_in, d_out]``; reverse-mode only.

    The forward pass is ``d_in`` broadcast multiply-adds that XLA fuses into one pass writing ``u_hat`` straight in the
    parent-major layout :func:`dynamic_routing` works in; the backward pass is the two batched matrix products of
    :func:`capsule_predictions`' gradient. On XLA's CPU backend this saves a re-layout of ``u_hat`` and one of its
    buffers (the default train step at batch 100: ~0.07 s and 55 MB). Differentiable with ``jax.grad`` / ``jax.vjp``,
    not with ``jax.jvp``; :func:`capsule_predictions` supports every mode.

    Args:
      weights: ``[n_in, n_out, d_out, d_in]``.
      u: child capsules ``[B, n_in, d_in]``.
    """
    n_in, n_out, d_out, d_in = weights.shape
    if u.ndim != 3 or u.shape[1:] != (n_in, d_in):
        raise ValueError(f"capsules must have shape [B, {n_in}, {d_in}] for weights {weights.shape}, got {u.shape}")
    w = jnp.swapaxes(weights, 0, 1)[None]  # [1, j, i, d_out, d_in]
    x = u[:, None, :, None, :]  # [B, 1, i, 1, d_in]
    u_hat = x[..., 0] * w[..., 0]
    for k in range(1, d_in):
        u_hat = u_hat + x[..., k] * w[..., k]
    return u_hat


def _parent_major_predictions_fwd(weights, u):
    return parent_major_predictions(weights, u), (weights, u)


def _parent_major_predictions_bwd(residuals, cotangent):
    weights, u = residuals
    n_in, n_out, d_out, d_in = weights.shape
    batch = u.shape[0]
    g = jnp.transpose(cotangent, (2, 0, 1, 3)).reshape(n_in, batch, n_out * d_out)  # [i, B, (j, d_out)]
    u_t = jnp.moveaxis(u, 1, 0)  # [i, B, d_in]
    w_grad = lax.dot_general(u_t, g, (((1,), (1,)), ((0,), (0,))))  # [i, d_in, (j, d_out)]
    w_grad = jnp.transpose(w_grad.reshape(n_in, d_in, n_out, d_out), (0, 2, 3, 1))
    u_grad = lax.dot_general(g, weights.reshape(n_in, n_out * d_out, d_in), (((2,), (1,)), ((0,), (0,))))
    return w_grad.astype(weights.dtype), jnp.moveaxis(u_grad, 0, 1).astype(u.dtype)


parent_major_predictions.defvjp(_parent_major_predictions_fwd, _parent_major_predictions_bwd)


def dynamic_routing(
    u_hat: jax.Array,
    num_iterations: int = 3,
    stop_gradient: bool = False,
    return_coupling: bool = False,
    bias: jax.Array | None = None,
    unroll: bool = True,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Routing by agreement (Procedure 1 of the paper).

    ``b = 0``; ``num_iterations`` times: ``c = softmax(b)`` over the parents ``j``; ``s_j = sum_i c_ij u_hat_j|i``;
    ``v_j = squash(s_j)``; ``b_ij += u_hat_j|i . v_j``. The update of ``b`` after the last iteration cannot change ``v``
    and is skipped, so ``num_iterations=1`` means uniform coupling and no agreement step. The first iteration
    (``b = 0``, uniform ``c``) is written out; the others are a ``lax.fori_loop``.

    Args:
      u_hat: predictions of the child capsules for their parents, ``[..., n_in, n_out, d]``.
      num_iterations: routing iterations ``r >= 1`` (3 in the paper).
      stop_gradient: if True, gradients reach ``u_hat`` only through the final iteration (the agreement logits are
        computed from a stopped copy), a common speed-up; the default lets them flow through every iteration, as in
        the paper's formulation.
      return_coupling: also return the coupling coefficients ``c`` used in the final iteration.
      bias: optional ``[n_out, d]`` added to every ``s_j`` before the squash (the per-parent bias of the authors'
        released code; not in the paper).
      unroll: unroll the ``fori_loop`` at trace time (the default), letting XLA fuse across iterations; ``False``
        keeps one rolled loop body. At 3 iterations the two run alike (``benchmarks/routing.py``); the speed-up over
        the textbook loop comes from writing out the ``b = 0`` iteration.

    Returns:
      ``v`` of shape ``[..., n_out, d]`` in ``u_hat``'s dtype, or ``(v, c)`` with ``c`` of shape
      ``[..., n_in, n_out]`` (float32 or wider) summing to 1 over ``n_out``.
    """
    if num_iterations < 1:
        raise ValueError(f"num_iterations must be >= 1, got {num_iterations}")
    if u_hat.ndim < 3:
        raise ValueError(f"u_hat must have shape [..., n_in, n_out, d], got {u_hat.shape}")
    u = u_hat.astype(_compute_dtype(u_hat.dtype))
    # Parent-major layout [..., n_out, n_in, d]: every contraction below (over n_in for s_j, over d for the agreement)
    # is then a batched matrix-vector product over (..., j) that XLA runs without re-laying out u_hat.
    u = jnp.swapaxes(u, -3, -2)
    u_for_agreement = lax.stop_gradient(u) if stop_gradient else u

    n_out = u.shape[-3]

    def parents(s):
        return squash(s if bias is None else s + jnp.broadcast_to(bias.astype(s.dtype), s.shape))

    def route(b, u):
        c = jax.nn.softmax(b, axis=-2)  # over the parents j
        return c, parents(jnp.einsum("...ji,...jid->...jd", c, u))

    def agreement(u, v):
        return jnp.einsum("...jid,...jd->...ji", u, v)

    def uniform_route(u):
        return parents(jnp.sum(u, axis=-2) / n_out)

    def agreement_step(_, b):
        _, v = route(b, u_for_agreement)
        return b + agreement(u_for_agreement, v)

    if num_iterations == 1:
        # b = 0: uniform coupling, written without a softmax of zeros (which XLA would constant-fold at length).
        c = jnp.full(u.shape[:-1], 1.0 / n_out, u.dtype)
        v = uniform_route(u)
    else:
        # The first iteration has b = 0, so b after it is just the agreement with the uniformly routed v.
        b = agreement(u_for_agreement, uniform_route(u_for_agreement))
        b = lax.fori_loop(0, num_iterations - 2, agreement_step, b, unroll=unroll)
        c, v = route(b, u)
    c = jnp.swapaxes(c, -2, -1)
    v = v.astype(u_hat.dtype)
    return (v, c) if return_coupling else v


def margin_loss(
    lengths: jax.Array,
    labels: jax.Array,
    m_plus: float = 0.9,
    m_minus: float = 0.1,
    lambda_: float = 0.5,
) -> jax.Array:
    """Margin loss (paper eq. 4), summed over classes, one value per example.

    ``L = sum_k T_k max(0, m_plus - |v_k|)^2 + lambda_ (1 - T_k) max(0, |v_k| - m_minus)^2``.

    Args:
      lengths: capsule lengths ``[..., n_classes]``.
      labels: integer class ids ``[...]``, or k-hot targets ``[..., n_classes]`` (e.g. two digits in MultiMNIST).
      m_plus, m_minus, lambda_: the paper's 0.9, 0.1 and 0.5.

    Returns:
      The loss per example, shape ``[...]``, in float32 or wider.
    """
    x = lengths.astype(_compute_dtype(lengths.dtype))
    if labels.ndim == lengths.ndim:
        targets = labels.astype(x.dtype)
    elif labels.ndim == lengths.ndim - 1:
        targets = jax.nn.one_hot(labels, lengths.shape[-1], dtype=x.dtype)
    else:
        raise ValueError(f"labels {labels.shape} must be class ids [...] or targets [..., k] for lengths {lengths.shape}")
    present = targets * jnp.square(jnp.maximum(0.0, m_plus - x))
    absent = lambda_ * (1.0 - targets) * jnp.square(jnp.maximum(0.0, x - m_minus))
    return jnp.sum(present + absent, axis=-1)


def reconstruction_loss(images: jax.Array, reconstructions: jax.Array, reduction: str = "sum") -> jax.Array:
    """Squared reconstruction error per example (the first axis is the batch).

    Args:
      images: targets ``[batch, ...]`` (e.g. ``[B, H, W, C]`` in ``[0, 1]``).
      reconstructions: same number of elements per example as ``images`` (e.g. ``[B, H*W*C]``).
      reduction: ``"sum"`` over pixels (the paper's, scaled by 0.0005 in the total loss) or ``"mean"`` (the widely
        copied tutorial's, 784 times weaker on MNIST).

    Returns:
      The loss per example, shape ``[batch]``, in float32 or wider.
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    if images.size != reconstructions.size or images.shape[:1] != reconstructions.shape[:1]:
        raise ValueError(f"images {images.shape} and reconstructions {reconstructions.shape} do not match")
    dtype = _compute_dtype(jnp.result_type(images.dtype, reconstructions.dtype))
    x = images.reshape(images.shape[0], -1).astype(dtype)
    y = reconstructions.reshape(images.shape[0], -1).astype(dtype)
    squared_error = jnp.square(x - y)
    return jnp.sum(squared_error, axis=-1) if reduction == "sum" else jnp.mean(squared_error, axis=-1)


def mask_capsules(capsules: jax.Array, labels: jax.Array | None = None) -> jax.Array:
    """Zero every capsule but one per example: the labelled one (training) or the longest one (inference).

    Args:
      capsules: ``[..., n_out, d]``.
      labels: class ids ``[...]``; ``None`` picks the longest capsule.

    Returns:
      Same shape and dtype as ``capsules``.
    """
    if labels is None:
        labels = jnp.argmax(safe_norm(capsules, axis=-1), axis=-1)
    mask = jax.nn.one_hot(labels, capsules.shape[-2], dtype=capsules.dtype)
    return capsules * mask[..., None]
