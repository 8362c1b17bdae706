"""The capsule maths of Sabour, Frosst & Hinton (2017) as small pure JAX functions.

Nothing here holds state or parameters: every function maps arrays to arrays and works under ``jit``, ``vmap`` and
``grad``. Reductions run in at least float32 (bfloat16 inputs are upcast internally and the result is cast back), so
the same code serves float64 gradient checks and bfloat16 activations.

Shape names used in the docstrings: ``n_in`` child (input) capsules, ``n_out`` parent (output) capsules, ``d`` a
capsule's pose dimension, ``...`` any leading batch axes.
"""

from __future__ import annotations

import math
import operator

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = [
    "safe_norm",
    "squash",
    "capsule_predictions",
    "dynamic_routing",
    "margin_loss",
    "reconstruction_loss",
    "mask_capsules",
]


def reduction_dtype(*dtypes) -> jnp.dtype:
    """The dtype reductions run in: float64 if any input is float64, else float32 (bfloat16 inputs are upcast). An
    explicit rule, so the maths also runs under ``jax_numpy_dtype_promotion="strict"``."""
    return jnp.dtype(jnp.float64 if any(jnp.dtype(d) == jnp.float64 for d in dtypes) else jnp.float32)


def floating(
    x, name: str, expected: str = "floating point (float32, bfloat16 or float64)", hint: str = "cast it first"
) -> jax.Array:
    """``x`` as an array, checked to be floating point (an integer array would be squared, divided and summed in
    integers, and give wrong values without a word; a complex one would be squared, not its modulus); the error says
    ``name`` must be ``expected`` and what to do, ``hint``."""
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must be {expected}, got {x.dtype}: {hint}")
    return x


def concrete(x: jax.Array) -> np.ndarray | None:
    """``x``'s values as a NumPy array where they are known now (not traced under ``jit``/``vmap``/``grad``; an
    array captured by a jitted function is), for checks of values; None for a tracer or an empty array."""
    if isinstance(x, jax.core.Tracer) or not np.size(x):
        return None
    return np.asarray(x)


def _check_epsilon(epsilon: float) -> None:
    if isinstance(epsilon, (int, float)) and not epsilon >= 0:  # NaN too; a traced epsilon is the caller's
        raise ValueError(f"epsilon must be >= 0 (a positive one keeps the gradient at 0 finite), got {epsilon}")


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
    s = floating(s, "safe_norm's input")
    _check_epsilon(epsilon)
    x = s.astype(reduction_dtype(s.dtype))
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
    s = floating(s, "squash's input")
    _check_epsilon(epsilon)
    x = s.astype(reduction_dtype(s.dtype))
    squared_norm = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
    scale = squared_norm / (1.0 + squared_norm) / jnp.sqrt(squared_norm + epsilon)
    return (scale * x).astype(s.dtype)


def capsule_predictions(weights: jax.Array, u: jax.Array) -> jax.Array:
    """The child capsules' predictions for their parents (paper eq. 2): ``u_hat[..., i, j] = weights[i, j] @ u[..., i]``.

    One ``einsum``; ``weights`` is shared by every example, never tiled per example.

    Args:
      weights: ``[n_in, n_out, d_out, d_in]``.
      u: child capsules ``[..., n_in, d_in]``.

    Returns:
      ``u_hat`` of shape ``[..., n_in, n_out, d_out]``.
    """
    weights, u = floating(weights, "weights"), floating(u, "capsules")
    if weights.ndim != 4:
        raise ValueError(f"weights must have shape [n_in, n_out, d_out, d_in], got {weights.shape}")
    n_in, _, _, d_in = weights.shape
    if u.ndim < 2 or u.shape[-2:] != (n_in, d_in):
        raise ValueError(f"capsules must have shape [..., {n_in}, {d_in}] for weights {weights.shape}, got {u.shape}")
    return jnp.einsum("ijdk,...ik->...ijd", weights, u)


def check_iterations(num_iterations: int) -> int:
    """``num_iterations`` as an int >= 1 (it sets a loop's length: a Python int, static under ``jit``)."""
    if isinstance(num_iterations, bool):  # an int to Python: True was 1 iteration
        raise TypeError(f"num_iterations must be an int >= 1, got {num_iterations}")
    try:
        num_iterations = operator.index(num_iterations)
    except TypeError:
        raise TypeError(
            f"num_iterations must be a Python int, got {type(num_iterations).__name__} (under jax.jit, mark it static: "
            "jax.jit(f, static_argnames='num_iterations'))"
        ) from None
    if num_iterations < 1:
        raise ValueError(f"num_iterations must be >= 1, got {num_iterations}")
    return num_iterations


def routing_inputs(u_hat: jax.Array, num_iterations: int, stop_gradient: bool, layout: str):
    """Checks routing's arguments; returns ``num_iterations`` as an int, ``u_hat`` in the reduction dtype, and the copy
    the agreement logits see (stopped with ``stop_gradient``)."""
    num_iterations = check_iterations(num_iterations)
    u_hat = floating(u_hat, "u_hat")
    if u_hat.ndim < 3:
        raise ValueError(f"u_hat must have shape {layout}, got {u_hat.shape}")
    u = u_hat.astype(reduction_dtype(u_hat.dtype))
    return num_iterations, u, (lax.stop_gradient(u) if stop_gradient else u)


