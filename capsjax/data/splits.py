"""The splits of a training run: train, validation (held out of train, or the test set) and test, from a config; and
any split or other dataset for evaluating a run (:func:`load_eval_split`).

With ``TrainConfig.canvas_size`` (expanded MNIST) the training digits stay at their own size (the train step places
them on the canvas at random offsets, :func:`capsjax.data.augment.random_placement`) and the validation and test
digits are placed at fixed, seeded offsets (:func:`capsjax.data.canvas.fixed_placement`), here and in evaluation.

For ``dataset="multimnist"`` the training split holds the single digits that the training pairs are made from, on
the fly, each epoch (:meth:`Datasets.train_batches`); validation and test are fixed pair sets (from the held-out
training digits and from the test split), the same on every run, machine and process.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterator

import numpy as np

from capsjax.config import ConfigError, MultiMNISTConfig, TrainConfig
from capsjax.data.canvas import fixed_placement
from capsjax.data.multimnist import multimnist_batches, multimnist_pairs
from capsjax.data.pipeline import batches
from capsjax.data.errors import DATA_ENV, HINT, DataError
from capsjax.data.registry import load

DERIVED_FROM = {"affine_mnist": "mnist"}
"""Datasets built from another one's files (read from the same ``data_dir``)."""

_VALIDATION_SEED_TAG = 0x7A1  # the validation pairs' seed is [test_seed, tag]: apart from the test pairs


def arrays_sha256(*arrays: np.ndarray) -> str:
    """A SHA-256 of arrays' values, dtypes, shapes and order: equal digests mean the same examples in the same
    order (a run's training data, or the test set two evaluations scored)."""
    digest = hashlib.sha256()
    for array in arrays:
        array = np.ascontiguousarray(array)
        digest.update(f"{array.dtype}{array.shape}".encode())
        digest.update(array.data)
    return digest.hexdigest()


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
    also_test: dict[str, tuple[np.ndarray, ...]] = dataclasses.field(default_factory=dict)  # load_also_test

    def fingerprint(self) -> str:
        """A SHA-256 of the training and validation arrays (values, shapes and order): a resumed run checks that it
        trains and validates on what it started with (other files, or a source that orders them differently, would
        mix held-out and training examples). The test set may change (e.g. ``multimnist.test_pairs``)."""
        return arrays_sha256(*self.train, *self.validation)

    def scored_sha256(self) -> dict[str, str]:
        """The :func:`arrays_sha256` of the validation and test sets, as :func:`load_eval_split` gives them: recorded
        with the run, so that ``eval.py`` can refuse to score other data as the run's own (``--data-dir`` of another
        dataset)."""
        return {"validation": arrays_sha256(*self.validation), "test": arrays_sha256(*self.test)}

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


def _on_canvas(config: TrainConfig, images: np.ndarray, split: str) -> np.ndarray:
    """``images`` at the fixed offsets of ``split`` on the config's canvas (unchanged without one)."""
    if not config.canvas_size:
        return images
    h, w = images.shape[1:3]
    if config.canvas_size < max(h, w):
        raise ConfigError(f"canvas_size={config.canvas_size} is smaller than the {h}x{w} {config.dataset} images")
    return fixed_placement(images, config.canvas_size, split)


def load_datasets(config: TrainConfig) -> Datasets:
    """Loads train and test; holds the last ``validation_examples`` training examples out; applies ``train_examples``;
    with ``canvas_size``, places the validation and test digits on the canvas at fixed offsets; for MultiMNIST, makes
    the fixed validation and test pairs from the held-out and the test digits."""
    pairs = config.dataset == "multimnist"
    name = config.multimnist.digits if pairs else config.dataset
    images, labels = load(name, "train", config.data_dir)
    test_images, test_labels = load(name, "test", config.data_dir)
    test = (_on_canvas(config, test_images, "test"), test_labels)
    held_out = config.validation_examples
    if held_out >= len(images):
        raise ConfigError(f"validation_examples={held_out} leaves no training data ({len(images)} examples)")
    if held_out:
        validation = (_on_canvas(config, images[-held_out:], "validation"), labels[-held_out:])
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


