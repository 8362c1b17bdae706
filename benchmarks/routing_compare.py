"""Step time and memory of the CapsNet training step for each routing algorithm, on the same backbone.

For each algorithm (``ModelConfig.routing``), in a fresh process (peak RSS is per process): the parameter count, the
compile time, the median seconds of a full training step (uint8 batch -> shift augmentation, forward, margin +
reconstruction loss, backward, Adam) over ``--repeats`` timed windows of ``--steps`` steps, XLA's scratch memory of
the compiled step and the process's peak RSS. Prints one JSON line with a record per algorithm.

Only ``dynamic`` has an XLA:CPU-tuned form (``capsjax.fast``, chosen by ``--kernels auto`` on CPU); the others run
their textbook ``einsum`` form everywhere. ``em`` also changes the primary capsules (4x4 pose matrices with an
activation, see ``capsjax.routing_layers``).

    python benchmarks/routing_compare.py --batch-size 100
    python benchmarks/routing_compare.py --routings dynamic,em --set model.routing_iterations=2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ROUTINGS = ("dynamic", "em", "inverted_attention", "self_attention")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--routings", default=",".join(ROUTINGS), help="comma-separated ModelConfig.routing values")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--steps", type=int, default=5, help="steps per timed window")
    parser.add_argument("--repeats", type=int, default=3, help="timed windows; the median is reported")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps after the compiling one")
    parser.add_argument("--preset", default="default", help="the config preset whose model is the backbone")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="config override, e.g. model.routing_iterations=2 (repeatable)")  # fmt: skip
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # one algorithm, in this process
    return parser.parse_args(argv)


def measure(args) -> dict:
    """One algorithm in this process: parameters, compile time, step time, scratch memory, peak RSS."""
    import jax
    import numpy as np
    from _setup import build, random_batch

    from capsjax.config import get_config, replace_path
    from capsjax.fast.hostmem import trim_after_compiles

    trim_after_compiles()  # as the training loop does
    config = get_config(args.preset)
    for item in [*args.set, f"model.routing={args.worker}"]:
        field, _, value = item.partition("=")
        config = replace_path(config, field, value)
    steps, state = build(config.model, devices=1)
    images, labels = random_batch(steps, args.batch_size, config.model)
    start = time.perf_counter()
    compiled = steps.train.lower(state, images, labels).compile()
    compile_s = time.perf_counter() - start
    holder = {"state": state}

    def train():
        holder["state"], metrics = compiled(holder["state"], images, labels)
        jax.block_until_ready(metrics["loss"])

    for _ in range(1 + args.warmup):
        train()
    windows = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        for _ in range(args.steps):
            train()
        windows.append((time.perf_counter() - start) / args.steps)
    return {
        "routing": args.worker,
        "routing_iterations": config.model.routing_iterations,
        "params": int(sum(np.size(x) for x in jax.tree.leaves(state.params))),
        "compile_s": round(compile_s, 2),
        "train_step_s": round(statistics.median(windows), 4),
        "train_img_per_s": round(args.batch_size / statistics.median(windows), 1),
        "scratch_mib": round(compiled.memory_analysis().temp_size_in_bytes / 2**20, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.worker is not None:
        record = measure(args)
        print(json.dumps(record), flush=True)
        return record
    routings = [r for r in args.routings.split(",") if r]
    unknown = sorted(set(routings) - set(ROUTINGS))
    if unknown:
        raise SystemExit(f"unknown routing {', '.join(unknown)}; choose from {', '.join(ROUTINGS)}")
    records = []
    for name in routings:
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--batch-size", str(args.batch_size),
               "--steps", str(args.steps), "--repeats", str(args.repeats), "--warmup", str(args.warmup),
               "--preset", args.preset, *[f"--set={item}" for item in args.set]]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{name}: the worker failed:\n{done.stderr[-3000:]}")
        records.append(json.loads(done.stdout.strip().splitlines()[-1]))
    import jax

    from capsjax.results import machine

    result = {"batch_size": args.batch_size, "preset": args.preset, "overrides": args.set,
              "backend": jax.default_backend(), "machine": machine(), "cpu_count": os.cpu_count(),
              "jax": jax.__version__, "routings": records}  # fmt: skip
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    if "--worker" in sys.argv[1:]:
        from capsjax.fast.hostmem import reexec_with_huge_pages

        reexec_with_huge_pages()  # as the CLIs do
    main()
