"""Peak host memory of a CapsNet training step against the batch size.

Runs ``throughput.py --mode train`` in a fresh process per batch size (peak RSS is per process) and prints one JSON
line with the peak RSS per batch size, the fitted growth per image and the fixed part. Per image the step holds the
primary capsules' patch matrix (36 x 20736 floats = 3.0 MB; in the backward pass its gradient reuses that buffer) and
the routing tensors (1152 x 10 x 16 floats = 0.74 MB each). For scale, ``tiled_W_would_add_mb_per_image`` is what
one per-example copy of W would cost; that W is never tiled is checked on the compiled step's buffers by
``tests/test_model.py::test_train_step_never_tiles_the_routing_weights``.

    python benchmarks/memory.py --batch-sizes 32,64,128,256,512
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", default="32,64,128,256,512")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    script = Path(__file__).with_name("throughput.py")
    sizes, peaks = [], []
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        cmd = [sys.executable, str(script), "--mode", "train", "--batch-size", str(batch), "--steps", "1",
               "--repeats", "1", "--warmup", "0", "--dtype", args.dtype]  # fmt: skip
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        sizes.append(batch)
        peaks.append(json.loads(out)["peak_rss_mb"])
    slope, intercept = np.polyfit(sizes, peaks, 1)
    fit = np.polyval([slope, intercept], sizes)
    tiled_mb_per_image = 4 * 1152 * 10 * 16 * 8 / 2**20
    print(json.dumps({
        "batch_sizes": sizes,
        "peak_rss_mb": peaks,
        "mb_per_image": round(float(slope), 3),
        "fixed_mb": round(float(intercept), 1),
        "max_relative_deviation_from_linear": round(float(np.max(np.abs(fit - peaks) / peaks)), 3),
        "tiled_W_would_add_mb_per_image": round(tiled_mb_per_image, 2),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
