"""Training and inference throughput of the paper's CapsNet.

Times full training steps (uint8 batch -> on-device scaling and +-2 px shift augmentation, forward, margin +
reconstruction loss, backward, Adam update) and inference passes (forward with the decoder masked by the prediction)
after a warm-up, and prints one JSON line. The figure is the median over ``--repeats`` timed windows of ``--steps``
steps each.

    python benchmarks/throughput.py --batch-size 100
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import sys
import time


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--steps", type=int, default=10, help="steps per timed window")
    parser.add_argument("--repeats", type=int, default=3, help="timed windows; the median is reported")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after the compiling one")
    parser.add_argument("--precision", default="float32", choices=("float32", "mixed"), help="capsjax.precision")
    parser.add_argument("--kernels", default="auto", choices=("auto", "fast", "textbook"))
    parser.add_argument("--devices", type=int, default=None, help="devices in the data mesh (default: all)")
    parser.add_argument("--routing-stop-gradient", action="store_true", help="the non-default fast routing gradient")
    parser.add_argument("--mode", default="both", choices=("both", "train", "infer"))
    parser.add_argument(
        "--no-huge-pages", action="store_true", help="skip the restart with huge pages (capsjax.fast.hostmem)"
    )
    parser.add_argument("--no-heap-trim", action="store_true", help="keep the compiler's freed heap (capsjax.fast.hostmem)")
    return parser.parse_args(argv)


def _timed(fn, steps: int, repeats: int) -> list[float]:
    """Seconds per step of ``repeats`` windows of ``steps`` calls each (fn blocks on its result)."""
    windows = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        windows.append((time.perf_counter() - start) / steps)
    return windows


def _measure(fn, args) -> tuple[float, list[float]]:
    """Seconds of the first (compiling) call, then ``args.warmup`` untimed calls, then the timed windows."""
    start = time.perf_counter()
    fn()
    compile_s = round(time.perf_counter() - start, 2)
    for _ in range(args.warmup):
        fn()
    return compile_s, _timed(fn, args.steps, args.repeats)


def main(argv=None) -> dict:
    args = parse_args(argv)
    import jax
    from _setup import build, machine, random_batch

    from capsjax.config import ModelConfig
    from capsjax.fast.hostmem import trim_after_compiles

    if not args.no_heap_trim:
        trim_after_compiles()  # as the training loop does

    model_config = dataclasses.replace(
        ModelConfig(), precision=args.precision, kernels=args.kernels, routing_stop_gradient=args.routing_stop_gradient
    )
    steps, state = build(model_config, devices=args.devices or None)
    images, labels = random_batch(steps, args.batch_size)
    devices = list(steps.mesh.devices.flat)
    result = {
        "batch_size": args.batch_size,
        **machine(),
        "devices": len(devices),
        "precision": args.precision,
        "kernels": args.kernels,
        "routing_stop_gradient": args.routing_stop_gradient,
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
        "heap_trim": not args.no_heap_trim,
    }
    if args.mode in ("both", "train"):
        holder = {"state": state}

        def train():
            holder["state"], metrics = steps.train(holder["state"], images, labels)
            jax.block_until_ready(metrics["loss"])

        result["compile_s"], windows = _measure(train, args)
        result["train_step_s"] = round(statistics.median(windows), 4)
        result["train_img_per_s"] = round(args.batch_size / statistics.median(windows), 1)
        result["train_img_per_s_windows"] = [round(args.batch_size / w, 1) for w in windows]
        state = holder["state"]
    if args.mode in ("both", "infer"):
        params = state.params

        def infer():
            jax.block_until_ready(steps.predict(params, images).lengths)

        result["infer_compile_s"], windows = _measure(infer, args)
        result["infer_img_per_s"] = round(args.batch_size / statistics.median(windows), 1)
        result["infer_img_per_s_windows"] = [round(args.batch_size / w, 1) for w in windows]
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    if "--no-huge-pages" not in sys.argv[1:]:
        from capsjax.fast.hostmem import reexec_with_huge_pages

        reexec_with_huge_pages()  # as the CLIs do
    sys.exit(0 if main() else 1)
