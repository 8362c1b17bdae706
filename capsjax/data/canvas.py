"""Digits on a larger canvas, built on the host and fixed by a seed: the evaluation sets of expanded MNIST and the
affine-transformed MNIST test set (``affine_mnist``, an approximation of affNIST).

Expanded MNIST (Sabour et al. 2017, section 5.2) trains on each 28x28 digit placed at a random position of a 40x40
black canvas (on the device, every step: :func:`capsjax.data.augment.random_placement`); its validation and test sets
here use offsets drawn once from a fixed seed per split (:func:`fixed_placement`), the same for every run, model and
machine, so that two models are scored on the same images.

affNIST (Tieleman, 2013) is the MNIST digits under random small affine transformations on 40x40 canvases; the paper
scores CapsNet and its baseline CNN, both trained on expanded MNIST only, on it. Its files can't be downloaded here
(and TFDS has no affNIST: :mod:`capsjax.data.formats` reads the official ``.mat`` files). :func:`affine_transform`
builds an approximation from the MNIST test digits, within the ranges affNIST documents: rotation within +-20
degrees, shear within +-0.2, horizontal and vertical scaling in [0.8, 1.2], and a translation that keeps the whole
digit on the canvas. The draws, the order in which the transformations compose and the interpolation (bilinear) are
capsjax's own, so results on ``affine_mnist`` are not affNIST results and are always reported under their own name.
"""

from __future__ import annotations

import numpy as np

EXPANDED_SEED = 0xE40  # with the split's tag, the seed of the fixed placements of expanded MNIST's evaluation sets
AFFINE_SEED = 0xAFF  # with the split's tag, the seed of affine_mnist's transformations
SPLIT_TAGS = {"train": 0, "validation": 1, "test": 2}

AFFINE_MNIST_NOTE = (
    "affine_mnist is capsjax's approximation of affNIST (the MNIST test digits under seeded random affine maps within "
    "affNIST's documented ranges, on 40x40), not affNIST itself"
)
DATASET_NOTES = {"affine_mnist": AFFINE_MNIST_NOTE}
"""What an evaluation of these datasets reports beside its numbers."""

# affNIST's ranges (its documentation): rotation, shear, scaling; the translation keeps the digit on the canvas
MAX_ROTATION_DEGREES = 20.0
MAX_SHEAR = 0.2
SCALE_RANGE = (0.8, 1.2)


def place_on_canvas(images: np.ndarray, offsets: np.ndarray, canvas_size: int) -> np.ndarray:
    """Each image ``[N, H, W, C]`` on a black ``canvas_size`` canvas with its top-left corner at its own ``(dy, dx)``
    (``offsets`` int ``[N, 2]``, each within ``[0, canvas_size - H] x [0, canvas_size - W]``)."""
    n, h, w, c = images.shape
    offsets = np.asarray(offsets)
    if canvas_size < max(h, w):
        raise ValueError(f"a {canvas_size}x{canvas_size} canvas cannot hold {h}x{w} images")
    room = canvas_size - np.array([h, w])
    if offsets.shape != (n, 2) or offsets.min(initial=0) < 0 or np.any(offsets.max(0, initial=0) > room):
        raise ValueError(f"offsets must be [{n}, 2] within [0, {canvas_size - h}] x [0, {canvas_size - w}]")
    out = np.zeros((n, canvas_size, canvas_size, c), images.dtype)
    rows = offsets[:, 0, None] + np.arange(h)  # [N, H]
    cols = offsets[:, 1, None] + np.arange(w)  # [N, W]
    out[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]] = images
    return out


def fixed_placement(images: np.ndarray, canvas_size: int, split: str) -> np.ndarray:
    """Expanded MNIST's evaluation images: each digit at an offset uniform over the positions where it fits whole,
    drawn from the fixed seed of ``split`` ("validation", "test" or "train"): identical on every call."""
    n, h, w, _ = images.shape
    rng = np.random.default_rng([EXPANDED_SEED, SPLIT_TAGS[split]])
    dy = rng.integers(0, canvas_size - h + 1, n)
    dx = rng.integers(0, canvas_size - w + 1, n)
    return place_on_canvas(images, np.stack([dy, dx], axis=1), canvas_size)


