"""Routing by agreement (Sabour, Frosst & Hinton, *Dynamic Routing Between Capsules*, NIPS 2017), in the common
interface: :func:`capsjax.ops.dynamic_routing` with its coupling coefficients and the parents' lengths."""

from __future__ import annotations

import jax

from capsjax import ops
from capsjax.routing._common import Routed, check_iterations, check_vector_votes


def dynamic(
    u_hat: jax.Array, num_iterations: int = 3, *, stop_gradient: bool = False, bias: jax.Array | None = None
) -> Routed:
    """Procedure 1 of Sabour et al. (2017), computed by :func:`capsjax.ops.dynamic_routing`.

    ``b_ij = 0``; ``num_iterations`` times: ``c_i = softmax_j(b_i)`` (over the parents), ``s_j = sum_i c_ij u_hat_j|i``
    (eq. 2), ``v_j = squash(s_j) = |s_j|^2 / (1 + |s_j|^2) s_j / |s_j|`` (eq. 1), ``b_ij += u_hat_j|i . v_j``.
    A parent's length ``|v_j|`` is the probability that its entity exists (section 2).

    Args:
      u_hat: votes ``[..., n_in, n_out, d]`` (float32, float64 or bfloat16; the sums run in float32 or wider).
      num_iterations: ``r >= 1`` (3 in the paper).
      stop_gradient: gradients reach ``u_hat`` through the last iteration only.
      bias: optional ``[n_out, d]`` added to ``s_j`` (the authors' released code; not in the paper).

    Returns:
      :class:`Routed`: poses ``v`` ``[..., n_out, d]`` (votes' dtype), activations ``|v_j|`` ``[..., n_out]``
      (:func:`~capsjax.ops.safe_norm`: ``sqrt(|v_j|^2 + 1e-7)``, about 3e-4 for ``v_j = 0``),
      assignments = the last coupling coefficients ``c`` ``[..., n_in, n_out]``.
    """
    check_iterations(num_iterations)
    check_vector_votes(u_hat, "dynamic routing")
    v, c = ops.dynamic_routing(u_hat, num_iterations, stop_gradient, return_coupling=True, bias=bias)
    return Routed(v, ops.safe_norm(v.astype(c.dtype), axis=-1), c)
