"""Non-iterative self-attention routing (Mazzia, Salvetti & Chiaberge, *Efficient-CapsNet: Capsule Network with
Self-Attention Routing*, Scientific Reports 2021; arXiv:2101.12491), section "Self-attention routing".

For each parent ``j`` the votes of all children form ``U_j`` ``[n_in, d]``; their self-attention matrix
``A_j = U_j U_j^T / sqrt(d)`` scores how much each child agrees with all the others, and the coupling is a softmax
over the parents of each child's total agreement::

    A_j,ik = u_hat_j|i . u_hat_j|k / sqrt(d)
    c_ij   = exp(sum_k A_j,ik) / sum_l exp(sum_k A_l,ik)               (softmax over the parents)
    s_j    = sum_i u_hat_j|i (c_ij + b_ij)                              (b: learned log priors [n_in, n_out])
    v_j    = (1 - exp(-|s_j|)) s_j / |s_j|                              (the paper's squash)

One pass, no iterations. ``sum_k A_j,ik = u_hat_j|i . (sum_k u_hat_j|k) / sqrt(d)``, so the ``[n_in, n_in]`` matrix
is never formed: the cost is that of one dynamic-routing iteration, whatever ``n_in``. As in the authors' code, the
priors are added to the coupling after the softmax.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from capsjax.ops import floating, reduction_dtype, safe_norm
from capsjax.routing._common import Routed, as_param, check_vector_votes


def exp_squash(s: jax.Array, axis: int = -1, epsilon: float = 1e-7) -> jax.Array:
    """Efficient-CapsNet's squash: ``(1 - exp(-|s|)) s / |s|``, with ``|s| = sqrt(sum s^2 + epsilon)`` so that
    ``exp_squash(0) = 0`` with a finite gradient. Lengths in ``[0, 1)``; more sensitive to small ``|s|`` than eq. 1."""
    s = floating(s, "exp_squash's input")
    x = s.astype(reduction_dtype(s.dtype))
    norm = safe_norm(x, axis=axis, epsilon=epsilon, keepdims=True)
    return (-jnp.expm1(-norm) / norm * x).astype(s.dtype)


def self_attention(u_hat: jax.Array, *, log_priors: jax.Array | None = None) -> Routed:
    """Efficient-CapsNet's self-attention routing (module docstring): one pass, no iterations.

    Args:
      u_hat: votes ``[..., n_in, n_out, d]`` (float32, float64 or bfloat16; the sums run in float32 or wider).
      log_priors: ``b`` ``[n_in, n_out]`` (or any shape that broadcasts to ``[..., n_in, n_out]``, e.g. per
        example) added to the coupling coefficients (None: 0); keyword-only, as the function has no iterations.

    Returns:
      :class:`Routed`: poses ``v`` ``[..., n_out, d]`` (votes' dtype), activations ``|v_j|`` ``[..., n_out]``
      (:func:`~capsjax.ops.safe_norm`: ``sqrt(|v_j|^2 + 1e-7)``, about 3e-4 for ``v_j = 0``), assignments ``c``
      ``[..., n_in, n_out]`` (before the priors are added), summing to 1 over ``n_out``.
    """
    u_hat = jnp.asarray(u_hat)
    u = check_vector_votes(u_hat, "self-attention routing")
    d = u.shape[-1]
    total = jnp.sum(u, axis=-3, keepdims=True)  # [..., 1, j, d]: sum_k u_hat_j|k
    agreement = jnp.sum(u * jnp.broadcast_to(total, u.shape), axis=-1) / jnp.sqrt(jnp.asarray(d, u.dtype))
    c = jax.nn.softmax(agreement, axis=-1)  # [..., i, j], over the parents
    weights = c if log_priors is None else c + as_param(log_priors, u.dtype, c.shape, "log_priors")
    v = exp_squash(jnp.einsum("...ij,...ijd->...jd", weights, u))
    return Routed(v.astype(u_hat.dtype), safe_norm(v, axis=-1), c)
