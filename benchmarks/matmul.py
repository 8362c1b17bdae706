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

    # each takes its operands as given: the bfloat16 ones are converted once, outside the timed call
    products = {
        "float32": jnp.dot,
        "bfloat16_operands_float32_accumulation": lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32),
        "bfloat16": jnp.dot,
    }
    results = []
    for m, k, n in args.shapes:
        a = jax.random.normal(jax.random.key(0), (m, k), jnp.float32)
        b = jax.random.normal(jax.random.key(1), (k, n), jnp.float32)
        a16, b16 = jax.block_until_ready((a.astype(jnp.bfloat16), b.astype(jnp.bfloat16)))
        record = {"shape": [m, k, n], "gflop": round(2 * m * k * n / 1e9, 2)}
        for name in VARIANTS:
            operands = (a, b) if name == "float32" else (a16, b16)
            seconds = _setup.median_seconds(jax.jit(products[name]), *operands, repeats=args.repeats)
            record[f"{name}_gflop_per_s"] = round(2 * m * k * n / seconds / 1e9, 1)
        results.append(record)
    out = {"products": results, "repeats": args.repeats, "machine": _setup.machine()}
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main()
