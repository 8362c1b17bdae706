"""Where a training step's time and memory go: one JSON line, and with ``--top N`` the N costliest XLA ops.

Compiles the default CapsNet's train step (as ``throughput.py`` does), then reports the compile time, XLA's scratch
("temp") memory for the step, the median step time, and the page faults and kernel CPU time per step (``getrusage``).
``--top N`` also traces a few steps with ``jax.profiler`` and prints the N ops with the most time, summed over threads,
with their output shapes. Like the CLIs it restarts with huge pages where they apply (``--no-huge-pages`` to skip).

    python benchmarks/profile_step.py --batch-size 100 --top 20
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--steps", type=int, default=8, help="timed steps (after 2 warm-up steps)")
    parser.add_argument("--top", type=int, default=0, help="print the N costliest XLA ops of a traced step")
    parser.add_argument("--precision", default="float32", choices=("float32", "mixed"), help="capsjax.precision")
    parser.add_argument("--no-huge-pages", action="store_true", help="skip the restart with huge pages")
    return parser.parse_args(argv)


def op_table(trace_dir: Path, hlo_text: str, steps: int, top: int) -> list[str]:
    """The ``top`` ops by total time per step in the trace, each with its output shape from the compiled HLO."""
    from jax.profiler import ProfileData

    shapes = {}
    for line in hlo_text.splitlines():
        match = re.match(r"\s+(?:ROOT )?%(\S+) = (\S+) ", line)
        if match:
            shapes[match.group(1)] = match.group(2).split("{")[0]
    totals = collections.Counter()
    for path in trace_dir.rglob("*.xplane.pb"):
        for plane in ProfileData.from_file(str(path)).planes:
            for line in plane.lines:
                if "python" in line.name:
                    continue
                for event in line.events:
                    if "ThunkExecutor" not in event.name:
                        totals[event.name] += event.duration_ns
    return [f"{ns / 1e6 / steps:8.1f} ms  {name:32s} {shapes.get(name, '')}" for name, ns in totals.most_common(top)]


def dot_types(hlo_text: str) -> dict[str, int]:
    """How many matrix products (dots and convolutions) of the compiled step have each ``lhs,rhs->result`` element
    type, e.g. ``"bf16,bf16->f32": 12``. On a CPU without bfloat16 arithmetic XLA converts the operands of
    mixed-precision products back to float32, which shows here as ``f32,f32->f32``."""
    types = dict(re.findall(r"%(\S+) = (\w+)\[", hlo_text))
    counts = collections.Counter()
    for match in re.finditer(r"= (\w+)\[\S* (?:dot|convolution)\(%([^,\s)]+), %([^,\s)]+)\)", hlo_text):
        result, lhs, rhs = match.groups()
        counts[f"{types.get(lhs, '?')},{types.get(rhs, '?')}->{result}"] += 1
    return dict(counts)


def main(argv=None) -> dict:
    args = parse_args(argv)
    import jax
    from _setup import build, machine, random_batch

    from capsjax.config import ModelConfig

    steps, state = build(ModelConfig(precision=args.precision), devices=1)
    images, labels = random_batch(steps, args.batch_size)
    start = time.perf_counter()
    compiled = steps.train.lower(state, images, labels).compile()
    compile_s = time.perf_counter() - start

    def step(state):
        state, metrics = compiled(state, images, labels)
        jax.block_until_ready(metrics)
        return state

    for _ in range(2):
        state = step(state)
    before, times = resource.getrusage(resource.RUSAGE_SELF), []
    for _ in range(args.steps):
        start = time.perf_counter()
        state = step(state)
        times.append(time.perf_counter() - start)
    after = resource.getrusage(resource.RUSAGE_SELF)
    result = {
        "batch_size": args.batch_size,
        **machine(),
        "precision": args.precision,
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
        "compile_s": round(compile_s, 2),
        "scratch_mb": round(compiled.memory_analysis().temp_size_in_bytes / 2**20, 1),
        "step_s": round(statistics.median(times), 4),
        "train_img_per_s": round(args.batch_size / statistics.median(times), 1),
        "page_faults_per_step": round((after.ru_minflt - before.ru_minflt) / args.steps),
        "kernel_cpu_s_per_step": round((after.ru_stime - before.ru_stime) / args.steps, 3),
        "compiled_dot_types": dot_types(compiled.as_text()),
    }
    print(json.dumps(result), flush=True)
    if args.top:
        with tempfile.TemporaryDirectory() as trace_dir:
            with jax.profiler.trace(trace_dir):
                for _ in range(3):
                    state = step(state)
            for line in op_table(Path(trace_dir), compiled.as_text(), 3, args.top):
                print(line)
    return result


if __name__ == "__main__":
    if "--no-huge-pages" not in sys.argv[1:]:
        from capsjax.fast.hostmem import reexec_with_huge_pages

        reexec_with_huge_pages()
    main()
