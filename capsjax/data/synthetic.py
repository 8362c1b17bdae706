"""The ``"synthetic"`` dataset: deterministic generated images whose class is recoverable, for tests and benchmarks."""

from __future__ import annotations

import numpy as np


def load_synthetic(
    n: int, image_shape: tuple[int, int, int] = (28, 28, 1), num_classes: int = 10, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic generated images whose class is recoverable from the pixels.

    Class ``k`` draws a stroke through (about) the centre at angle ``180° k / num_classes`` and a dot on a circle at
    angle ``360° k / num_classes``; length, thickness, brightness, position and angle jitter per example.

    Returns:
      ``(images, labels)``: images ``uint8 [n, *image_shape]``, labels ``int32 [n]``, a pure function of the arguments.
    """
    h, w, c = image_shape
    rng = np.random.default_rng([seed, 0x5EED])
    labels = rng.integers(0, num_classes, n).astype(np.int32)
    f32 = np.float32
    k = labels / num_classes
    angle = (np.pi * k + rng.uniform(-0.08, 0.08, n)).astype(f32)
    half_length = rng.uniform(0.45, 0.7, n).astype(f32)
    inv_thickness = 1 / rng.uniform(0.07, 0.11, n).astype(f32)
    centre = rng.uniform(-0.12, 0.12, (n, 2)).astype(f32)
    dot = centre + 0.62 * np.stack([np.sin(2 * np.pi * k), np.cos(2 * np.pi * k)], axis=-1).astype(f32)
    brightness = (255 * rng.uniform(0.75, 1.0, n)).astype(f32)
    colour = rng.uniform(0.4, 1.0, (n, c)).astype(f32) if c > 1 else np.ones((n, 1), f32)
    colour = colour / colour.max(axis=1, keepdims=True)
    # pixel centres in [-1, 1] (y down, x right)
    ys = (np.arange(h, dtype=np.float32) + 0.5) / h * 2 - 1
    xs = (np.arange(w, dtype=np.float32) + 0.5) / w * 2 - 1
    images = np.empty((n, h, w, c), np.uint8)
    for lo in range(0, n, 2048):  # bounded memory for large n
        s = slice(lo, min(n, lo + 2048))
        py = ys[None, :, None] - centre[s, 0, None, None]  # [b, h, 1]
        px = xs[None, None, :] - centre[s, 1, None, None]  # [b, 1, w]
        dy, dx = np.sin(angle[s])[:, None, None], np.cos(angle[s])[:, None, None]
        t = np.clip(py * dy + px * dx, -half_length[s, None, None], half_length[s, None, None])
        stroke = (np.square(py - t * dy) + np.square(px - t * dx)) * np.square(inv_thickness[s, None, None])
        spot = np.square(ys[None, :, None] - dot[s, 0, None, None]) + np.square(
            xs[None, None, :] - dot[s, 1, None, None]
        )
        value = np.exp(-np.minimum(stroke, spot * f32(1 / 0.12**2))) * brightness[s, None, None]
        images[s] = np.rint(value[..., None] * colour[s, None, None, :]).astype(np.uint8)
    return images, labels
