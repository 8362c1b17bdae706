"""Peak host memory of a CapsNet training step against the batch size.

For each batch size, runs ``throughput.py --mode train`` in a fresh process (peak RSS is per process) and compiles the
train step here to read XLA's scratch ("temp") memory for it, then prints one JSON line: the peak RSS and the scratch
per batch size, and the scratch's growth per image from a linear fit.

The peak RSS is the larger of two moments: compiling the step (about 650 MiB, nearly independent of the batch) and
running it (the process's ~450 MiB after compilation, its freed compiler memory handed back by
``capsjax.fast.hostmem.trim_after_compiles``, plus the step's scratch). The scratch grows linearly with the batch: per
image it holds the routing tensors (1152 x 10 x 16 floats = 0.74 MB each), the first convolution's output and its
gradient (20 x 20 x 256 floats = 0.41 MB each) and one kernel row of the primary capsules' patches (36 x 9 x 256 floats =
0.33 MB; the convolution loops over kernel rows and never holds all nine). For scale,
``tiled_W_would_add_mb_per_image`` is what one per-example copy of W would cost; that W is never tiled is checked on
the compiled step's buffers by ``tests/test_model.py::test_train_step_never_tiles_the_routing_weights``.

    python benchmarks/memory.py --batch-sizes 32,64,128,256,512
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np


def scratch_mib(batch_sizes: list[int], precision: str) -> list[float]:
    """XLA's scratch memory of the default train step per batch size (compiled for abstract inputs, never run)."""
    import jax
    from _setup import build

    from capsjax.config import ModelConfig

    steps, state = build(dataclasses.replace(ModelConfig(), precision=precision), devices=1)
    sizes = []
    for batch in batch_sizes:
        images = jax.ShapeDtypeStruct((batch, 28, 28, 1), np.uint8, sharding=steps.data_sharding)
        labels = jax.ShapeDtypeStruct((batch,), np.int32, sharding=steps.data_sharding)
        compiled = steps.train.lower(state, images, labels).compile()
        sizes.append(round(compiled.memory_analysis().temp_size_in_bytes / 2**20, 1))
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", default="32,64,128,256,512")
    parser.add_argument("--precision", default="float32", choices=("float32", "mixed"))
    args = parser.parse_args()
    script = Path(__file__).with_name("throughput.py")
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    peaks = []
    for batch in sizes:
        cmd = [sys.executable, str(script), "--mode", "train", "--batch-size", str(batch), "--steps", "1",
               "--repeats", "1", "--warmup", "0", "--precision", args.precision]  # fmt: skip
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        peaks.append(json.loads(out)["peak_rss_mb"])
    scratch = scratch_mib(sizes, args.precision)
    slope, intercept = np.polyfit(sizes, scratch, 1)
    fit = np.polyval([slope, intercept], sizes)
    tiled_mib_per_image = 4 * 1152 * 10 * 16 * 8 / 2**20
    print(json.dumps({
        "batch_sizes": sizes,
        "peak_rss_mib": peaks,
        "scratch_mib": scratch,
        "scratch_mib_per_image": round(float(slope), 3),
        "scratch_fixed_mib": round(float(intercept), 1),
        "scratch_max_relative_deviation_from_linear": round(float(np.max(np.abs(fit - scratch) / scratch)), 3),
        "tiled_W_would_add_mib_per_image": round(tiled_mib_per_image, 2),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