def random_affine_matrices(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` matrices ``[n, 2, 2]`` acting on ``(x, y)``: rotation @ shear @ scaling, with the rotation uniform in
    +-20 degrees, the shear (``x += s y``) in +-0.2 and each scale in [0.8, 1.2]."""
    theta = np.deg2rad(rng.uniform(-MAX_ROTATION_DEGREES, MAX_ROTATION_DEGREES, n))
    shear = rng.uniform(-MAX_SHEAR, MAX_SHEAR, n)
    sx, sy = rng.uniform(*SCALE_RANGE, n), rng.uniform(*SCALE_RANGE, n)
    cos, sin, zero, one = np.cos(theta), np.sin(theta), np.zeros(n), np.ones(n)
    rotation = np.stack([np.stack([cos, -sin], -1), np.stack([sin, cos], -1)], -2)
    shearing = np.stack([np.stack([one, shear], -1), np.stack([zero, one], -1)], -2)
    scaling = np.stack([np.stack([sx, zero], -1), np.stack([zero, sy], -1)], -2)
    return rotation @ shearing @ scaling


def _digit_extent(image: np.ndarray) -> np.ndarray:
    """The corners ``[4, 2]`` (x, y) of the box around the image's non-zero pixels (the whole image if none)."""
    ys, xs = np.nonzero(image.max(axis=-1))
    if len(ys) == 0:
        ys, xs = np.array([0, image.shape[0] - 1]), np.array([0, image.shape[1] - 1])
    x0, x1, y0, y1 = xs.min() - 0.5, xs.max() + 0.5, ys.min() - 0.5, ys.max() + 0.5
    return np.array([[x0, y0], [x1, y0], [x0, y1], [x1, y1]])


def _bilinear(source: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``source`` [N, H, W, C] sampled at pixel coordinates ``x``, ``y`` [N, h, w] (zero outside)."""
    n, h, w, _ = source.shape
    padded = np.pad(source.astype(np.float32), ((0, 0), (1, 1), (1, 1), (0, 0)))
    x0, y0 = np.floor(x), np.floor(y)
    fx, fy = (x - x0)[..., None], (y - y0)[..., None]
    batch = np.arange(n)[:, None, None]

    def at(yy, xx):
        return padded[batch, np.clip(yy.astype(np.int64) + 1, 0, h + 1), np.clip(xx.astype(np.int64) + 1, 0, w + 1)]

    top = at(y0, x0) * (1 - fx) + at(y0, x0 + 1) * fx
    bottom = at(y0 + 1, x0) * (1 - fx) + at(y0 + 1, x0 + 1) * fx
    return top * (1 - fy) + bottom * fy


def affine_transform(
    images: np.ndarray, seed: int, canvas_size: int = 40, chunk: int = 1000
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each digit ``[N, H, W, C]`` (uint8) under its own random affine map (:func:`random_affine_matrices`, about
    the digit's image centre), moved to a uniformly drawn position where the whole transformed digit (its box of
    non-zero pixels) lies on a black ``canvas_size`` canvas, resampled bilinearly.

    Returns:
      ``(images uint8 [N, canvas, canvas, C], matrices [N, 2, 2], centres [N, 2])``: the map sends a source pixel
      ``p`` (x, y) to ``matrices @ (p - source centre) + centres``. A pure function of the arguments.
    """
    n, h, w, _ = images.shape
    rng = np.random.default_rng([AFFINE_SEED, seed])
    matrices = random_affine_matrices(rng, n)
    source_centre = np.array([(w - 1) / 2, (h - 1) / 2])
    centres = np.empty((n, 2))
    for i in range(n):  # the translation range depends on each digit's transformed extent
        corners = (_digit_extent(images[i]) - source_centre) @ matrices[i].T
        lo = -0.5 - corners.min(0)
        hi = canvas_size - 0.5 - corners.max(0)
        centres[i] = np.where(lo <= hi, rng.uniform(np.minimum(lo, hi), np.maximum(lo, hi)), (lo + hi) / 2)
    inverse = np.linalg.inv(matrices)
    grid_y, grid_x = np.meshgrid(np.arange(canvas_size, dtype=np.float64), np.arange(canvas_size, dtype=np.float64),
                                 indexing="ij")  # fmt: skip
    out = np.empty((n, canvas_size, canvas_size, images.shape[-1]), np.uint8)
    for lo in range(0, n, chunk):
        s = slice(lo, min(n, lo + chunk))
        dx = grid_x[None] - centres[s, 0, None, None]
        dy = grid_y[None] - centres[s, 1, None, None]
        inv = inverse[s, :, :, None, None]
        x = inv[:, 0, 0] * dx + inv[:, 0, 1] * dy + source_centre[0]
        y = inv[:, 1, 0] * dx + inv[:, 1, 1] * dy + source_centre[1]
        out[s] = np.clip(np.rint(_bilinear(images[s], x, y)), 0, 255).astype(np.uint8)
    return out, matrices, centres


def affine_mnist(images: np.ndarray, labels: np.ndarray, split: str, canvas_size: int = 40):
    """``affine_mnist``, an approximation of affNIST: the digits of one MNIST split under :func:`affine_transform`
    with the split's fixed seed. Returns ``(images uint8 [N, canvas, canvas, C], labels)``, the labels unchanged."""
    transformed, _, _ = affine_transform(images, SPLIT_TAGS[split], canvas_size)
    return transformed, labels
