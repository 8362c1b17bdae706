"""Full CapsNet training step with ``ModelConfig.kernels`` "fast" (capsjax.fast) vs "textbook" (capsjax.ops and
XLA's native convolution).

Prints one JSON line: median seconds per training step (forward, losses, backward, Adam) for each setting, and their
ratio. Example: python benchmarks/kernels.py --batch-size 100 --steps 3
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

import jax
from _setup import build, random_batch

from capsjax.config import ModelConfig


def time_train_step(kernels: str, batch_size: int, steps: int) -> tuple[float, float]:
    """(compile + first step seconds, median seconds of the following steps)."""
    step_fns, state = build(dataclasses.replace(ModelConfig(), kernels=kernels), max_shift=0)
    images, labels = random_batch(step_fns, batch_size)
    start = time.perf_counter()
    state, metrics = step_fns.train(state, images, labels)
    jax.block_until_ready(metrics)
    first = time.perf_counter() - start
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = step_fns.train(state, images, labels)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    return first, statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per setting (after the first)")
    parser.add_argument("--kernels", default="fast,textbook")
    args = parser.parse_args()
    result = {"backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind, "batch_size": args.batch_size}
    for kernels in args.kernels.split(","):
        first, median = time_train_step(kernels, args.batch_size, args.steps)
        result[f"{kernels}_first_step_s"] = round(first, 3)
        result[f"{kernels}_step_s"] = round(median, 4)
        result[f"{kernels}_train_img_per_s"] = round(args.batch_size / median, 1)
    if "fast_step_s" in result and "textbook_step_s" in result:
        result["textbook_over_fast"] = round(result["textbook_step_s"] / result["fast_step_s"], 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
