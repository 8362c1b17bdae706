"""Routing algorithms behind one interface: pure functions of the votes, each returning a :class:`Routed`.

======================  ======================================  ===================================  ==========  =============
name                    paper                                   votes                                iterations  module
======================  ======================================  ===================================  ==========  =============
``dynamic``             Sabour, Frosst & Hinton, NIPS 2017      ``[..., n_in, n_out, d]``            3           ``agreement``
``em``                  Hinton, Sabour & Frosst, ICLR 2018      ``[..., n_in, n_out, p, p]`` + a_i   3           ``matrix_em``
``inverted_attention``  Tsai et al., ICLR 2020                  ``[..., n_in, n_out, d]``            2           ``inverted``
``self_attention``      Mazzia, Salvetti & Chiaberge, 2021      ``[..., n_in, n_out, d]``            none        ``efficient``
======================  ======================================  ===================================  ==========  =============

Every function takes the votes first, then its own parameters (learned ones as arrays: EM's ``beta_u``/``beta_a``,
Layer Normalization's ``scale``/``offset``, self-attention's ``log_priors``), and returns
``Routed(poses [..., n_out, *pose], activations [..., n_out] or None, assignments [..., n_in, n_out])``. The functions
hold no state and work under ``jit``, ``vmap`` and ``grad`` in float32, float64 and bfloat16 (the sums run in float32
or wider; the poses come back in the votes' dtype); iterations are a ``lax.fori_loop``. Each module's docstring has
the paper's equations and, for EM, the choices made where the paper is ambiguous.

    from capsjax import routing
    out = routing.em(votes, activations, beta_u, beta_a, num_iterations=3)
    fn = routing.get("self_attention")                      # by name, e.g. from a config field
"""

from __future__ import annotations

from typing import Callable

from capsjax.routing._common import Routed, layer_norm
from capsjax.routing.agreement import dynamic
from capsjax.routing.matrix_em import em, inverse_temperature, matrix_votes
from capsjax.routing.inverted import concurrent_inverted_attention, inverted_attention
from capsjax.routing.efficient import exp_squash, self_attention

ALGORITHMS: dict[str, Callable[..., Routed]] = {
    "dynamic": dynamic,
    "em": em,
    "inverted_attention": inverted_attention,
    "self_attention": self_attention,
}

__all__ = [
    "ALGORITHMS",
    "Routed",
    "get",
    "dynamic",
    "em",
    "inverted_attention",
    "concurrent_inverted_attention",
    "self_attention",
    "exp_squash",
    "matrix_votes",
    "inverse_temperature",
    "layer_norm",
]


def get(name: str) -> Callable[..., Routed]:
    """The routing function called ``name`` (one of :data:`ALGORITHMS`)."""
    if name not in ALGORITHMS:
        raise ValueError(f"unknown routing algorithm {name!r}; choose one of: {', '.join(ALGORITHMS)}")
    return ALGORITHMS[name]
