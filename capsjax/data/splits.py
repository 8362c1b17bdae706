"""The splits of a training run: train, validation (held out of train, or the test set) and test, from a config."""

from __future__ import annotations

import dataclasses

import numpy as np

from capsjax.config import ConfigError, TrainConfig
from capsjax.data.registry import load


@dataclasses.dataclass
class Datasets:
    """Host-side uint8 images [N, H, W, C] and int32 labels [N] of each split."""

    train: tuple[np.ndarray, np.ndarray]
    validation: tuple[np.ndarray, np.ndarray]
    test: tuple[np.ndarray, np.ndarray]
    validation_name: str  # "validation" (held out of train) or "test"


def load_datasets(config: TrainConfig) -> Datasets:
    """Loads train and test; holds the last ``validation_examples`` training examples out; applies ``train_examples``."""
    images, labels = load(config.dataset, "train", config.data_dir)
    test = load(config.dataset, "test", config.data_dir)
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
    return Datasets((images, labels), validation, test, "validation" if held_out else "test")


def adapt_model_to_data(config: TrainConfig, datasets: Datasets) -> TrainConfig:
    """Takes the image shape and the class count from the data when the config's differ (e.g. CIFAR-10)."""
    images, labels = datasets.train
    shape = tuple(int(s) for s in images.shape[1:])
    num_classes = max(config.model.num_classes, int(max(labels.max(), datasets.test[1].max())) + 1)
    if shape == tuple(config.model.image_shape) and num_classes == config.model.num_classes:
        return config
    try:
        model = dataclasses.replace(config.model, image_shape=shape, num_classes=num_classes)
    except ValueError as err:
        raise ConfigError(f"the model does not fit {config.dataset} images of shape {shape}: {err}") from None
    return dataclasses.replace(config, model=model)
