"""Inverted dot-product attention routing (Tsai, Srivastava, Goh & Salakhutdinov, *Capsules with Inverted Dot-Product
Attention Routing*, ICLR 2020).

The parents compete for the children (the softmax runs over the parents, as in dynamic routing, hence "inverted"
attention); agreement is a scaled dot product between a parent's pose of the previous iteration and a child's vote;
Layer Normalization replaces the squash. Procedure 1 of the paper, for one layer::

    v_j = 0                                                            (so the first routing weights are uniform)
    repeat num_iterations times:
        a_ij = u_hat_j|i . v_j / sqrt(d)                                (agreement; the 1/sqrt(d) of the authors' code)
        r_ij = exp(a_ij) / sum_k exp(a_ik)                              (softmax over the parents)
        v_j  = LayerNorm(sum_i r_ij u_hat_j|i)                          (learned scale and offset per pose entry)

With several capsule layers the paper routes *concurrently*: a first forward pass with uniform weights sets every
layer's poses, then each further iteration updates all layers at once, layer ``l + 1`` from the votes of layer ``l``'s
poses of the previous iteration and its own previous poses (:func:`concurrent_inverted_attention`); routing a
single layer the two schedules are the same.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from capsjax.routing._common import Routed, check_iterations, check_positive, check_vector_votes, layer_norm


def _step(u: jax.Array, v: jax.Array | None, scale, offset, epsilon):
    """One routing iteration: votes ``u`` [..., i, j, d] and poses ``v`` [..., j, d] (None: the uniform first one)
    -> new poses, routing weights [..., i, j]."""
    n_out, d = u.shape[-2:]
    if v is None:
        r = jnp.full(u.shape[:-1], 1.0 / n_out, u.dtype)
    else:
        agreement = jnp.einsum("...ijd,...jd->...ij", u, v) / jnp.sqrt(jnp.asarray(d, u.dtype))
        r = jax.nn.softmax(agreement, axis=-1)  # over the parents j
    return layer_norm(jnp.einsum("...ij,...ijd->...jd", r, u), scale, offset, epsilon), r


def inverted_attention(
    u_hat: jax.Array,
    num_iterations: int = 2,
    *,
    scale: jax.Array | None = None,
    offset: jax.Array | None = None,
    epsilon: float = 1e-5,
) -> Routed:
    """Inverted dot-product attention routing of one layer (Procedure 1 of Tsai et al., 2020; module docstring).

    Args:
      u_hat: votes ``[..., n_in, n_out, d]`` (float32, float64 or bfloat16; the sums run in float32 or wider).
      num_iterations: routing iterations, the first one uniform (2 in the paper's CIFAR experiments).
      scale, offset: Layer Normalization's learned ``[d]`` (None: 1 and 0).
      epsilon: Layer Normalization's variance epsilon (> 0).

    Returns:
      :class:`Routed`: poses ``v`` ``[..., n_out, d]`` (votes' dtype), activations None (the paper reads classes
      from the poses with a linear layer), assignments ``r`` ``[..., n_in, n_out]`` of the last iteration.
    """
    check_iterations(num_iterations)
    check_positive(epsilon, "epsilon", "Layer Normalization divides by sqrt(variance + epsilon)")
    u_hat = jnp.asarray(u_hat)
    u = check_vector_votes(u_hat, "inverted attention routing")

    def iteration(_, carry):
        return _step(u, carry[0], scale, offset, epsilon)

    carry = _step(u, None, scale, offset, epsilon)
    v, r = lax.fori_loop(0, num_iterations - 1, iteration, carry)
    return Routed(v.astype(u_hat.dtype), None, r)


def concurrent_inverted_attention(
    x: jax.Array,
    vote_fns: Sequence[Callable[[jax.Array], jax.Array]],
    num_iterations: int = 2,
    *,
    scales: Sequence[jax.Array | None] | None = None,
    offsets: Sequence[jax.Array | None] | None = None,
    epsilon: float = 1e-5,
) -> list[jax.Array]:
    """Concurrent routing through a stack of capsule layers (section 2 and Figure 2 of Tsai et al., 2020).

    Iteration 1 is a forward pass with uniform routing weights. Each further iteration computes, for every layer
    ``l`` at once, ``v^{l+1} = step(vote_fns[l](v^l_old), v^{l+1}_old)`` from the previous iteration's poses, so the
    layers' updates are independent of each other within an iteration (``x``, the first layer's input, stays fixed).

    Args:
      x: the primary capsules ``[..., n_0, d_0]``.
      vote_fns: one pure function per layer, poses ``[..., n_l, d_l]`` -> votes ``[..., n_l, n_{l+1}, d_{l+1}]``.
      num_iterations: routing iterations, the first one uniform.
      scales, offsets: per layer, Layer Normalization's ``[d_{l+1}]`` (or None).
      epsilon: Layer Normalization's variance epsilon (> 0).

    Returns:
      The poses of every layer after ``x``, ``[v^1, ..., v^L]`` (float32 or wider).
    """
    check_iterations(num_iterations)
    check_positive(epsilon, "epsilon", "Layer Normalization divides by sqrt(variance + epsilon)")
    if callable(vote_fns):
        raise TypeError("vote_fns must be a list of functions, one per layer: for one layer, pass [vote_fn]")
    depth = len(vote_fns)
    if depth < 1:
        raise ValueError("concurrent_inverted_attention needs at least one layer (vote_fns)")
    scales = [None] * depth if scales is None else list(scales)
    offsets = [None] * depth if offsets is None else list(offsets)
    if len(scales) != depth or len(offsets) != depth:
        raise ValueError(f"give one scale and one offset per layer ({depth}), got {len(scales)} and {len(offsets)}")

    def votes(l, below):
        return check_vector_votes(vote_fns[l](below), f"layer {l} of concurrent routing")

    poses, below = [], x
    for l in range(depth):  # iteration 1: a forward pass with uniform weights
        below, _ = _step(votes(l, below), None, scales[l], offsets[l], epsilon)
        poses.append(below)

    def iteration(_, old):
        inputs = (x, *old[:-1])
        return tuple(_step(votes(l, inputs[l]), old[l], scales[l], offsets[l], epsilon)[0] for l in range(depth))

    return list(lax.fori_loop(0, num_iterations - 1, iteration, tuple(poses)))
