"""Routing by agreement alone: forward and forward + backward on the MNIST model's û.

Compares ``capsjax.ops.dynamic_routing`` (Procedure 1 as printed, û ``[B, n_in, n_out, d]``) with
``capsjax.fast.parent_major_routing`` (û parent-major ``[B, n_out, n_in, d]``, the b = 0 iteration written out);
prints one JSON line of median milliseconds.

    python benchmarks/routing.py --batch-size 100
"""

from __future__ import annotations

import argparse
import json


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    import _setup  # noqa: E402  (after the flags: --help does not wait for JAX)
    import jax
    import jax.numpy as jnp

    from capsjax.fast import parent_major_routing
    from capsjax.ops import dynamic_routing

    u_hat = 0.05 * jax.random.normal(jax.random.key(0), (args.batch_size, 1152, 10, 16))
    target = jax.random.normal(jax.random.key(1), (args.batch_size, 10, 16))
    result = {"batch_size": args.batch_size, "iterations": args.iterations, "backend": jax.default_backend()}
    variants = {  # name -> (routing, its input layout)
        "textbook": (lambda u: dynamic_routing(u, args.iterations), u_hat),
        "fast": (lambda u: parent_major_routing(u, args.iterations), jnp.swapaxes(u_hat, 1, 2)),
    }
    reference = jax.jit(variants["textbook"][0])(u_hat)
    for label, (routing, u) in variants.items():
        assert jnp.allclose(jax.jit(routing)(u), reference, rtol=1e-4, atol=1e-6), label
        forward = jax.jit(routing)
        both = jax.jit(jax.grad(lambda u, routing=routing: jnp.sum(routing(u) * target)))
        for name, fn in (("forward", forward), ("forward_backward", both)):
            result[f"{label}_{name}_ms"] = round(1000 * _setup.median_seconds(fn, u, repeats=args.repeats), 1)
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
