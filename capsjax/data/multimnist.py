"""MultiMNIST (Sabour et al. 2017, section 6): pairs of overlapping digits, generated on the fly on the host."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from capsjax.data.pipeline import global_batches, local_slice, process_split

_MULTI_TAG = 0x3D3D  # keeps MultiMNIST's random streams apart from batches()'s


def two_hot(classes: np.ndarray, num_classes: int) -> np.ndarray:
    """Class ids ``int [B, k]`` -> ``float32 [B, num_classes]`` with a 1 at each id (k distinct ids: k ones)."""
    classes = np.asarray(classes)
    out = np.zeros((classes.shape[0], num_classes), np.float32)
    np.put_along_axis(out, classes.astype(np.intp), 1.0, axis=1)
    return out


def multimnist_batches(
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    canvas: int = 36,
    max_shift: int = 4,
    num_classes: int = 10,
    drop_remainder: bool = True,
    process_index: int | None = None,
    process_count: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """One epoch of MultiMNIST, generated on the fly.

    Each example overlays two digits of different classes: every image of the set is the first digit of one example
    per epoch (in a seeded order); the second is drawn uniformly from the images of the other classes. Each digit is
    placed at the centre of a ``canvas x canvas`` image and shifted by its own ``(dy, dx)`` uniform in
    ``[-max_shift, max_shift]``; the overlay is the pixel-wise maximum. Batch ``b`` of an epoch is a pure function of
    ``(seed, epoch, b)``, so resuming mid-epoch reproduces it.

    Args:
      images: ``uint8 [N, H, W, C]`` single digits; ``H + 2 max_shift <= canvas`` (MNIST: 28 + 2*4 = 36).
      labels: ``int [N]`` in ``[0, num_classes)``, with at least two classes present.
      batch_size: the GLOBAL batch size (see :func:`~capsjax.data.batches` for the process arguments and
        ``drop_remainder``).
      seed, epoch: select the pairs and the shifts.

    Yields:
      dicts of this process's slice of each global batch, ``B = batch_size // process_count``:
      ``images`` uint8 ``[B, canvas, canvas, C]`` (the overlays), ``labels`` float32 ``[B, num_classes]`` (two-hot),
      ``classes`` int32 ``[B, 2]``, ``digits`` uint8 ``[B, 2, canvas, canvas, C]`` (each digit alone on its canvas,
      the reconstruction targets).
    """
    n, h, w, c = images.shape
    if len(labels) != n:
        raise ValueError(f"{n} images but {len(labels)} labels")
    top, left = (canvas - h) // 2, (canvas - w) // 2
    if max_shift < 0 or top - max_shift < 0 or left - max_shift < 0 or canvas - top - h < max_shift:
        raise ValueError(f"{h}x{w} digits shifted by up to {max_shift} px do not fit a {canvas}x{canvas} canvas")
    labels = np.asarray(labels).astype(np.int64)
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes})")
    index, count = process_split(batch_size, process_index, process_count)
    # the examples sorted by class: the second digit of a class-c first digit is a uniform draw from the examples
    # outside c's block of that order
    by_class = np.argsort(labels, kind="stable")
    class_count = np.bincount(labels, minlength=num_classes)
    class_start = np.concatenate([[0], np.cumsum(class_count)[:-1]])
    if np.count_nonzero(class_count) < 2:
        raise ValueError("MultiMNIST needs examples of at least two classes")
    first_order = np.random.default_rng([seed, epoch, _MULTI_TAG]).permutation(n)
    rows, cols = np.arange(h), np.arange(w)
    for b, first in enumerate(global_batches(first_order, batch_size, drop_remainder)):
        # drawn for the whole global batch (the same on every process), then sliced
        rng = np.random.default_rng([seed, epoch, _MULTI_TAG, b])
        cls = labels[first]
        r = (rng.random(len(first)) * (n - class_count[cls])).astype(np.int64)
        second = by_class[np.where(r < class_start[cls], r, r + class_count[cls])]
        shifts = rng.integers(-max_shift, max_shift + 1, (len(first), 2, 2))  # [B, digit, (dy, dx)]
        part = local_slice(len(first), index, count)
        pair = np.stack([first[part], second[part]], axis=1)  # [B, 2]
        y0 = top + shifts[part, :, 0]  # [B, 2]
        x0 = left + shifts[part, :, 1]
        digits = np.zeros((len(pair), 2, canvas, canvas, c), np.uint8)
        bi = np.arange(len(pair))[:, None, None, None]
        ki = np.arange(2)[None, :, None, None]
        digits[bi, ki, (y0[:, :, None] + rows)[..., None], (x0[:, :, None] + cols)[:, :, None, :]] = images[pair]
        classes = labels[pair].astype(np.int32)
        yield {
            "images": digits.max(axis=1),
            "labels": two_hot(classes, num_classes),
            "classes": classes,
            "digits": digits,
        }
