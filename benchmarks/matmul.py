"""One matrix product in each precision: what XLA reaches on this machine, in GFLOP/s.

The shapes default to the primary-capsule convolution's forward product at batch 100 (3600 x 20736 by 20736 x 256:
the patches of 100 images by the 9x9x256 kernels of the 256 channels) and a square 4096 product. Each is timed in
float32, with bfloat16 operands accumulating in float32 (``preferred_element_type``, what ``--precision mixed``
does), and with a bfloat16 output; one JSON line with the median GFLOP/s of each and the machine.

    python benchmarks/matmul.py
    python benchmarks/matmul.py --shapes 3600x20736x256 --repeats 5
    python benchmarks/matmul.py --gradients --shapes 3600x2304x256

``--gradients`` times instead the two gradient products of ``a [M, K] @ b [K, N]`` as capsjax's convolutions compute
them, ``g @ b.T`` and the transposed weight gradient ``g.T @ a``, in float32 and with bfloat16 operands, each with the
transpose left to XLA (which folds it into the product) and written out in row-major order first
(:func:`capsjax.precision.row_major_transpose`, what ``--precision mixed`` does). The
default shape is then one kernel row of the primary-capsule convolution at batch 100 (3600 x 2304 by 2304 x 256).
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
                        help="comma-separated MxKxN products (default 3600x20736x256,4096x4096x4096; with "
                             "--gradients 3600x2304x256)")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--gradients", action="store_true", help="time the two gradient products (module docstring)")
    args = parser.parse_args(argv)
    if args.shapes is None:
        args.shapes = [(3600, 2304, 256)] if args.gradients else [(3600, 20736, 256), (4096, 4096, 4096)]
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    import _setup  # noqa: E402  (after the flags: --help does not wait for JAX)
    import jax
    import jax.numpy as jnp

    if args.gradients:
        return _gradients(args, jax, jnp, _setup)
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


def _gradients(args, jax, jnp, _setup) -> dict:
    from capsjax.precision import row_major_transpose

    def product(x, y):
        return jnp.dot(x, y, preferred_element_type=jnp.float32)

    results = []
    for m, k, n in args.shapes:
        a = jax.random.normal(jax.random.key(0), (m, k), jnp.float32)
        b = jax.random.normal(jax.random.key(1), (k, n), jnp.float32)
        g = jax.random.normal(jax.random.key(2), (m, n), jnp.float32)
        record = {"shape": [m, k, n], "gflop": round(2 * m * k * n / 1e9, 2)}
        for dtype_name, dtype in (("float32", jnp.float32), ("bfloat16_operands", jnp.bfloat16)):
            a_c, b_c, g_c = jax.block_until_ready((a.astype(dtype), b.astype(dtype), g.astype(dtype)))
            timed = {
                "input_grad_folded": (lambda g, b: product(g, b.T), g_c, b_c),
                "input_grad_row_major": (lambda g, b: product(g, row_major_transpose(b)), g_c, b_c),
                "weight_grad_folded": (lambda g, a: product(g.T, a), g_c, a_c),
                "weight_grad_row_major": (lambda g, a: product(row_major_transpose(g), a), g_c, a_c),
            }
            for name, (fn, *operands) in timed.items():
                seconds = _setup.median_seconds(jax.jit(fn), *operands, repeats=args.repeats)
                record[f"{dtype_name}_{name}_gflop_per_s"] = round(2 * m * k * n / seconds / 1e9, 1)
        results.append(record)
    out = {"gradient_products": results, "repeats": args.repeats, "machine": _setup.machine()}
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main()
