"""MultiMNIST (Sabour et al. 2017, section 6): pairs of overlapping digits of different classes.

How a pair is made (the rules of the authors' released generator): each digit is zero-padded to the centre of a
``canvas x canvas`` image (36 x 36 for MNIST) and shifted by its own ``(dy, dx)``, each uniform in
``[-max_shift, max_shift]``, without wrap-around (pixels pushed past the border are dropped); the partner is a digit
of another class from the same split, drawn uniformly from all its digits of other classes; the two canvases are
merged pixel-wise, by default with the clipped sum ``min(a + b, 255)`` in uint8 (``merge="sum"``), or the maximum
(``merge="max"``). With ``per_base_shift`` (the authors' choice) a base digit's shift is drawn once, from the seed and
the digit's index alone, and reused for every pair it is the base of; the partner's shift is drawn per pair.

Two ways to get pairs, both pure NumPy functions of explicit seeds (no device count, no process count, no global
random state):

- :func:`multimnist_batches`: training batches made on the fly. An *epoch* is one pass over the base digits: every
  digit of the split is the base of exactly one pair, in a seeded order, so an epoch has ``N // batch_size`` batches
  and batch ``b`` of epoch ``e`` is a pure function of ``(seed, e, b)`` (a resumed run continues mid-epoch exactly).
- :func:`multimnist_pairs`: a fixed set of ``num_pairs`` pairs (the test set, the validation set): the same arrays
  for the same ``(digits, seed, settings)`` on every call, machine and process.

A pair's arrays: ``images`` uint8 ``[B, canvas, canvas, C]`` (the merge), ``classes`` int32 ``[B, 2]`` (base,
partner), ``digits`` uint8 ``[B, 2, canvas, canvas, C]`` (each digit alone on its shifted canvas: the reconstruction
targets) and ``labels`` float32 ``[B, num_classes]`` (two-hot).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from capsjax.data.pipeline import global_batches, local_slice, process_split

MERGES = ("sum", "max")

_MULTI_TAG = 0x3D3D  # keeps MultiMNIST's random streams apart from batches()'s
_BASE_SHIFT_TAG = 0xBA5E  # the per-base-digit shifts (no epoch in the seed: one shift per base digit)
_FIXED_SET_TAG = 0xF1ED  # multimnist_pairs


def two_hot(classes: np.ndarray, num_classes: int) -> np.ndarray:
    """Class ids ``int [B, k]`` -> ``float32 [B, num_classes]`` with a 1 at each id (k distinct ids: k ones)."""
    classes = np.asarray(classes)
    out = np.zeros((classes.shape[0], num_classes), np.float32)
    np.put_along_axis(out, classes.astype(np.intp), 1.0, axis=1)
    return out


def merge_digits(a: np.ndarray, b: np.ndarray, merge: str = "sum") -> np.ndarray:
    """Two uint8 canvases -> their overlay: ``min(a + b, 255)`` (``"sum"``, the authors' generator) or
    ``max(a, b)`` (``"max"``), uint8."""
    if merge == "sum":
        return np.minimum(a.astype(np.uint16) + b.astype(np.uint16), 255).astype(np.uint8)
    if merge == "max":
        return np.maximum(a, b)
    raise ValueError(f"merge must be one of {MERGES}, got {merge!r}")


def place_digits(images: np.ndarray, shifts: np.ndarray, canvas: int) -> np.ndarray:
    """Digits ``uint8 [B, H, W, C]`` centred on ``canvas x canvas`` zero images and moved by ``shifts``
    ``int [B, 2]`` (dy, dx) without wrap-around -> ``uint8 [B, canvas, canvas, C]``."""
    b, h, w, c = images.shape
    if h > canvas or w > canvas:
        raise ValueError(f"{h}x{w} digits do not fit a {canvas}x{canvas} canvas")
    margin = int(np.abs(shifts).max(initial=0))  # a wider board so that no index leaves it; cropped below
    board = np.zeros((b, canvas + 2 * margin, canvas + 2 * margin, c), np.uint8)
    y0 = margin + (canvas - h) // 2 + shifts[:, 0]  # [B]
    x0 = margin + (canvas - w) // 2 + shifts[:, 1]
    rows = (y0[:, None] + np.arange(h))[:, :, None]  # [B, H, 1]
    cols = (x0[:, None] + np.arange(w))[:, None, :]  # [B, 1, W]
    board[np.arange(b)[:, None, None], rows, cols] = images
    return board[:, margin : margin + canvas, margin : margin + canvas]


class _Partners:
    """Draws, for base digits, a partner uniformly among the digits of the other classes."""

    def __init__(self, labels: np.ndarray, num_classes: int):
        self.by_class = np.argsort(labels, kind="stable")
        self.count = np.bincount(labels, minlength=num_classes)
        self.start = np.concatenate([[0], np.cumsum(self.count)[:-1]])
        if np.count_nonzero(self.count) < 2:
            raise ValueError("MultiMNIST needs digits of at least two classes")

    def draw(self, rng: np.random.Generator, base_classes: np.ndarray) -> np.ndarray:
        # a uniform position outside the base class's block of the class-sorted order
        outside = len(self.by_class) - self.count[base_classes]
        r = (rng.random(len(base_classes)) * outside).astype(np.int64)
        return self.by_class[np.where(r < self.start[base_classes], r, r + self.count[base_classes])]


def _check(images, labels, canvas, max_shift, merge, num_classes) -> np.ndarray:
    n, h, w, _ = images.shape
    if len(labels) != n:
        raise ValueError(f"{n} images but {len(labels)} labels")
    if images.dtype != np.uint8:
        raise ValueError(f"MultiMNIST digits must be uint8 (0..255), got {images.dtype}")
    if h > canvas or w > canvas:
        raise ValueError(f"{h}x{w} digits do not fit a {canvas}x{canvas} canvas")
    if max_shift < 0:
        raise ValueError(f"max_shift must be >= 0, got {max_shift}")
    if merge not in MERGES:
        raise ValueError(f"merge must be one of {MERGES}, got {merge!r}")
    labels = np.asarray(labels).astype(np.int64)
    if n and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes})")
    return labels


def _seed(seed, *tags: int) -> list[int]:
    """A generator seed from ``seed`` (an int, or a sequence of ints) followed by ``tags``."""
    return [int(s) for s in np.atleast_1d(np.asarray(seed, np.int64))] + list(tags)


def _base_shifts(seed, n: int, max_shift: int) -> np.ndarray:
    """One ``(dy, dx)`` per base digit, ``int [n, 2]``: a function of ``seed`` and the digit's index only."""
    return np.random.default_rng(_seed(seed, _MULTI_TAG, _BASE_SHIFT_TAG)).integers(-max_shift, max_shift + 1, (n, 2))


def _compose(images, labels, pair, shifts, canvas, merge, num_classes) -> dict[str, np.ndarray]:
    """Pairs of digit indices ``[B, 2]`` with their shifts ``[B, 2, 2]`` -> the pair arrays (module docstring)."""
    b = len(pair)
    placed = place_digits(images[pair.reshape(-1)], shifts.reshape(-1, 2), canvas)
    digits = placed.reshape(b, 2, *placed.shape[1:])
    classes = labels[pair].astype(np.int32)
    return {
        "images": merge_digits(digits[:, 0], digits[:, 1], merge),
        "labels": two_hot(classes, num_classes),
        "classes": classes,
        "digits": digits,
    }


def multimnist_batches(
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    canvas: int = 36,
    max_shift: int = 4,
    merge: str = "sum",
    per_base_shift: bool = True,
    num_classes: int = 10,
    drop_remainder: bool = True,
    process_index: int | None = None,
    process_count: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """One epoch of MultiMNIST training pairs, generated on the fly.

    Every digit of ``images`` is the base of one pair per epoch, in the order
    ``default_rng([seed, tag, epoch]).permutation(N)``; the partners and the shifts of batch ``b`` come from
    ``default_rng([seed, epoch, tag, b])`` (the base shifts, with ``per_base_shift``, from ``seed`` alone). The random
    draws are made for the whole global batch, the same on every process, and each process composes its own slice.

    Args:
      images: ``uint8 [N, H, W, C]`` single digits (``H, W <= canvas``).
      labels: ``int [N]`` in ``[0, num_classes)``, at least two classes present.
      batch_size: the GLOBAL batch size (see :func:`~capsjax.data.batches` for the process arguments and
        ``drop_remainder``).
      seed, epoch: select the pairs and the shifts.
      canvas, max_shift, merge, per_base_shift: as in the module docstring (36, 4, "sum", True: the paper's 36 x 36
        canvas and +-4 px shifts, the authors' clipped sum and per-base shifts).

    Yields:
      dicts of this process's slice of each global batch (``B = batch_size // process_count``): ``images``,
      ``labels``, ``classes``, ``digits`` (see the module docstring).
    """
    labels = _check(images, labels, canvas, max_shift, merge, num_classes)
    n = len(images)
    index, count = process_split(batch_size, process_index, process_count)
    partners = _Partners(labels, num_classes)
    base_shifts = _base_shifts(seed, n, max_shift) if per_base_shift else None
    order = np.random.default_rng([seed, _MULTI_TAG, epoch]).permutation(n)
    for b, base in enumerate(global_batches(order, batch_size, drop_remainder)):
        rng = np.random.default_rng([seed, epoch, _MULTI_TAG, b])
        partner = partners.draw(rng, labels[base])
        shifts = rng.integers(-max_shift, max_shift + 1, (len(base), 2, 2))  # [B, (base, partner), (dy, dx)]
        if base_shifts is not None:
            shifts[:, 0] = base_shifts[base]
        part = local_slice(len(base), index, count)
        pair = np.stack([base[part], partner[part]], axis=1)
        yield _compose(images, labels, pair, shifts[part], canvas, merge, num_classes)


def multimnist_pairs(
    images: np.ndarray,
    labels: np.ndarray,
    num_pairs: int,
    *,
    seed: int | Sequence[int],
    canvas: int = 36,
    max_shift: int = 4,
    merge: str = "sum",
    per_base_shift: bool = True,
    num_classes: int = 10,
) -> dict[str, np.ndarray]:
    """A fixed MultiMNIST set of ``num_pairs`` pairs (e.g. the 10,000-pair test set from the MNIST test split).

    The bases run through seeded permutations of the digits (every digit once before any repeats); partners and
    shifts come from generators seeded with ``seed``, drawn element by element, so the first ``m`` pairs of a set
    of ``n > m`` are the set of ``m``. Nothing depends on the device or process count: every run, machine and
    process builds the same arrays, and evaluation slices them per process.

    Returns:
      ``{"images", "labels", "classes", "digits"}`` with ``num_pairs`` rows (see the module docstring).
    """
    labels = _check(images, labels, canvas, max_shift, merge, num_classes)
    n = len(images)
    if num_pairs < 1:
        raise ValueError(f"num_pairs must be >= 1, got {num_pairs}")
    if n == 0:
        raise ValueError("no digits to make pairs from")
    cycles = -(-num_pairs // n)
    base = np.concatenate(
        [np.random.default_rng(_seed(seed, _FIXED_SET_TAG, 0, c)).permutation(n) for c in range(cycles)]
    )[:num_pairs]
    # partners and shifts from two streams, element by element: a smaller set is the start of a larger one
    partner_rng, shift_rng = (np.random.default_rng(_seed(seed, _FIXED_SET_TAG, i)) for i in (1, 2))
    partner = _Partners(labels, num_classes).draw(partner_rng, labels[base])
    shifts = shift_rng.integers(-max_shift, max_shift + 1, (num_pairs, 2, 2))
    if per_base_shift:
        shifts[:, 0] = _base_shifts(seed, n, max_shift)[base]
    return _compose(images, labels, np.stack([base, partner], axis=1), shifts, canvas, merge, num_classes)
