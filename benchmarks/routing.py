"""Routing by agreement alone: forward and forward + backward of ``dynamic_routing`` on the MNIST model's û.

Compares the default (first iteration written out, ``fori_loop`` unrolled) with ``unroll=False`` (one rolled loop body)
and prints one JSON line of median milliseconds.

    python benchmarks/routing.py --batch-size 100
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


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
    for unroll in (True, False):
        forward = jax.jit(lambda u, unroll=unroll: dynamic_routing(u, args.iterations, unroll=unroll))
        both = jax.jit(jax.grad(lambda u, unroll=unroll: jnp.sum(dynamic_routing(u, args.iterations, unroll=unroll) * target)))  # noqa: E501
        for name, fn in (("forward", forward), ("forward_backward", both)):
            jax.block_until_ready(fn(u_hat))
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                jax.block_until_ready(fn(u_hat))
                times.append(time.perf_counter() - start)
            result[f"{'unrolled' if unroll else 'rolled'}_{name}_ms"] = round(1000 * statistics.median(times), 1)
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
