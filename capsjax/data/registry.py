"""The datasets :func:`load` knows, where it looks for them, and the checks every loaded split passes."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np

from capsjax.data import canvas, formats, synthetic, tfds
from capsjax.data.errors import DATA_ENV, HINT, DataError

SPLITS = ("train", "test")

SYNTHETIC_SIZES = {"train": 6000, "test": 1000}
"""Examples in the ``"synthetic"`` dataset's training and test sets (a tenth of MNIST's)."""

CACHE_DIR = Path("~/.cache/capsjax")
"""The last local root searched (after ``$CAPSJAX_DATA``) when no data_dir is given."""


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """What :func:`load` knows about a dataset: its TFDS name, local file format, number of classes and, where they
    aren't the labels themselves (digits), its class names."""

    tfds_name: str
    local_format: str  # "idx", "cifar10_bin", "svhn_mat", "affnist_mat", "affine_mnist" or "synthetic"
    num_classes: int
    idx_prefix: str = ""  # EMNIST's IDX files are named "emnist-<config>-train-images-idx3-ubyte.gz"
    transpose: bool = False  # EMNIST's IDX images are stored transposed
    class_names: tuple[str, ...] | None = None  # label i is class_names[i] (for confusion matrices and predictions)


def _emnist(config: str, num_classes: int) -> DatasetSpec:
    return DatasetSpec(f"emnist/{config}", "idx", num_classes, f"emnist-{config}-", transpose=True)


DATASETS: dict[str, DatasetSpec] = {
    "mnist": DatasetSpec("mnist", "idx", 10),
    "fashion_mnist": DatasetSpec("fashion_mnist", "idx", 10, class_names=(
        "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")),
    "kmnist": DatasetSpec("kmnist", "idx", 10),
    "emnist/byclass": _emnist("byclass", 62),
    "emnist/bymerge": _emnist("bymerge", 47),
    "emnist/balanced": _emnist("balanced", 47),
    "emnist/letters": _emnist("letters", 27),  # labels 1..26 (a..z); 0 is unused
    "emnist/digits": _emnist("digits", 10),
    "emnist/mnist": _emnist("mnist", 10),
    "cifar10": DatasetSpec("cifar10", "cifar10_bin", 10, class_names=(
        "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")),
    "svhn_cropped": DatasetSpec("svhn_cropped", "svhn_mat", 10),
    "affnist": DatasetSpec("", "affnist_mat", 10),  # the official .mat files only: TFDS has no affNIST
    "affine_mnist": DatasetSpec("", "affine_mnist", 10),  # generated from MNIST: an approximation of affNIST
    "synthetic": DatasetSpec("", "synthetic", 10),
}
"""The dataset names :func:`load` accepts."""


def class_names(name: str) -> list[str]:
    """The names of dataset ``name``'s classes, by label: Fashion-MNIST's and CIFAR-10's words, the label itself
    (``"0"`` ... ``"9"``) for the digit sets and EMNIST, and for a name :data:`DATASETS` doesn't know (e.g. MultiMNIST,
    whose classes are MNIST's)."""
    spec = DATASETS.get(name)
    if spec is not None and spec.class_names is not None:
        return list(spec.class_names)
    return [str(i) for i in range(spec.num_classes if spec is not None else 10)]


