"""The splits of a training run: train, validation (held out of train, or the test set) and test, from a config; and
any split or other dataset for evaluating a run (:func:`load_eval_split`).

With ``TrainConfig.canvas_size`` (expanded MNIST) the training digits stay at their own size (the train step places
them on the canvas at random offsets, :func:`capsjax.data.augment.random_placement`) and the validation and test
digits are placed at fixed, seeded offsets (:func:`capsjax.data.canvas.fixed_placement`), here and in evaluation.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from capsjax.config import ConfigError, TrainConfig
from capsjax.data.canvas import fixed_placement
from capsjax.data.registry import load

DERIVED_FROM = {"affine_mnist": "mnist"}
"""Datasets built from another one's files (read from the same ``data_dir``)."""


@dataclasses.dataclass
class Datasets:
    """Host-side uint8 images [N, H, W, C] and int32 labels [N] of each split."""

    train: tuple[np.ndarray, np.ndarray]
    validation: tuple[np.ndarray, np.ndarray]
    test: tuple[np.ndarray, np.ndarray]
    validation_name: str  # "validation" (held out of train) or "test"


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
    with ``canvas_size``, places the validation and test digits on the canvas at fixed offsets."""
    images, labels = load(config.dataset, "train", config.data_dir)
    test_images, test_labels = load(config.dataset, "test", config.data_dir)
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
    return Datasets((images, labels), validation, test, "validation" if held_out else "test")


def load_eval_split(
    config: TrainConfig, split: str = "test", data_dir: str | None = None, dataset: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The images and labels a run is evaluated on: ``split`` of the run's dataset, placed on its canvas as in
    training (expanded MNIST), or of another ``dataset`` taken as it is (e.g. ``affine_mnist`` or ``affnist``, 40x40,
    for a run trained on expanded MNIST). ``data_dir`` defaults to the run's for its dataset and the datasets built
    from it. Raises :class:`ConfigError` if the images don't fit the run's model."""
    name = dataset or config.dataset
    if data_dir is None and DERIVED_FROM.get(name, name) == config.dataset:
        data_dir = config.data_dir
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


def adapt_model_to_data(config: TrainConfig, datasets: Datasets) -> TrainConfig:
    """Takes the image shape (of the test images: on the canvas for expanded MNIST) and the class count from the data
    when the config's differ (e.g. CIFAR-10)."""
    shape = tuple(int(s) for s in datasets.test[0].shape[1:])
    labels = datasets.train[1]
    num_classes = max(config.model.num_classes, int(max(labels.max(), datasets.test[1].max())) + 1)
    if shape == tuple(config.model.image_shape) and num_classes == config.model.num_classes:
        return config
    try:
        model = dataclasses.replace(config.model, image_shape=shape, num_classes=num_classes)
    except ValueError as err:
        raise ConfigError(f"the model does not fit {config.dataset} images of shape {shape}: {err}") from None
    return dataclasses.replace(config, model=model)
