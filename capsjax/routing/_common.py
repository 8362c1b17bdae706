"""What the routing algorithms share: their result type and the checks of their arguments."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from capsjax.ops import check_iterations, floating, reduction_dtype


class Routed(NamedTuple):
    """What every routing function returns.

    Shape names: ``...`` leading batch axes, ``n_in`` child capsules, ``n_out`` parent capsules, ``pose`` the parents'
    pose shape (``(d,)`` for vector capsules, ``(p, p)`` for EM's matrix capsules).
    """

    poses: jax.Array  # [..., n_out, *pose], in the votes' dtype
    activations: jax.Array | None  # [..., n_out] in [0, 1] (float32 or wider); None where the algorithm has none
    assignments: jax.Array  # [..., n_in, n_out], each child's routing weights, summing to 1 over n_out (float32+)


def check_vector_votes(u_hat: jax.Array, name: str) -> jax.Array:
    """``u_hat`` ``[..., n_in, n_out, d]`` (an array or nested lists) in the reduction dtype (float32 for bfloat16
    votes); a ValueError for another shape, a TypeError for integer or complex votes (as :mod:`capsjax.ops`)."""
    u_hat = floating(u_hat, f"{name}: votes")
    if u_hat.ndim < 3:
        raise ValueError(f"{name}: votes must have shape [..., n_in, n_out, d], got {u_hat.shape}")
    return u_hat.astype(reduction_dtype(u_hat.dtype))


def check_positive(value, name: str, why: str) -> None:
    """A Python number that must be > 0 (and finite); ``why`` says what goes wrong otherwise. A traced value is the
    caller's."""
    if isinstance(value, (int, float)) and not 0 < value < float("inf"):  # NaN too
        raise ValueError(f"{name} must be a finite number > 0 ({why}), got {value}")


def as_param(value, dtype, shape: tuple[int, ...], name: str) -> jax.Array:
    """A parameter (scalar or broadcastable to ``shape``) in the compute ``dtype``; a clear error otherwise."""
    x = jnp.asarray(value)
    try:
        return jnp.broadcast_to(x.astype(dtype), shape)
    except ValueError:
        raise ValueError(f"{name} of shape {x.shape} does not broadcast to {shape}") from None


def layer_norm(x: jax.Array, scale=None, offset=None, epsilon: float = 1e-5) -> jax.Array:
    """Layer normalization over the last axis (Ba et al., 2016): ``(x - mean) / sqrt(var + epsilon) * scale + offset``;
    ``epsilon > 0`` (a constant ``x`` has variance 0)."""
    check_positive(epsilon, "epsilon", "a constant input has variance 0: 0 / 0")
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):  # integers are normalised as float32 (the result is)
        x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    y = (x - mean) / jnp.sqrt(var + epsilon)
    if scale is not None:
        y = y * as_param(scale, x.dtype, x.shape, "scale")
    if offset is not None:
        y = y + as_param(offset, x.dtype, x.shape, "offset")
    return y
