"""One matrix product in each precision: what XLA reaches on this machine, in GFLOP/s.

The shapes default to the primary-capsule convolution's forward product at batch 100 (3600 x 20736 by 20736 x 256:
the patches of 100 images by the 9x9x256 kernels of the 256 channels) and a square 4096 product. Each is timed in
float32, with bfloat16 operands accumulating in float32 (``preferred_element_type``, what ``--precision mixed``
does), and with a bfloat16 output; one JSON line with the median GFLOP/s of each and the machine.

    python benchmarks/matmul.py
    python benchmarks/matmul.py --shapes 3600x20736x256 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

VARIANTS = ("float32", "bfloat16_operands_float32_accumulation", "bfloat16")


def parse_shape(text: str) -> tuple[int, int, int]:
    try:
        m, k, n = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape {text!r} is not MxKxN, e.g. 3600x20736x256") from None
    if min(m, k, n) < 1:
        raise argparse.ArgumentTypeError(f"shape {text!r} has a size below 1")
    return m, k, n


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", type=lambda s: [parse_shape(p) for p in s.split(",")],
                        default=[(3600, 20736, 256), (4096, 4096, 4096)],
                        help="comma-separated MxKxN products (default 3600x20736x256,4096x4096x4096)")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    import _setup  # noqa: E402  (after the flags: --help does not wait for JAX)
    import jax
    import jax.numpy as jnp

    products = {
        "float32": lambda a, b: jnp.dot(a, b),
        "bfloat16_operands_float32_accumulation": lambda a, b: jnp.dot(
            a.astype(jnp.bfloat16), b.astype(jnp.bfloat16), preferred_element_type=jnp.float32
        ),
        "bfloat16": lambda a, b: jnp.dot(a.astype(jnp.bfloat16), b.astype(jnp.bfloat16)),
    }
    results = []
    for m, k, n in args.shapes:
        a = jax.random.normal(jax.random.key(0), (m, k), jnp.float32)
        b = jax.random.normal(jax.random.key(1), (k, n), jnp.float32)
        record = {"shape": [m, k, n], "gflop": round(2 * m * k * n / 1e9, 2)}
        for name in VARIANTS:
            # the operands are converted outside the timed call: what is timed is the product alone
            fn = jax.jit(products[name])
            if name != "float32":
                a_in, b_in = jax.block_until_ready((a.astype(jnp.bfloat16), b.astype(jnp.bfloat16)))
            else:
                a_in, b_in = a, b
            jax.block_until_ready(fn(a_in, b_in))
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                jax.block_until_ready(fn(a_in, b_in))
                times.append(time.perf_counter() - start)
            record[f"{name}_gflop_per_s"] = round(2 * m * k * n / statistics.median(times) / 1e9, 1)
        results.append(record)
    out = {"products": results, "repeats": args.repeats, "machine": _setup.machine()}
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main()