def dynamic_routing(
    u_hat: jax.Array,
    num_iterations: int = 3,
    stop_gradient: bool = False,
    return_coupling: bool = False,
    bias: jax.Array | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Routing by agreement, Procedure 1 of the paper.

    ``b_ij = 0``; ``num_iterations`` times: ``c_i = softmax(b_i)`` over the parents ``j``;
    ``s_j = sum_i c_ij u_hat_j|i``; ``v_j = squash(s_j)``; ``b_ij += u_hat_j|i . v_j``. Returns the last ``v``.
    The update of ``b`` after the last iteration cannot change ``v``, so the loop below runs the first
    ``num_iterations - 1`` iterations (each ending with the update of ``b``) and the last one follows it.

    Args:
      u_hat: predictions of the child capsules for their parents, ``[..., n_in, n_out, d]``.
      num_iterations: routing iterations ``r >= 1`` (3 in the paper); a Python int.
      stop_gradient: if True, gradients reach ``u_hat`` only through the last iteration (the earlier ones, which
        only compute ``b``, see a stopped copy of ``u_hat``); the default lets them flow through every iteration.
      return_coupling: also return the coupling coefficients ``c`` of the last iteration.
      bias: optional ``[n_out, d]`` added to every ``s_j`` before the squash (the per-parent bias of the authors'
        released code; not in the paper).

    Returns:
      ``v`` of shape ``[..., n_out, d]`` in ``u_hat``'s dtype, or ``(v, c)`` with ``c`` of shape
      ``[..., n_in, n_out]`` (float32 or wider) summing to 1 over ``n_out``.
    """
    u_hat = jnp.asarray(u_hat)
    num_iterations, u, u_for_logits = routing_inputs(u_hat, num_iterations, stop_gradient, "[..., n_in, n_out, d]")
    if bias is not None:
        bias = jnp.asarray(bias)
        if bias.shape != u.shape[-2:]:
            raise ValueError(f"bias must have shape [n_out, d] = {list(u.shape[-2:])}, got {list(bias.shape)}")

    def route(b, u):  # b: [..., n_in, n_out] -> c: [..., n_in, n_out], v: [..., n_out, d]
        c = jax.nn.softmax(b, axis=-1)  # over the parents j
        s = jnp.einsum("...ij,...ijd->...jd", c, u)
        if bias is not None:
            s = s + jnp.broadcast_to(bias.astype(s.dtype), s.shape)
        return c, squash(s)

    def iteration(_, b):
        _, v = route(b, u_for_logits)
        return b + jnp.einsum("...ijd,...jd->...ij", u_for_logits, v)

    b = lax.fori_loop(0, num_iterations - 1, iteration, jnp.zeros(u.shape[:-1], u.dtype))
    c, v = route(b, u)
    v = v.astype(u_hat.dtype)
    return (v, c) if return_coupling else v


def _targets(labels: jax.Array, shape: tuple[int, ...], dtype) -> jax.Array:
    """Class ids ``[...]`` or k-hot targets ``[..., k]`` as targets of ``shape`` ``[..., k]`` in ``dtype``. Class ids
    must be integers in ``[0, k)``: checked where they are concrete (outside ``jit``), as one-hot would give a row of
    zeros for an id out of range and truncate a fractional one without a word."""
    labels = jnp.asarray(labels)
    if tuple(labels.shape) == tuple(shape):
        return labels.astype(dtype)
    if tuple(labels.shape) != tuple(shape[:-1]):
        raise ValueError(
            f"labels {tuple(labels.shape)} must be class ids {tuple(shape[:-1])} or k-hot targets {tuple(shape)} for "
            f"scores or capsules {tuple(shape)}"
        )
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(f"class ids must be integers, got {labels.dtype} (k-hot targets have the scores' shape)")
    values = concrete(labels)
    if values is not None:
        if values.min() < 0 or values.max() >= shape[-1]:
            raise ValueError(f"class ids must lie in [0, {shape[-1]}), got values in [{values.min()}, {values.max()}]")
    return jax.nn.one_hot(labels, shape[-1], dtype=dtype)


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
    lengths = floating(lengths, "lengths")
    x = lengths.astype(reduction_dtype(lengths.dtype))
    targets = _targets(labels, lengths.shape, x.dtype)
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
    images = floating(images, "images", "float in [0, 1]", "divide uint8 images by 255")
    reconstructions = floating(reconstructions, "reconstructions")
    if images.size != reconstructions.size or images.shape[:1] != reconstructions.shape[:1]:
        raise ValueError(f"images {images.shape} and reconstructions {reconstructions.shape} do not match")
    dtype = reduction_dtype(images.dtype, reconstructions.dtype)
    pixels = math.prod(images.shape[1:])  # (not -1, which an empty batch can't resolve)
    x = images.reshape(images.shape[0], pixels).astype(dtype)
    y = reconstructions.reshape(images.shape[0], pixels).astype(dtype)
    squared_error = jnp.square(x - y)
    return jnp.sum(squared_error, axis=-1) if reduction == "sum" else jnp.mean(squared_error, axis=-1)


def mask_capsules(capsules: jax.Array, labels: jax.Array | None = None) -> jax.Array:
    """Zero every capsule but the labelled ones (training) or the longest one (inference).

    Args:
      capsules: ``[..., n_out, d]``.
      labels: class ids ``[...]``, or k-hot targets ``[..., n_out]`` that keep several capsules (e.g. the two digits
        of a MultiMNIST image); ``None`` keeps the longest capsule.

    Returns:
      Same shape and dtype as ``capsules``.
    """
    capsules = floating(capsules, "capsules")
    if labels is None:
        labels = jnp.argmax(safe_norm(capsules, axis=-1), axis=-1)
    mask = _targets(labels, capsules.shape[:-1], capsules.dtype)
    return capsules * mask[..., None]
