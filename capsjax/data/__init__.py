"""Datasets and the input pipeline.

Sources, tried in this order by :func:`load`:

1. a local directory: ``data_dir`` if given, else ``$CAPSJAX_DATA/<name>``, else ``~/.cache/capsjax/<name>``. It holds
   the original distribution files: IDX (``train-images-idx3-ubyte[.gz]`` ...) for the MNIST family, the binary
   version (``data_batch_1.bin`` ...) for CIFAR-10, ``train_32x32.mat`` / ``test_32x32.mat`` for SVHN, ``test.mat``
   or ``test_batches/1.mat`` ... for affNIST (which TFDS does not have). Nothing is
   ever written into it. This path needs no network and no TensorFlow.
2. TensorFlow Datasets (the ``tfds`` extra), in ``$TFDS_DATA_DIR`` (default ``~/tensorflow_datasets``), read through
   its ArrayRecord data source. Preparing a dataset the first time downloads it (and TFDS needs TensorFlow for that
   step); reading an already prepared one does not.

:func:`download_mnist` fetches MNIST's IDX files from a public mirror into ``~/.cache/capsjax/mnist`` (path 1), for
runtimes without TensorFlow.

``"synthetic"`` needs neither: deterministic generated images whose class is recoverable, for tests and benchmarks.
``"affine_mnist"`` is built from the MNIST files: an approximation of affNIST (:mod:`~capsjax.data.canvas`).

Every problem with the inputs raises :class:`DataError`, whose message names the file or dataset and says what to do.

Images are ``uint8 [N, H, W, C]`` on the host and stay uint8 until they reach the device (a quarter of the bytes of
float32); :func:`random_shift` runs on the device inside the jitted step.

Modules: :mod:`~capsjax.data.registry` (the datasets and :func:`load`), :mod:`~capsjax.data.formats` (IDX, CIFAR-10
binary, SVHN ``.mat``), :mod:`~capsjax.data.tfds`, :mod:`~capsjax.data.synthetic`, :mod:`~capsjax.data.pipeline`
(batches, per-process slicing, prefetch), :mod:`~capsjax.data.augment` (on device), :mod:`~capsjax.data.multimnist`,
:mod:`~capsjax.data.splits` (a run's train / validation / test split from its config), :mod:`~capsjax.data.canvas`
(expanded MNIST's fixed evaluation sets, ``affine_mnist``).
"""

from capsjax.data.augment import (
    place_images,
    random_flip,
    random_placement,
    random_shift,
    shift_images,
    train_augmentation,
)
from capsjax.data.canvas import affine_mnist, affine_transform, fixed_placement, place_on_canvas
from capsjax.data.download import MNIST_MIRROR, download_mnist
from capsjax.data.errors import DATA_ENV, DataError
from capsjax.data.formats import read_idx, write_idx
from capsjax.data.multimnist import multimnist_batches, multimnist_pairs, two_hot
from capsjax.data.pipeline import batches, local_slice, num_batches, padded_batches, prefetch_to_device
from capsjax.data.registry import DATASETS, SPLITS, class_names, load
from capsjax.data.splits import (
    Datasets,
    adapt_model_to_data,
    arrays_sha256,
    load_also_test,
    load_datasets,
    load_eval_split,
    pair_arrays,
)
from capsjax.data.synthetic import load_synthetic

__all__ = [
    "DataError",
    "DATA_ENV",
    "DATASETS",
    "SPLITS",
    "load",
    "class_names",
    "load_synthetic",
    "Datasets",
    "load_also_test",
    "load_datasets",
    "pair_arrays",
    "adapt_model_to_data",
    "load_eval_split",
    "arrays_sha256",
    "read_idx",
    "write_idx",
    "download_mnist",
    "MNIST_MIRROR",
    "batches",
    "padded_batches",
    "local_slice",
    "num_batches",
    "prefetch_to_device",
    "shift_images",
    "random_shift",
    "place_images",
    "random_placement",
    "train_augmentation",
    "random_flip",
    "place_on_canvas",
    "fixed_placement",
    "affine_transform",
    "affine_mnist",
    "multimnist_batches",
    "multimnist_pairs",
    "two_hot",
]
