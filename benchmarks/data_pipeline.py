"""Input-pipeline costs per batch: host batching, the on-device random shift, MultiMNIST generation.

Loads MNIST from ``--data-dir`` (default: ``../shared/data/mnist`` beside the repository) or, when that is missing or
``--synthetic`` is given, 60,000 synthetic images; then times, per batch of ``--batch-size``:

- ``batches_ms``: :func:`capsjax.data.batches` on the host (an epoch's seeded order, one gather per batch);
- ``prefetch_ms``: the same batches through :func:`capsjax.data.prefetch_to_device` (host batch + transfer);
- ``padded_ms``: :func:`capsjax.data.padded_batches` (evaluation's batches: in order, the last one zero-padded);
- ``random_shift_ms``: the jitted ``random_shift(key, uint8 batch, 2)`` on the default device (after compilation);
- ``multimnist_ms``: :func:`capsjax.data.multimnist_batches` on the host (36x36 pairs, two-hot labels, both digits).

With ``--grain`` (needs ``pip install grain``; not a capsjax dependency) the same epoch order is also timed through
Grain's ``MapDataset``, the loader of the current Flax examples:

- ``grain_per_example_ms``: ``MapDataset.source(examples).shuffle(seed).batch(B)`` (one ``(image, label)`` read per
  example, then stacked), read by batch index;
- ``grain_index_batches_ms``: ``MapDataset.range(N).shuffle(seed).batch(B).map(gather)`` (one gather per batch, the
  fastest Grain equivalent of ``batches_ms``);
- ``grain_prefetch_ms``: the latter through ``grain.experimental.device_put`` (its thread prefetch + transfer).

Each figure is the median over ``--repeats`` windows. Prints one JSON line.

    python benchmarks/data_pipeline.py [--grain]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MNIST = ROOT.parent / "shared" / "data" / "mnist"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(DEFAULT_MNIST), help="a directory of MNIST IDX files")
    parser.add_argument("--synthetic", action="store_true", help="use 60,000 synthetic images instead of MNIST")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--batches", type=int, default=100, help="batches per timed window")
    parser.add_argument("--repeats", type=int, default=5, help="timed windows; the median is reported")
    parser.add_argument("--grain", action="store_true", help="also time Grain's equivalents (pip install grain)")
    return parser.parse_args(argv)


def _median_ms(run_window, repeats: int, per_window: int) -> float:
    """Median over ``repeats`` calls of ``run_window()`` (which does ``per_window`` batches) in ms per batch."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run_window()
        times.append((time.perf_counter() - start) / per_window * 1e3)
    return round(statistics.median(times), 4)


def main(argv=None) -> dict:
    args = parse_args(argv)
    import itertools

    import jax
    import jax.numpy as jnp
    import numpy as np

    from capsjax import data as datalib

    start = time.perf_counter()
    source = "synthetic"
    if not args.synthetic and Path(args.data_dir).is_dir():
        images, labels = datalib.load("mnist", "train", args.data_dir)
        source = "mnist"
    else:
        images, labels = datalib.load_synthetic(60000)
    load_s = time.perf_counter() - start
    bs, k = args.batch_size, args.batches

    def host_window():
        for x, y in itertools.islice(datalib.batches(images, labels, bs, seed=0, epoch=host_window.epoch), k):
            pass
        host_window.epoch += 1

    host_window.epoch = 0
    batches_ms = _median_ms(host_window, args.repeats, k)

    def prefetch_window():
        stream = datalib.batches(images, labels, bs, seed=1, epoch=0)
        last = None
        for last in datalib.prefetch_to_device(itertools.islice(stream, k)):
            pass
        jax.block_until_ready(last)

    prefetch_window()  # warm-up
    prefetch_ms = _median_ms(prefetch_window, args.repeats, k)

    def padded_window():
        for _ in itertools.islice(datalib.padded_batches((images, labels), bs), k):
            pass

    padded_ms = _median_ms(padded_window, args.repeats, k)

    shift = jax.jit(datalib.random_shift, static_argnums=2)
    batch = jax.device_put(jnp.asarray(images[:bs]))
    keys = jax.random.split(jax.random.key(0), k)
    shift(keys[0], batch, 2).block_until_ready()  # compile

    def shift_window():
        out = None
        for key in keys:
            out = shift(key, batch, 2)
        out.block_until_ready()

    shift_ms = _median_ms(shift_window, args.repeats, k)

    def multi_window():
        for _ in itertools.islice(datalib.multimnist_batches(images, labels, bs, seed=0, epoch=0), k):
            pass

    multi_ms = _median_ms(multi_window, args.repeats, k)

    result = {
        "benchmark": "data_pipeline",
        "source": source,
        "examples": len(images),
        "load_s": round(load_s, 3),
        "batch_size": bs,
        "batches_ms": batches_ms,
        "prefetch_ms": prefetch_ms,
        "random_shift_ms": shift_ms,
        "padded_ms": padded_ms,
        "multimnist_ms": multi_ms,
        "device": str(jax.devices()[0].device_kind),
        "platform": jax.devices()[0].platform,
        "jax": jax.__version__,
        "numpy": np.__version__,
    }
    if args.grain:
        result.update(_grain_figures(images, labels, bs, k, args.repeats))
    print(json.dumps(result))
    return result


def _grain_figures(images, labels, bs: int, k: int, repeats: int) -> dict:
    """Grain's equivalents of ``batches_ms`` and ``prefetch_ms`` (see the module docstring)."""
    import itertools

    import grain
    import jax

    class Examples:
        def __len__(self):
            return len(images)

        def __getitem__(self, i):
            return images[i], labels[i]

    per_example = grain.MapDataset.source(Examples()).shuffle(seed=0).batch(bs, drop_remainder=True)
    by_index = (
        grain.MapDataset.range(len(images)).shuffle(seed=0).batch(bs, drop_remainder=True)
        .map(lambda idx: (images[idx], labels[idx]))
    )  # fmt: skip

    def read(dataset):
        def window():
            for b in range(k):
                dataset[b]

        window()  # warm-up
        return _median_ms(window, repeats, k)

    def prefetch_window():
        last = None
        on_device = grain.experimental.device_put(by_index.to_iter_dataset(), jax.devices()[0])
        for last in itertools.islice(iter(on_device), k):
            pass
        jax.block_until_ready(last)

    prefetch_window()  # warm-up
    return {
        "grain_per_example_ms": read(per_example),
        "grain_index_batches_ms": read(by_index),
        "grain_prefetch_ms": _median_ms(prefetch_window, repeats, k),
    }


if __name__ == "__main__":
    main()