def load(name: str, split: str, data_dir: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Loads one split of a dataset into host memory.

    Args:
      name: a key of :data:`DATASETS`: ``"mnist"``, ``"fashion_mnist"``, ``"kmnist"``, ``"emnist/<config>"``,
        ``"cifar10"``, ``"svhn_cropped"``, ``"affnist"`` (the official ``.mat`` files, 40x40), ``"affine_mnist"``
        (MNIST under seeded affine transformations on 40x40, an approximation of affNIST built from the MNIST files:
        :mod:`capsjax.data.canvas`) or ``"synthetic"``.
      split: ``"train"`` (all training examples, in file order) or ``"test"``. (The trainer holds its validation
        examples out of ``"train"`` itself: ``TrainConfig.validation_examples``.)
      data_dir: a directory of the dataset's original files (see :mod:`capsjax.data`), or a folder holding it as
        ``<name>/``. ``None``: look in ``$CAPSJAX_DATA/<name>`` and ``~/.cache/capsjax/<name>``, then fall back to
        TFDS. Ignored for ``"synthetic"``.

    Returns:
      ``(images, labels)``: images ``uint8 [N, H, W, C]``, labels ``int32 [N]``.

    Raises:
      DataError: unknown name or split, missing or damaged files, labels out of range, TFDS unavailable.
    """
    spec = _spec(name)
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r} for dataset {name!r}; valid splits: {', '.join(SPLITS)}")
    if spec.local_format == "synthetic":
        return synthetic.load_synthetic(SYNTHETIC_SIZES[split], seed=0 if split == "train" else 1)
    if spec.local_format == "affine_mnist":
        return canvas.affine_mnist(*load("mnist", split, data_dir), split)
    directory = _given_dir(name, data_dir) if data_dir is not None else _default_dir(name)
    if directory is not None:
        images, labels, where = _load_local(name, spec, split, directory)
    else:
        searched = " or ".join(str(d) for d in _default_dirs(name))
        if not spec.tfds_name:
            raise DataError(f"{name}: no local copy in {searched}, and TFDS has no {name}; download its original "
                            f"files, then {HINT}")  # fmt: skip
        images, labels, where = tfds.load_tfds(name, spec.tfds_name, split, searched)
    if not len(labels):
        raise DataError(f"{name} {split} in {where} holds no examples: its files are empty or damaged")
    _check_labels(labels, spec.num_classes, f"{name} {split} labels in {where}")
    return images, labels


def _spec(name: str) -> DatasetSpec:
    try:
        return DATASETS[name]
    except (KeyError, TypeError):
        raise DataError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}") from None


def _default_dirs(name: str) -> list[Path]:
    """The local directories searched for ``name`` when no data_dir is given, in order."""
    folder = name.split("/")[0]
    roots = [Path(os.environ[DATA_ENV]).expanduser()] if os.environ.get(DATA_ENV) else []
    roots.append(CACHE_DIR.expanduser())
    return [root / folder for root in roots]


def _given_dir(name: str, data_dir: str | os.PathLike) -> Path:
    """``data_dir`` itself, or its ``<name>`` sub-folder when it is a root of several datasets (like $CAPSJAX_DATA)."""
    directory = Path(data_dir).expanduser()
    sub = directory / name.split("/")[0]
    if sub.is_dir() and not any(any(directory.glob(pattern)) for pattern in ("*ubyte*", "*.bin", "*.mat")):
        return sub
    return directory


def _default_dir(name: str) -> Path | None:
    return next((d for d in _default_dirs(name) if d.is_dir()), None)


def _load_local(name: str, spec: DatasetSpec, split: str, directory: Path) -> formats.Arrays:
    if not directory.is_dir():
        what = "does not exist" if not directory.exists() else "is not a directory"
        raise DataError(f"{name}: data directory {directory} {what}; {HINT}")
    if spec.local_format == "idx":
        return formats.load_idx_pair(directory, split, spec.tfds_name, spec.idx_prefix, spec.transpose)
    if spec.local_format == "cifar10_bin":
        return formats.load_cifar10_bin(directory, split)
    if spec.local_format == "affnist_mat":
        return formats.load_affnist_mat(directory, split)
    return formats.load_svhn_mat(directory, split)


def _check_labels(labels: np.ndarray, num_classes: int, what: str) -> None:
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        bad = labels[(labels < 0) | (labels >= num_classes)]
        raise DataError(
            f"{what}: {bad.size} label(s) outside [0, {num_classes}) (e.g. {int(bad[0])}); the file is damaged or "
            "belongs to another dataset"
        )
