"""Routing by agreement alone: forward and forward + backward of ``dynamic_routing`` on the MNIST model's û.

Compares capsjax's routing (first iteration written out, ``fori_loop`` unrolled), the same with ``unroll=False``, and
the textbook form of Procedure 1 (``b = 0``, then ``r`` rolled iterations each starting with a softmax) as a baseline;
prints one JSON line of median milliseconds.

    python benchmarks/routing.py --batch-size 100
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def textbook_routing(u_hat, num_iterations):
    """Procedure 1 as printed: b = 0; r times: c = softmax(b), v = squash(sum_i c u_hat), b += u_hat . v."""
    import jax
    import jax.numpy as jnp

    from capsjax import squash

    def body(_, carry):
        b, _ = carry
        v = squash(jnp.einsum("...ij,...ijd->...jd", jax.nn.softmax(b, axis=-1), u_hat))
        return b + jnp.einsum("...ijd,...jd->...ij", u_hat, v), v

    b = jnp.zeros(u_hat.shape[:-1], u_hat.dtype)
    v = jnp.zeros(u_hat.shape[:-3] + u_hat.shape[-2:], u_hat.dtype)
    return jax.lax.fori_loop(0, num_iterations, body, (b, v))[1]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    import jax
    import jax.numpy as jnp

    from capsjax import dynamic_routing

    u_hat = 0.05 * jax.random.normal(jax.random.key(0), (args.batch_size, 1152, 10, 16))
    target = jax.random.normal(jax.random.key(1), (args.batch_size, 10, 16))
    result = {"batch_size": args.batch_size, "iterations": args.iterations, "backend": jax.default_backend()}
    variants = {
        "unrolled": lambda u: dynamic_routing(u, args.iterations),
        "rolled": lambda u: dynamic_routing(u, args.iterations, unroll=False),
        "textbook": lambda u: textbook_routing(u, args.iterations),
    }
    reference = jax.jit(variants["unrolled"])(u_hat)
    for label, routing in variants.items():
        assert jnp.allclose(jax.jit(routing)(u_hat), reference, rtol=1e-4, atol=1e-6), label
        forward = jax.jit(routing)
        both = jax.jit(jax.grad(lambda u, routing=routing: jnp.sum(routing(u) * target)))
        for name, fn in (("forward", forward), ("forward_backward", both)):
            jax.block_until_ready(fn(u_hat))
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                jax.block_until_ready(fn(u_hat))
                times.append(time.perf_counter() - start)
            result[f"{label}_{name}_ms"] = round(1000 * statistics.median(times), 1)
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
