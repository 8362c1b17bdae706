"""How close to the 40x40 canvas's border the digits of the evaluation sets lie: for expanded MNIST's test set (fixed
offsets, MNIST's own margins kept) and for ``affine_mnist`` (capsjax's approximation of affNIST), the fraction of
the 10,000 MNIST test digits with any ink pixel within 1..6 px of the border. Prints one JSON line.

    python benchmarks/canvas_margins.py [--data-dir ../shared/data/mnist]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from capsjax.data import affine_mnist, fixed_placement, load


def near_border(images: np.ndarray, pixels: int) -> float:
    """The fraction of ``images`` [N, H, W, 1] with a non-zero pixel within ``pixels`` of the border."""
    ink = images[..., 0] > 0
    ring = np.ones(images.shape[1:3], bool)
    ring[pixels:-pixels, pixels:-pixels] = False
    return float((ink & ring).any(axis=(1, 2)).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"))
    args = parser.parse_args()
    images, labels = load("mnist", "test", args.data_dir)
    sets = {
        "expanded_mnist": fixed_placement(images, 40, "test"),
        "affine_mnist": affine_mnist(images, labels, "test")[0],
    }
    out = {name: {f"within_{p}px": near_border(x, p) for p in range(1, 7)} for name, x in sets.items()}
    print(json.dumps({"count": len(images), **out}))


if __name__ == "__main__":
    main()
