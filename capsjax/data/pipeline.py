"""The host input pipeline: seeded epochs of batches, evaluation's padded batches, prefetching to the devices.

A global batch of ``B`` examples is split between ``P`` processes (hosts) by :func:`local_slice` alone: process ``p``
takes the ``p``-th contiguous part, so the parts, in process order, make the global batch. Training batches
(:func:`batches`), evaluation batches (:func:`padded_batches`) and MultiMNIST share it, which is what
``jax.make_array_from_process_local_data`` expects of a batch sharded along the mesh's ``data`` axis.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np


def num_batches(num_examples: int, batch_size: int, drop_remainder: bool = True) -> int:
    """Batches per epoch: ``num_examples // batch_size``, or rounded up when the remainder is kept."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return num_examples // batch_size if drop_remainder else -(-num_examples // batch_size)


def process_split(
    batch_size: int, process_index: int | None = None, process_count: int | None = None
) -> tuple[int, int]:
    """``(index, count)`` of this process, defaulting to JAX's view, checked against the GLOBAL ``batch_size``
    (a positive multiple of ``count``)."""
    count = jax.process_count() if process_count is None else process_count
    index = jax.process_index() if process_index is None else process_index
    if not 0 <= index < count:
        raise ValueError(f"process_index {index} is outside [0, {count})")
    if batch_size < 1 or batch_size % count:
        raise ValueError(f"the global batch size {batch_size} must be a positive multiple of process_count {count}")
    return index, count


def local_slice(length: int, index: int, count: int) -> slice:
    """Process ``index``'s contiguous part of a global batch of ``length`` rows split between ``count`` processes.

    Equal parts of ``length // count`` rows when ``count`` divides ``length`` (every full batch); otherwise (a
    partial last batch) the first ``length % count`` parts are one row longer, like ``np.array_split``."""
    size, extra = divmod(length, count)
    start = index * size + min(index, extra)
    return slice(start, start + size + (index < extra))


def global_batches(order: np.ndarray, batch_size: int, drop_remainder: bool) -> Iterator[np.ndarray]:
    """The consecutive ``batch_size`` pieces of ``order`` (the last one shorter, or dropped)."""
    for start in range(0, num_batches(len(order), batch_size, drop_remainder) * batch_size, batch_size):
        yield order[start : start + batch_size]


def batches(
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    shuffle: bool = True,
    drop_remainder: bool = True,
    process_index: int | None = None,
    process_count: int | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """One epoch of host-local training batches.

    The order is ``np.random.default_rng([seed, epoch]).permutation(N)``: a pure function of (seed, epoch), the same
    on every process, so a resumed run reproduces it and skipping ``k`` batches resumes mid-epoch.

    Args:
      images: ``[N, H, W, C]`` (any dtype; uint8 is kept).
      labels: ``[N]``.
      batch_size: the GLOBAL batch size, a multiple of ``process_count``.
      seed, epoch: select the order.
      shuffle: False keeps the data order.
      drop_remainder: drop the last partial batch (True) or yield it (smaller; with several processes, split as evenly
        as possible).
      process_index, process_count: this process and how many there are (default: ``jax.process_index()`` and
        ``jax.process_count()``).

    Yields:
      ``(images [B_local, H, W, C], labels int32 [B_local])`` with ``B_local = batch_size // process_count``: this
      process's :func:`local_slice` of each global batch.
    """
    n = len(images)
    if len(labels) != n:
        raise ValueError(f"{n} images but {len(labels)} labels")
    index, count = process_split(batch_size, process_index, process_count)
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    for global_idx in global_batches(order, batch_size, drop_remainder):
        idx = global_idx[local_slice(len(global_idx), index, count)]
        yield images[idx], np.asarray(labels[idx], np.int32)


def padded_batches(
    arrays: Sequence[np.ndarray],
    batch_size: int,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
) -> Iterator[tuple[np.ndarray, ...]]:
    """Every example once, in order, in global batches of exactly ``batch_size`` (for evaluation and prediction).

    The last global batch is zero-padded to ``batch_size`` and its padding masked out.

    Args:
      arrays: arrays of the same length ``N`` (e.g. ``(images, labels)``).
      batch_size: the GLOBAL batch size, a multiple of ``process_count``.
      process_index, process_count: as for :func:`batches`.

    Yields:
      ``(mask int32 [B_local], *arrays [B_local, ...])``: this process's :func:`local_slice` of each global batch
      (``B_local = batch_size // process_count``); ``mask`` is 1 on real examples and 0 on padding.
    """
    arrays = [np.asarray(a) for a in arrays]
    n = len(arrays[0])
    if any(len(a) != n for a in arrays):
        raise ValueError(f"arrays of different lengths: {[len(a) for a in arrays]}")
    index, count = process_split(batch_size, process_index, process_count)
    padded = np.arange(num_batches(n, batch_size, drop_remainder=False) * batch_size)
    for global_idx in global_batches(padded, batch_size, drop_remainder=True):
        idx = global_idx[local_slice(batch_size, index, count)]
        padding = idx >= n
        rows = np.where(padding, 0, idx)
        parts = []
        for a in arrays:
            part = a[rows]
            part[padding] = 0
            parts.append(part)
        yield (np.logical_not(padding).astype(np.int32), *parts)


def prefetch_to_device(iterator: Iterator[Any], size: int = 2, sharding: jax.sharding.Sharding | None = None):
    """Moves batches to the devices ``size`` steps ahead, on a background thread.

    Args:
      iterator: yields host batches (any pytree of NumPy arrays, e.g. ``(images, labels)``).
      size: how many device batches to hold ready.
      sharding: None puts each batch on the default device; otherwise each leaf is this process's slice of a global
        batch, assembled with ``jax.make_array_from_process_local_data(sharding, leaf)`` (works multi-host).

    Yields:
      The same pytrees with ``jax.Array`` leaves, in order. An exception in ``iterator`` is raised here; stopping early
      stops the thread.
    """
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    if sharding is None:
        put = jax.device_put
    else:

        def put(x):
            return jax.make_array_from_process_local_data(sharding, np.asarray(x))

    ready: queue.Queue = queue.Queue(maxsize=size)
    stop = threading.Event()
    end = object()

    def offer(item) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce():
        try:
            for batch in iterator:
                if not offer((jax.tree.map(put, batch), None)):
                    return
        except BaseException as err:  # noqa: BLE001 - handed to the consumer
            offer((None, err))
        else:
            offer((end, None))

    thread = threading.Thread(target=produce, daemon=True, name="capsjax-prefetch")
    thread.start()
    try:
        while True:
            item, err = ready.get()
            if err is not None:
                raise err
            if item is end:
                return
            yield item
    finally:
        stop.set()
        thread.join(timeout=5.0)
