"""The predictions ``u_hat`` and routing by agreement in the layout XLA's CPU backend runs fastest.

:func:`parent_major_predictions` equals ``capsule_predictions`` of :mod:`capsjax.ops` with the child and parent axes
swapped, and :func:`parent_major_routing` equals ``capsjax.ops.dynamic_routing`` on that swapped ``u_hat``; both are
tested equal, values and gradients. What differs is only how XLA's CPU backend runs them:

- parent-major ``u_hat`` ``[..., n_out, n_in, d]``: every contraction of the routing (over ``n_in`` for ``s_j``,
  over ``d`` for the agreement) is a batched matrix-vector product over ``(..., j)`` that needs no re-layout of
  ``u_hat`` (on the default model at batch 100 the textbook layout costs two re-layouts forward and one backward,
  ~0.1 s per training step);
- ``u_hat`` is written straight in that layout by ``d_in`` fused multiply-adds, with a gradient of two batched
  products (~4% of a training step, and 55 MB of scratch memory);
- the first routing iteration (``b = 0``, uniform coupling) is written out: no softmax of zeros, one loop trip fewer
  (routing forward + backward 255 -> 114 ms on ``u_hat`` ``[100, 1152, 10, 16]``, ``benchmarks/routing.py``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from capsjax.ops import routing_inputs, squash

__all__ = ["parent_major_predictions", "parent_major_routing"]


@jax.custom_vjp
def parent_major_predictions(weights: jax.Array, u: jax.Array) -> jax.Array:
    """``u_hat[b, j, i] = weights[i, j] @ u[b, i]``, parent-major ``[B, n_out, n_in, d_out]``; reverse-mode only.

    Differentiable with ``jax.grad`` / ``jax.vjp``, not with ``jax.jvp`` (``capsjax.ops.capsule_predictions``
    supports every mode).

    Args:
      weights: ``[n_in, n_out, d_out, d_in]``.
      u: child capsules ``[B, n_in, d_in]``.
    """
    n_in, _, _, d_in = weights.shape
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
    # u as the left operand: dW comes as [i, d_in, (j, d_out)] straight from a batched product over i, where the other
    # operand order makes XLA's CPU backend re-lay out the cotangent with the batch minor first.
    w_grad = lax.dot_general(u_t, g, (((1,), (1,)), ((0,), (0,))))  # [i, d_in, (j, d_out)]
    w_grad = jnp.transpose(w_grad.reshape(n_in, d_in, n_out, d_out), (0, 2, 3, 1))
    u_grad = lax.dot_general(g, weights.reshape(n_in, n_out * d_out, d_in), (((2,), (1,)), ((0,), (0,))))
    return w_grad.astype(weights.dtype), jnp.moveaxis(u_grad, 0, 1).astype(u.dtype)


parent_major_predictions.defvjp(_parent_major_predictions_fwd, _parent_major_predictions_bwd)


def parent_major_routing(u_hat: jax.Array, num_iterations: int = 3, stop_gradient: bool = False,
                         return_coupling: bool = False, bias: jax.Array | None = None):  # fmt: skip
    """``capsjax.ops.dynamic_routing`` on parent-major predictions (same arguments and results).

    Args:
      u_hat: predictions ``[..., n_out, n_in, d]`` (parents first).
      num_iterations, stop_gradient, return_coupling, bias: as in ``capsjax.ops.dynamic_routing``.

    Returns:
      ``v`` ``[..., n_out, d]`` in ``u_hat``'s dtype, or ``(v, c)`` with ``c`` ``[..., n_in, n_out]`` (children
      first, as ``capsjax.ops.dynamic_routing`` returns it).
    """
    num_iterations, u, u_for_logits = routing_inputs(u_hat, num_iterations, stop_gradient, "[..., n_out, n_in, d]")
    n_out = u.shape[-3]

    def parents(s):  # s: [..., n_out, d]
        return squash(s if bias is None else s + jnp.broadcast_to(bias.astype(s.dtype), s.shape))

    def route(b, u):  # b: [..., n_out, n_in]
        c = jax.nn.softmax(b, axis=-2)  # over the parents j
        return c, parents(jnp.einsum("...ji,...jid->...jd", c, u))

    def agreement(u, v):
        return jnp.einsum("...jid,...jd->...ji", u, v)

    def uniform_route(u):  # b = 0: c = 1 / n_out, written without a softmax of zeros
        return parents(jnp.sum(u, axis=-2) / n_out)

    def iteration(_, b):
        _, v = route(b, u_for_logits)
        return b + agreement(u_for_logits, v)

    if num_iterations == 1:
        c = jnp.full(u.shape[:-1], 1.0 / n_out, u.dtype)
        v = uniform_route(u)
    else:
        # After the first iteration (b = 0) b is just the agreement with the uniformly routed v.
        b = agreement(u_for_logits, uniform_route(u_for_logits))
        b = lax.fori_loop(0, num_iterations - 2, iteration, b)
        c, v = route(b, u)
    c = jnp.swapaxes(c, -2, -1)
    v = v.astype(u_hat.dtype)
    return (v, c) if return_coupling else v