def load_eval_split(
    config: TrainConfig, split: str = "test", data_dir: str | None = None, dataset: str | None = None
) -> tuple[np.ndarray, ...]:
    """The images and labels a run is evaluated on: ``split`` of the run's dataset, placed on its canvas as in
    training (expanded MNIST), or of another ``dataset`` taken as it is (e.g. ``affine_mnist`` or ``affnist``, 40x40,
    for a run trained on expanded MNIST). The run's own ``"train"`` and ``"validation"`` splits are those it trained
    and validated on (the held-out examples, ``train_examples``). For a MultiMNIST run, its fixed ``"test"`` or
    ``"validation"`` pairs ``(images, labels, digits)`` (:func:`load_datasets`). ``data_dir`` defaults to the run's
    for its dataset and the datasets built from it. Raises :class:`ConfigError` if the images don't fit the run's
    model."""
    name = dataset or config.dataset
    if name == "multimnist" == config.dataset:  # its fixed pairs, as in training
        if split not in ("test", "validation"):
            raise ConfigError(f"MultiMNIST evaluates on its fixed 'test' or 'validation' pairs, not {split!r}")
        datasets = load_datasets(config if data_dir is None else dataclasses.replace(config, data_dir=data_dir))
        return datasets.test if split == "test" else datasets.validation
    if data_dir is None and DERIVED_FROM.get(name, name) == config.dataset:
        data_dir = config.data_dir
    if name == config.dataset and split in ("train", "validation"):  # the run's own split of its training data
        if split == "validation" and not config.validation_examples:
            raise ConfigError("the run held out no validation examples (validation_examples=0); evaluate --split test")
        datasets = load_datasets(dataclasses.replace(config, data_dir=data_dir))
        images, labels = datasets.validation if split == "validation" else datasets.train
        if split == "train":  # as trained (without the held-out examples), at the fixed offsets of a canvas
            images = _on_canvas(config, images, "train")
    else:
        images, labels = load(name, split, data_dir)
        if name == config.dataset:
            images = _on_canvas(config, images, split)
    expected = tuple(config.model.image_shape)
    if tuple(images.shape[1:]) != expected:
        hint = " (train on expanded MNIST, --preset expanded_mnist, for 40x40 sets)" if images.shape[1] == 40 else ""
        raise ConfigError(
            f"{name} {split} images are {'x'.join(map(str, images.shape[1:]))}, but the run's model takes "
            f"{'x'.join(map(str, expected))}{hint}"
        )
    if labels.size and labels.max() >= config.model.num_classes:
        raise ConfigError(f"{name} has labels up to {labels.max()}, the run's model {config.model.num_classes} classes")
    return images, labels


def load_also_test(config: TrainConfig) -> dict[str, tuple[np.ndarray, ...]]:
    """The test sets of ``config.also_test_on`` (:func:`load_eval_split`), by name, for a config whose model is
    already adapted to its data (:func:`adapt_model_to_data`)."""
    sets = {}
    for name in config.also_test_on:
        try:
            sets[name] = load_eval_split(config, "test", dataset=name)
        except DataError as err:  # --data-dir names the run's own data: that remedy would fail the same way
            folder = name.split("/")[0]
            where = f"set ${DATA_ENV} to a directory that holds a {folder}/ folder (--data-dir is the run's own data)"
            raise DataError(str(err).replace(HINT, where)) from None
    return sets


def adapt_model_to_data(config: TrainConfig, datasets: Datasets) -> TrainConfig:
    """Takes the image shape (of the test images: on the canvas for expanded MNIST, for MultiMNIST the pairs') and
    the class count from the data when the config's differ (e.g. CIFAR-10)."""
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
