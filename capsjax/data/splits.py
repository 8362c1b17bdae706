"""The splits of a training run: train, validation (held out of train, or the test set) and test, from a config.

For ``dataset="multimnist"`` the training split holds the single digits that the training pairs are made from, on
the fly, each epoch (:meth:`Datasets.train_batches`); validation and test are fixed pair sets (from the held-out
training digits and from the test split), the same on every run, machine and process.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np

from capsjax.config import ConfigError, MultiMNISTConfig, TrainConfig
from capsjax.data.multimnist import multimnist_batches, multimnist_pairs
from capsjax.data.pipeline import batches
from capsjax.data.registry import load

_VALIDATION_SEED_TAG = 0x7A1  # the validation pairs' seed is [test_seed, tag]: apart from the test pairs


@dataclasses.dataclass
class Datasets:
    """Host-side splits.

    ``train``: uint8 images ``[N, H, W, C]`` and int32 labels ``[N]`` (for MultiMNIST, the digits pairs are made of).
    ``validation``, ``test``: ``(images, labels)``, or for MultiMNIST ``(images, labels, digits)`` (see
    :func:`pair_arrays`). ``pairs``: the MultiMNIST settings, None for a plain dataset.
    """

    train: tuple[np.ndarray, np.ndarray]
    validation: tuple[np.ndarray, ...]
    test: tuple[np.ndarray, ...]
    validation_name: str  # "validation" (held out of train) or "test"
    pairs: MultiMNISTConfig | None = None
    num_classes: int | None = None  # MultiMNIST: the length of the k-hot labels

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """The shape of one model input (for MultiMNIST, the canvas)."""
        return tuple(int(s) for s in self.test[0].shape[1:])

    def train_batches(self, batch_size: int, *, seed: int, epoch: int) -> Iterator[tuple[np.ndarray, ...]]:
        """One epoch of this process's training batches: ``(images, labels)``, or for MultiMNIST
        ``(images, labels, digits)`` (pairs made on the fly, an epoch one pass over the digits as bases). Batch ``b``
        is a pure function of ``(seed, epoch, b)``; ``N // batch_size`` batches either way."""
        images, labels = self.train
        if self.pairs is None:
            yield from batches(images, labels, batch_size, seed=seed, epoch=epoch)
            return
        p = self.pairs
        for batch in multimnist_batches(
            images, labels, batch_size, seed=seed, epoch=epoch, canvas=p.canvas, max_shift=p.shift, merge=p.merge,
            per_base_shift=p.per_base_shift, num_classes=self.num_classes,
        ):  # fmt: skip
            yield pair_arrays(batch)


def pair_arrays(pairs: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """MultiMNIST pairs (:mod:`capsjax.data.multimnist`) -> what the steps take: ``(images uint8 [B, H, W, C],
    labels float32 [B, K] (two-hot), digits uint8 [B, 2, H, W, C])``, the digits in ascending class order (the order
    in which the model reconstructs the classes a k-hot target names)."""
    order = np.argsort(pairs["classes"], axis=1, kind="stable")
    digits = np.take_along_axis(pairs["digits"], order[:, :, None, None, None], axis=1)
    return pairs["images"], pairs["labels"], digits


def load_datasets(config: TrainConfig) -> Datasets:
    """Loads train and test; holds the last ``validation_examples`` training examples out; applies ``train_examples``
    (for MultiMNIST, to the digits, then makes the fixed validation and test pairs)."""
    pairs = config.dataset == "multimnist"
    name = config.multimnist.digits if pairs else config.dataset
    images, labels = load(name, "train", config.data_dir)
    test = load(name, "test", config.data_dir)
    held_out = config.validation_examples
    if held_out >= len(images):
        raise ConfigError(f"validation_examples={held_out} leaves no training data ({len(images)} examples)")
    if held_out:
        validation = (images[-held_out:], labels[-held_out:])
        images, labels = images[:-held_out], labels[:-held_out]
    else:
        validation = test
    if config.train_examples is not None:
        images, labels = images[: config.train_examples], labels[: config.train_examples]
    name = "validation" if held_out else "test"
    if not pairs:
        return Datasets((images, labels), validation, test, name)
    p = config.multimnist
    num_classes = max(config.model.num_classes, int(max(labels.max(), test[1].max())) + 1)
    settings = dict(
        canvas=p.canvas, max_shift=p.shift, merge=p.merge, per_base_shift=p.per_base_shift, num_classes=num_classes
    )
    try:
        test_pairs = pair_arrays(multimnist_pairs(*test, p.test_pairs, seed=p.test_seed, **settings))
        validation_pairs = test_pairs
        if held_out:
            seed = [p.test_seed, _VALIDATION_SEED_TAG]
            validation_pairs = pair_arrays(multimnist_pairs(*validation, p.validation_pairs, seed=seed, **settings))
    except ValueError as err:
        raise ConfigError(f"multimnist: {err}") from None
    return Datasets((images, labels), validation_pairs, test_pairs, name, pairs=p, num_classes=num_classes)


def adapt_model_to_data(config: TrainConfig, datasets: Datasets) -> TrainConfig:
    """Takes the image shape and the class count from the data when the config's differ (e.g. CIFAR-10)."""
    shape = datasets.image_shape
    labels = np.concatenate([datasets.train[1].reshape(-1), datasets.test[1].reshape(-1)])
    num_classes = int(labels.max()) + 1 if datasets.pairs is None else datasets.test[1].shape[-1]
    num_classes = max(config.model.num_classes, num_classes)
    if shape == tuple(config.model.image_shape) and num_classes == config.model.num_classes:
        return config
    try:
        model = dataclasses.replace(config.model, image_shape=shape, num_classes=num_classes)
    except ValueError as err:
        raise ConfigError(f"the model does not fit {config.dataset} images of shape {shape}: {err}") from None
    return dataclasses.replace(config, model=model)


def load_split(config: TrainConfig, split: str) -> tuple[np.ndarray, ...]:
    """One split of a run's data for evaluation: ``load(dataset, split)`` (``"train"`` or ``"test"``), or for
    MultiMNIST the fixed ``"test"`` or ``"validation"`` pairs as :func:`load_datasets` makes them
    (``(images, labels, digits)``)."""
    if config.dataset != "multimnist":
        return load(config.dataset, split, config.data_dir)
    if split not in ("test", "validation"):
        raise ConfigError(f"MultiMNIST evaluates on its fixed 'test' or 'validation' pairs, not {split!r}")
    datasets = load_datasets(config)
    return datasets.test if split == "test" else datasets.validation
