"""Flax NNX layers for the routing algorithms of :mod:`capsjax.routing`: a fully connected capsule layer that takes the
algorithm by name, and EM's primary matrix capsules.

:class:`CapsuleLayer` holds the vote weights and each algorithm's own learned parameters:

===================== ============================================ =================================================
routing               parameters                                    activations (class scores in [0, 1])
===================== ============================================ =================================================
``dynamic``           ``W [n_in, n_out, d_out, d_in]``              ``|v_j|``
``em``                ``W [n_in, n_out, p, p]``, ``beta_u``,        ``a_j`` of the last M-step
                      ``beta_a [n_out]``
``inverted_attention`` ``W``, Layer Normalization's ``ln_scale``,   ``sigmoid(readout . v_j + readout_bias)``: the
                      ``ln_offset [d_out]``, ``readout [d_out]``,   paper's linear classifier shared by the classes,
                      ``readout_bias []``                           squashed to [0, 1] for the margin loss
``self_attention``    ``W``, ``log_priors [n_in, n_out]``           ``|v_j|``
===================== ============================================ =================================================
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from capsjax import fast, ops
from capsjax import routing as algorithms
from capsjax.config import check_kernels
from capsjax.layers import Conv2D, resolve_kernels


def pose_side(pose_dim: int) -> int:
    """``p`` for ``p x p`` pose matrices of ``pose_dim = p * p`` entries; raises otherwise."""
    side = math.isqrt(pose_dim)
    if side * side != pose_dim:
        raise ValueError(f"EM routing needs square pose matrices: the capsule dimension {pose_dim} is not p * p "
                         f"(use 16 for 4x4 poses)")  # fmt: skip
    return side


class CapsuleLayer(nnx.Module):
    """Fully connected capsule layer routed by ``routing`` (a name in :data:`capsjax.routing.ALGORITHMS`).

    Vector routings take capsules ``u [..., n_in, in_dim]`` and vote ``u_hat = W u`` (one ``einsum``, ``W`` shared by
    the batch; ``dynamic`` uses :mod:`capsjax.fast` on CPU as :class:`capsjax.layers.RoutingCapsules` does). ``em``
    takes pose matrices ``[..., n_in, p, p]`` (or flattened, ``[..., n_in, p * p]``) and their activations
    ``[..., n_in]``, and votes ``V_ij = M_i W_ij``; ``in_dim == out_dim == p * p``.
    """

    def __init__(
        self,
        num_in: int,
        in_dim: int,
        num_out: int,
        out_dim: int,
        *,
        routing: str = "dynamic",
        num_iterations: int = 3,
        init_std: float = 0.1,
        em_inverse_temperature: float = 1.0,
        kernels: str = "auto",
        rngs: nnx.Rngs,
    ):
        algorithms.get(routing)  # raises for an unknown name
        check_kernels(kernels)
        init = nnx.initializers.normal(stddev=init_std)
        self.routing = routing
        self.num_iterations = num_iterations
        self.em_inverse_temperature = em_inverse_temperature
        self.kernels = kernels
        if routing == "em":
            side = pose_side(out_dim)
            if in_dim != out_dim:
                raise ValueError(f"EM routing maps p x p poses to p x p poses: in_dim {in_dim} must equal out_dim {out_dim}")
            self.W = nnx.Param(init(rngs.params(), (num_in, num_out, side, side)))
            self.beta_u = nnx.Param(jnp.zeros((num_out,)))
            self.beta_a = nnx.Param(jnp.zeros((num_out,)))
        else:
            self.W = nnx.Param(init(rngs.params(), (num_in, num_out, out_dim, in_dim)))
        if routing == "inverted_attention":
            self.ln_scale = nnx.Param(jnp.ones((out_dim,)))
            self.ln_offset = nnx.Param(jnp.zeros((out_dim,)))
            self.readout = nnx.Param(nnx.initializers.normal(stddev=out_dim**-0.5)(rngs.params(), (out_dim,)))
            self.readout_bias = nnx.Param(jnp.zeros(()))
        if routing == "self_attention":
            self.log_priors = nnx.Param(jnp.zeros((num_in, num_out)))

    def votes(self, u: jax.Array) -> jax.Array:
        """Capsules ``[..., n_in, in_dim]`` (EM: ``[..., n_in, p, p]`` too) -> votes ``[..., n_in, n_out, *pose]``."""
        w = self.W[...]
        n_in = w.shape[0]
        if self.routing == "em":
            side = w.shape[-1]
            if u.ndim >= 2 and u.shape[-2:] == (n_in, side * side):
                u = u.reshape(*u.shape[:-1], side, side)
            if u.ndim < 3 or u.shape[-3:] != (n_in, side, side):
                raise ValueError(f"CapsuleLayer(em) expects poses [B, {n_in}, {side}, {side}], got {u.shape}")
            return algorithms.matrix_votes(w, u)
        self._check_vectors(u)
        return ops.capsule_predictions(w, u)

    def _check_vectors(self, u: jax.Array) -> None:
        n_in, _, _, d_in = self.W.shape
        if u.ndim < 2 or u.shape[-2:] != (n_in, d_in):
            raise ValueError(f"CapsuleLayer expects capsules [B, {n_in}, {d_in}], got {u.shape}")
        ops.floating(u, "CapsuleLayer's capsules")  # (the fast kernels took integers the textbook ones refuse)

    def __call__(self, u: jax.Array, activations: jax.Array | None = None) -> algorithms.Routed:
        """Routes ``u`` (and, for EM, the children's ``activations``); returns a :class:`capsjax.routing.Routed`
        whose activations are the class scores of the table in the module docstring."""
        if self.routing != "em" and activations is not None:  # ignored, it would be a wrong model without a word
            raise ValueError(f"routing {self.routing!r} takes no activations: they are EM's")
        if self.routing == "em":
            if activations is None:
                raise ValueError("EM routing needs the children's activations [B, n_in]")
            return algorithms.em(self.votes(u), activations, self.beta_u[...], self.beta_a[...], self.num_iterations,
                                 final_inverse_temperature=self.em_inverse_temperature)
        if self.routing == "dynamic" and resolve_kernels(self.kernels) == "fast":
            n_in, n_out, d_out, d_in = self.W.shape
            self._check_vectors(u)
            u_hat = fast.parent_major_predictions(self.W[...], u.reshape(-1, n_in, d_in))
            v, c = fast.parent_major_routing(u_hat.reshape(*u.shape[:-2], n_out, n_in, d_out), self.num_iterations,
                                             return_coupling=True)  # fmt: skip
            return algorithms.Routed(v, ops.safe_norm(v.astype(c.dtype)), c)
        u_hat = self.votes(u)
        if self.routing == "dynamic":
            return algorithms.dynamic(u_hat, self.num_iterations)
        if self.routing == "self_attention":
            return algorithms.self_attention(u_hat, log_priors=self.log_priors[...])
        out = algorithms.inverted_attention(u_hat, self.num_iterations, scale=self.ln_scale[...],
                                         offset=self.ln_offset[...])  # fmt: skip
        poses = out.poses.astype(ops.reduction_dtype(out.poses.dtype))
        readout = jnp.broadcast_to(self.readout[...].astype(poses.dtype), poses.shape)
        scores = jax.nn.sigmoid(jnp.sum(poses * readout, axis=-1) + self.readout_bias[...].astype(poses.dtype))
        return out._replace(activations=scores)


class PrimaryMatrixCapsules(nnx.Module):
    """Primary capsules for EM routing: one convolution whose channels are, per position, ``num_maps`` pose matrices of
    ``pose_dim = p * p`` entries (linear, not squashed) and ``num_maps`` activations (logistic).

    Input ``[B, H, W, in_features]``; output poses ``[B, oh * ow * num_maps, pose_dim]`` and activations
    ``[B, oh * ow * num_maps]``, the capsules in the order of :class:`capsjax.layers.PrimaryCapsules`.
    """

    def __init__(self, in_features: int, num_maps: int = 32, pose_dim: int = 16, kernel_size: int = 9,
                 stride: int = 2, *, kernels: str = "auto", precision: str = "float32", rngs: nnx.Rngs):  # fmt: skip
        pose_side(pose_dim)
        self.conv = Conv2D(in_features, num_maps * (pose_dim + 1), kernel_size, stride, kernels=kernels,
                           precision=precision, rngs=rngs)  # fmt: skip
        self.num_maps = num_maps
        self.pose_dim = pose_dim

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        y = self.conv(x)  # [B, oh, ow, maps * (pose_dim + 1)]
        batch, oh, ow, _ = y.shape
        split = self.num_maps * self.pose_dim
        poses = y[..., :split].reshape(batch, oh * ow * self.num_maps, self.pose_dim)
        return poses, jax.nn.sigmoid(y[..., split:].reshape(batch, oh * ow * self.num_maps))
