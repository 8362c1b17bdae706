"""EM routing of matrix capsules (Hinton, Sabour & Frosst, *Matrix Capsules with EM Routing*, ICLR 2018).

Each child ``i`` (pose matrix ``M_i``, activation ``a_i``) votes ``V_ij = M_i W_ij`` for each parent ``j``. A parent is
a Gaussian cluster over the ``H`` entries of the votes (``H = 16`` for 4x4 poses) with a diagonal covariance; EM fits
the clusters, each child's vote weighted by its activation. Procedure 1 of the paper, with ``R_ij = 1 / n_out``:

M-step (for every parent ``j`` and pose entry ``h``)::

    R_ij <- R_ij a_i
    mu_jh      = sum_i R_ij V_ijh / sum_i R_ij
    sigma_jh^2 = sum_i R_ij (V_ijh - mu_jh)^2 / sum_i R_ij
    cost_jh    = (beta_u + log sigma_jh) sum_i R_ij
    a_j        = logistic(lambda (beta_a - sum_h cost_jh))

E-step (for every child ``i``)::

    p_ij = prod_h N(V_ijh; mu_jh, sigma_jh^2)
    R_ij = a_j p_ij / sum_k a_k p_ik

``num_iterations`` M-steps with an E-step between each two; the parents' poses are ``mu_j`` (reshaped to the pose
matrix) and their activations the last ``a_j``.

The paper leaves several things open, and the public re-implementations disagree on them. What capsjax does:

1. *The scale of the cost.* ``sum_i R_ij`` grows with the number of children, so for a class-capsule layer fed by
   over a thousand children ``lambda (beta_a - sum_h cost_jh)`` saturates the logistic unless something rescales it.
   Re-implementations normalise the costs across parents (mean and standard deviation), use a tiny fixed ``lambda``
   (1e-3), or multiply the cost by a per-layer factor (``100 n_out / n_in`` with a final ``lambda`` of 0.01). capsjax
   multiplies ``sum_i R_ij`` by ``cost_scale``, by default ``n_out / n_in`` (so it is the mean activation a parent
   receives per child, about 1 whatever the layer's size).
2. *The inverse temperature schedule.* The paper says ``lambda`` grows over the iterations without a formula; we use
   the one the authors gave on OpenReview: ``lambda_t = final_lambda (1 - 0.95^(t+1))`` for iterations
   ``t = 0 .. num_iterations-1`` (``final_inverse_temperature``, 1 by default here). With 1, ``lambda_t`` is only 0.14
   at the third iteration, too cold for class scores trained towards 0.9 / 0.1 by a margin loss: capsjax's CapsNet
   uses 20 (``ModelConfig.routing_em_inverse_temperature``; the README gives the measurements).
3. *beta_u and beta_a.* Learned; one per parent capsule type (the authors' answer on OpenReview), so arrays of shape
   ``[n_out]`` here; scalars broadcast.
4. *log sigma.* Written as ``0.5 log(sigma^2 + epsilon)``: no square root, finite gradients when the votes agree.
5. *R_ij a_i.* The M-step weights by ``R_ij a_i`` without renormalising over the parents (one re-implementation
   renormalises, which cancels ``a_i``).
6. *The E-step's density.* Computed in the log domain; the ``-H/2 log(2 pi)`` term is the same for every parent and
   cancels in the normalisation over parents, so it is left out; ``log a_j`` is ``log_sigmoid`` of the M-step's logit.
7. *Gradients.* They flow through every iteration (some re-implementations stop them through ``R``).
8. *Coordinate addition* (adding the children's positions to the votes of the class capsules) belongs to the layer
   that makes the votes, not to the routing: add it to ``votes`` before calling.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from capsjax.ops import concrete, floating, reduction_dtype
from capsjax.routing._common import Routed, as_param, check_iterations, check_positive


def inverse_temperature(t, final_inverse_temperature: float = 1.0, dtype=jnp.float32) -> jax.Array:
    """``lambda_t = final (1 - 0.95^(t+1))`` at iteration ``t = 0, 1, ...`` (``t`` may be traced)."""
    t = jnp.asarray(t).astype(dtype)
    return final_inverse_temperature * (1.0 - jnp.power(jnp.asarray(0.95, dtype), t + 1.0))


def em(
    votes: jax.Array,
    activations: jax.Array,
    beta_u: jax.Array | float = 0.0,
    beta_a: jax.Array | float = 0.0,
    num_iterations: int = 3,
    *,
    final_inverse_temperature: float = 1.0,
    cost_scale: float | None = None,
    epsilon: float = 1e-6,
) -> Routed:
    """EM routing (Procedure 1 of Hinton, Sabour & Frosst, 2018; the module docstring lists the choices made).

    Args:
      votes: ``V`` ``[..., n_in, n_out, *pose]``, e.g. pose ``(4, 4)``; the ``H`` pose entries are routed as a vector.
      activations: the children's ``a_i`` ``[..., n_in]`` in ``[0, 1]`` (checked where concrete, not under ``jit``).
      beta_u, beta_a: learned offsets of the cost and of the activation, scalars or ``[n_out]``.
      num_iterations: EM iterations (3 in the paper): as many M-steps, with an E-step between each two.
      final_inverse_temperature: ``final_lambda > 0`` of the schedule ``lambda_t = final_lambda (1 - 0.95^(t+1))``:
        its limit, not the last ``lambda`` used (about 0.14 ``final_lambda`` at 3 iterations).
      cost_scale: ``> 0``, multiplies ``sum_i R_ij a_i`` in the cost; ``None``: ``n_out / n_in``.
      epsilon: ``> 0``, added to ``sum_i R_ij a_i`` before dividing and to the variances.

    Returns:
      :class:`Routed`: poses ``mu`` ``[..., n_out, *pose]`` (votes' dtype), activations ``a_j`` ``[..., n_out]``,
      assignments ``R`` ``[..., n_in, n_out]`` of the last E-step (uniform with one iteration), summing to 1 over
      ``n_out``.
    """
    check_iterations(num_iterations)
    check_positive(epsilon, "EM routing: epsilon", "it keeps the variances and the division by sum_i R_ij a_i > 0")
    check_positive(final_inverse_temperature, "EM routing: final_inverse_temperature", "0 makes every a_j 0.5")
    if cost_scale is not None:
        check_positive(cost_scale, "EM routing: cost_scale", "None: n_out / n_in")
    votes, activations = jnp.asarray(votes), jnp.asarray(activations)
    lead = activations.shape[:-1]  # the children's activations fix where the pose axes start
    if activations.ndim < 1 or votes.ndim < activations.ndim + 2 or votes.shape[: activations.ndim] != activations.shape:
        raise ValueError(f"EM routing: votes [..., n_in, n_out, *pose] and activations [..., n_in] do not match: "
                         f"{votes.shape} and {activations.shape}")  # fmt: skip
    votes, activations = floating(votes, "EM routing: votes"), floating(activations, "EM routing: activations")
    n_in, n_out = votes.shape[len(lead) : len(lead) + 2]
    if n_in == 0 or n_out == 0:
        raise ValueError(f"EM routing needs at least one child and one parent capsule, got votes {votes.shape}")
    values = concrete(activations)  # checked where known (not when traced)
    if values is not None:
        low, high = float(np.min(values)), float(np.max(values))
        if not 0.0 <= low <= high <= 1.0:  # NaN too
            raise ValueError(
                f"EM routing: activations must be probabilities in [0, 1], got values in [{low:g}, {high:g}] "
                "(logits? pass jax.nn.sigmoid of them)"
            )
    pose = votes.shape[len(lead) + 2 :]
    dtype = reduction_dtype(votes.dtype, activations.dtype)
    v = votes.astype(dtype).reshape(*lead, n_in, n_out, math.prod(pose))  # [..., i, j, H]
    a_in = activations.astype(dtype)[..., None]  # [..., i, 1]
    beta_u = as_param(beta_u, dtype, (n_out,), "beta_u")[:, None]  # [j, 1]
    beta_a = as_param(beta_a, dtype, (n_out,), "beta_a")
    scale = n_out / n_in if cost_scale is None else cost_scale

    def m_step(r, t):  # r [..., i, j] -> mu, var [..., j, H], logit of a_j [..., j]
        weighted = r * jnp.broadcast_to(a_in, r.shape)
        total = jnp.sum(weighted, axis=-2)  # [..., j]
        coeff = (weighted / (total[..., None, :] + epsilon))[..., None]  # [..., i, j, 1]
        mu = jnp.sum(coeff * v, axis=-3)  # [..., j, H]
        var = jnp.sum(coeff * jnp.square(v - mu[..., None, :, :]), axis=-3) + epsilon
        cost = (jnp.broadcast_to(beta_u, var.shape) + 0.5 * jnp.log(var)) * (scale * total)[..., None]
        lam = inverse_temperature(t, final_inverse_temperature, dtype)
        logit = lam * (jnp.broadcast_to(beta_a, total.shape) - jnp.sum(cost, axis=-1))
        return mu, var, logit

    def e_step(mu, var, logit):  # -> r [..., i, j]
        mu, var = mu[..., None, :, :], var[..., None, :, :]
        log_p = -jnp.sum(jnp.square(v - mu) / (2.0 * var) + 0.5 * jnp.log(var), axis=-1)  # [..., i, j]
        return jax.nn.softmax(log_p + jax.nn.log_sigmoid(logit)[..., None, :], axis=-1)

    def iteration(t, r):
        return e_step(*m_step(r, t))

    r = lax.fori_loop(0, num_iterations - 1, iteration, jnp.full((*lead, n_in, n_out), 1.0 / n_out, dtype))
    mu, _, logit = m_step(r, num_iterations - 1)
    return Routed(mu.reshape(*lead, n_out, *pose).astype(votes.dtype), jax.nn.sigmoid(logit), r)


def matrix_votes(weights: jax.Array, poses: jax.Array) -> jax.Array:
    """The votes of matrix capsules, ``V_ij = M_i W_ij`` (one ``einsum``; ``weights`` shared by the batch).

    Args:
      weights: ``W`` ``[n_in, n_out, k, q]`` (``4, 4`` in the paper).
      poses: ``M`` ``[..., n_in, p, k]``.

    Returns:
      ``[..., n_in, n_out, p, q]``.
    """
    weights, poses = floating(weights, "matrix_votes: weights"), floating(poses, "matrix_votes: poses")
    if weights.ndim != 4:
        raise ValueError(f"matrix_votes: weights must have shape [n_in, n_out, k, q], got {weights.shape}")
    n_in, _, k, _ = weights.shape
    if poses.ndim < 3 or poses.shape[-3] != n_in or poses.shape[-1] != k:
        raise ValueError(f"poses must have shape [..., {n_in}, p, {k}] for weights {weights.shape}, got {poses.shape}")
    return jnp.einsum("...ixk,ijky->...ijxy", poses, weights)
