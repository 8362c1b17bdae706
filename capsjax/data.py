"""Datasets and the input pipeline.

Sources, tried in this order by :func:`load`:

1. a local directory: ``data_dir`` if given, else ``$CAPSJAX_DATA/<name>``, else ``~/.cache/capsjax/<name>``. It holds
   the original distribution files: IDX (``train-images-idx3-ubyte[.gz]`` ...) for the MNIST family, the binary
   version (``data_batch_1.bin`` ...) for CIFAR-10, ``train_32x32.mat`` / ``test_32x32.mat`` for SVHN. Nothing is
   ever written into it. This path needs no network and no TensorFlow.
2. TensorFlow Datasets (the ``tfds`` extra), in ``$TFDS_DATA_DIR`` (default ``~/tensorflow_datasets``), read through
   its ArrayRecord data source. Preparing a dataset the first time downloads it (and TFDS needs TensorFlow for that
   step); reading an already prepared one does not.

``"synthetic"`` needs neither: deterministic generated images whose class is recoverable, for tests and benchmarks.

Every problem with the inputs raises :class:`DataError`, whose message names the file or dataset and says what to do.

Images are ``uint8 [N, H, W, C]`` on the host and stay uint8 until they reach the device (a quarter of the bytes of
float32); :func:`to_float` and :func:`random_shift` run on the device inside the jitted step.

Splits: ``"train"`` (the whole original training set, in the order of the files), ``"test"``, ``"validation"`` (the
LAST :data:`VALIDATION_SIZE` examples of ``"train"``), ``"train_no_validation"`` (``"train"`` without them).
"""

from __future__ import annotations

import dataclasses
import gzip
import math
import os
import queue
import socket
import struct
import threading
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "DataError",
    "DATASETS",
    "SPLITS",
    "VALIDATION_SIZE",
    "load",
    "load_synthetic",
    "read_idx",
    "write_idx",
    "batches",
    "num_batches",
    "prefetch_to_device",
    "to_float",
    "shift_images",
    "random_shift",
    "multimnist_batches",
    "two_hot",
]

VALIDATION_SIZE = 5000
"""The ``"validation"`` split is the last this many examples of the original training set."""

SPLITS = ("train", "train_no_validation", "validation", "test")

SYNTHETIC_SIZES = {"train": 6000, "test": 1000}
"""Examples in the ``"synthetic"`` dataset's training and test sets (a tenth of MNIST's)."""

DATA_ENV = "CAPSJAX_DATA"
CACHE_DIR = Path("~/.cache/capsjax")

_HINT = f"pass --data-dir DIR (data_dir=...) or set ${DATA_ENV} to a directory that holds <dataset>/ folders"


class DataError(ValueError):
    """A dataset that cannot be found or read: the message names the file or dataset and says what to do."""


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """What :func:`load` knows about a dataset: its TFDS name, local file format, classes and image shape."""

    tfds_name: str
    local_format: str  # "idx", "cifar10_bin", "svhn_mat" or "synthetic"
    num_classes: int
    image_shape: tuple[int, int, int]
    idx_prefix: str = ""  # EMNIST's IDX files are named "emnist-<config>-train-images-idx3-ubyte.gz"
    transpose: bool = False  # EMNIST's IDX images are stored transposed


def _emnist(config: str, num_classes: int) -> DatasetSpec:
    return DatasetSpec(f"emnist/{config}", "idx", num_classes, (28, 28, 1), f"emnist-{config}-", transpose=True)


DATASETS: dict[str, DatasetSpec] = {
    "mnist": DatasetSpec("mnist", "idx", 10, (28, 28, 1)),
    "fashion_mnist": DatasetSpec("fashion_mnist", "idx", 10, (28, 28, 1)),
    "kmnist": DatasetSpec("kmnist", "idx", 10, (28, 28, 1)),
    "emnist/byclass": _emnist("byclass", 62),
    "emnist/bymerge": _emnist("bymerge", 47),
    "emnist/balanced": _emnist("balanced", 47),
    "emnist/letters": _emnist("letters", 27),  # labels 1..26 (a..z); 0 is unused
    "emnist/digits": _emnist("digits", 10),
    "emnist/mnist": _emnist("mnist", 10),
    "cifar10": DatasetSpec("cifar10", "cifar10_bin", 10, (32, 32, 3)),
    "svhn_cropped": DatasetSpec("svhn_cropped", "svhn_mat", 10, (32, 32, 3)),
    "synthetic": DatasetSpec("", "synthetic", 10, (28, 28, 1)),
}
"""The dataset names :func:`load` accepts."""


# --------------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------------


def load(name: str, split: str, data_dir: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Loads one split of a dataset into host memory.

    Args:
      name: a key of :data:`DATASETS`: ``"mnist"``, ``"fashion_mnist"``, ``"kmnist"``, ``"emnist/<config>"``,
        ``"cifar10"``, ``"svhn_cropped"`` or ``"synthetic"``.
      split: one of :data:`SPLITS`: ``"train"`` (all training examples, in file order), ``"test"``,
        ``"validation"`` (the last :data:`VALIDATION_SIZE` training examples) or ``"train_no_validation"``.
      data_dir: a directory of the dataset's original files (see the module docstring), or a folder holding it as
        ``<name>/``. ``None``: look in ``$CAPSJAX_DATA/<name>`` and ``~/.cache/capsjax/<name>``, then fall back to
        TFDS. Ignored for ``"synthetic"``.

    Returns:
      ``(images, labels)``: images ``uint8 [N, H, W, C]``, labels ``int32 [N]``.

    Raises:
      DataError: unknown name or split, missing or damaged files, TFDS unavailable.
    """
    spec = _spec(name)
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r} for dataset {name!r}; valid splits: {', '.join(SPLITS)}")
    base = "test" if split == "test" else "train"
    if spec.local_format == "synthetic":
        images, labels = load_synthetic(SYNTHETIC_SIZES[base], seed=0 if base == "train" else 1)
    else:
        directory = _given_dir(name, data_dir) if data_dir is not None else _default_dir(name)
        if directory is not None:
            images, labels = _load_local(name, spec, base, directory)
        else:
            images, labels = _load_tfds(name, spec, base)
    return _select_split(name, split, images, labels)


def _spec(name: str) -> DatasetSpec:
    try:
        return DATASETS[name]
    except (KeyError, TypeError):
        raise DataError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}") from None


def _select_split(name: str, split: str, images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if split in ("train", "test"):
        return images, labels
    if len(images) <= VALIDATION_SIZE:
        raise DataError(
            f"{name}: the training set has {len(images)} examples, too few to hold out the last {VALIDATION_SIZE} "
            "for validation; use split 'train' and 'test'"
        )
    if split == "validation":
        return images[-VALIDATION_SIZE:], labels[-VALIDATION_SIZE:]
    return images[:-VALIDATION_SIZE], labels[:-VALIDATION_SIZE]


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
    if sub.is_dir() and not any(directory.glob("*ubyte*")) and not any(directory.glob("*.bin")):
        return sub
    return directory


def _default_dir(name: str) -> Path | None:
    return next((d for d in _default_dirs(name) if d.is_dir()), None)


def _load_local(name: str, spec: DatasetSpec, base: str, directory: Path) -> tuple[np.ndarray, np.ndarray]:
    if not directory.is_dir():
        what = "does not exist" if not directory.exists() else "is not a directory"
        raise DataError(f"{name}: data directory {directory} {what}; {_HINT}")
    if spec.local_format == "idx":
        images, labels, label_file = _load_idx_pair(spec, base, directory)
    elif spec.local_format == "cifar10_bin":
        images, labels, label_file = _load_cifar10_bin(base, directory)
    else:
        images, labels, label_file = _load_svhn_mat(base, directory)
    _check_labels(labels, spec.num_classes, f"{name} {base} labels in {label_file}")
    return images, labels


def _check_labels(labels: np.ndarray, num_classes: int, what: str) -> None:
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        bad = labels[(labels < 0) | (labels >= num_classes)]
        raise DataError(
            f"{what}: {bad.size} label(s) outside [0, {num_classes}) (e.g. {int(bad[0])}); the file is damaged or "
            "belongs to another dataset"
        )


# IDX ----------------------------------------------------------------------------------------------------------------

IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension

_IDX_DTYPES = {0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}  # fmt: skip
_IDX_CODES = {dt.newbyteorder(">") if dt.itemsize > 1 else dt: code for code, dt in _IDX_DTYPES.items()}


def _read_bytes(path: Path) -> bytes:
    """The file's bytes, gunzipped when it is gzip (by name or by content)."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataError(f"cannot read {path}: {err.strerror or err}; {_HINT}") from None
    is_gzip = raw[:2] == b"\x1f\x8b"
    if path.suffix == ".gz" and not is_gzip:
        raise DataError(f"{path} is named .gz but is not a gzip file; download it again")
    if not is_gzip:
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"{path}: corrupt or truncated gzip file ({err}); download it again") from None


def _parse_idx(path: Path) -> tuple[np.ndarray, int]:
    """(array, magic number) of an IDX file, its header checked against its size."""
    raw = _read_bytes(path)
    magic = int.from_bytes(raw[:4].ljust(4, b"\0"), "big")
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        raise DataError(f"{path} is not an IDX file (magic number {magic}); download it again")
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} is truncated: {len(raw)} bytes, shorter than its {header}-byte header")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = header + math.prod(shape) * dtype.itemsize
    if len(raw) != expected:
        state = "truncated" if len(raw) < expected else "longer than its header says"
        raise DataError(
            f"{path} is {state}: {len(raw)} bytes, but its header declares shape {shape} = {expected} bytes; "
            "download it again"
        )
    array = np.frombuffer(raw, dtype, count=math.prod(shape), offset=header).reshape(shape)
    return array.astype(dtype.newbyteorder("=")), magic  # a writable copy in native byte order


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Reads an IDX file (the MNIST format), gzipped or not, checking its header against its size.

    Returns:
      The array with the header's dimensions, in native byte order (e.g. ``uint8 [N, 28, 28]`` for images).
    """
    return _parse_idx(Path(path))[0]


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """Writes ``array`` (uint8, int8, int16, int32, float32 or float64; any rank >= 1) as an IDX file, gzipped when
    ``path`` ends in ``.gz``."""
    path = Path(path)
    array = np.asarray(array)
    big = array.dtype.newbyteorder(">") if array.dtype.itemsize > 1 else array.dtype
    if big not in _IDX_CODES or array.ndim == 0:
        raise ValueError(f"IDX cannot hold a {array.ndim}-d array of {array.dtype}")
    header = bytes([0, 0, _IDX_CODES[big], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(big).tobytes()
    path.write_bytes(gzip.compress(data, compresslevel=6) if path.suffix == ".gz" else data)


def _find_file(directory: Path, candidates: Sequence[str], what: str) -> Path:
    for candidate in candidates:
        path = directory / candidate
        if path.is_file():
            return path
    raise DataError(
        f"{what}: none of {', '.join(candidates[:2])} (or their variants) found in {directory}; "
        f"put the dataset's files there, or {_HINT}"
    )


def _idx_candidates(spec: DatasetSpec, base: str, kind: str) -> list[str]:
    """File names for (base "train"/"test", kind "images"/"labels"): prefixed and plain, '-' and '.', raw and .gz."""
    rank = 3 if kind == "images" else 1
    stems = ("train",) if base == "train" else ("t10k", "test")
    prefixes = (spec.idx_prefix, "") if spec.idx_prefix else ("",)
    names = []
    for prefix in prefixes:
        for stem in stems:
            for sep in ("-", "."):
                for ext in (".gz", ""):
                    names.append(f"{prefix}{stem}-{kind}{sep}idx{rank}-ubyte{ext}")
    return names


def _load_idx_pair(spec: DatasetSpec, base: str, directory: Path) -> tuple[np.ndarray, np.ndarray, str]:
    image_path = _find_file(directory, _idx_candidates(spec, base, "images"), f"{spec.tfds_name} {base} images")
    label_path = _find_file(directory, _idx_candidates(spec, base, "labels"), f"{spec.tfds_name} {base} labels")
    images = _read_idx_expecting(image_path, IDX_IMAGES_MAGIC, "images [N, H, W] of unsigned bytes")
    labels = _read_idx_expecting(label_path, IDX_LABELS_MAGIC, "labels [N] of unsigned bytes")
    if len(images) != len(labels):
        raise DataError(
            f"{image_path.name} holds {len(images)} images but {label_path.name} holds {len(labels)} labels "
            f"(in {directory}); the two files belong to different sets, download them again"
        )
    if spec.transpose:
        images = np.ascontiguousarray(images.transpose(0, 2, 1))
    return images[..., None], labels.astype(np.int32), str(label_path)


def _read_idx_expecting(path: Path, magic: int, what: str) -> np.ndarray:
    array, found = _parse_idx(path)
    if found != magic:
        raise DataError(f"{path}: magic number {found}, expected {magic} (IDX {what}); is it the right file?")
    return array


# CIFAR-10 binary version ------------------------------------------------------------------------------------------

_CIFAR_RECORD = 1 + 32 * 32 * 3


def _load_cifar10_bin(base: str, directory: Path) -> tuple[np.ndarray, np.ndarray, str]:
    if not (directory / "test_batch.bin").exists() and (directory / "cifar-10-batches-bin").is_dir():
        directory = directory / "cifar-10-batches-bin"
    names = [f"data_batch_{i}.bin" for i in range(1, 6)] if base == "train" else ["test_batch.bin"]
    parts = []
    for file_name in names:
        path = _find_file(directory, [file_name], f"cifar10 {base}")
        raw = _read_bytes(path)
        if len(raw) == 0 or len(raw) % _CIFAR_RECORD:
            raise DataError(
                f"{path}: {len(raw)} bytes is not a whole number of {_CIFAR_RECORD}-byte CIFAR-10 records; "
                "the file is truncated, download it again"
            )
        parts.append(np.frombuffer(raw, np.uint8).reshape(-1, _CIFAR_RECORD))
    records = np.concatenate(parts)
    images = records[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # stored channel-major: CHW -> HWC
    where = f"{directory / names[0]}" + (f" ... {names[-1]}" if len(names) > 1 else "")
    return np.ascontiguousarray(images), records[:, 0].astype(np.int32), where


# SVHN (cropped digits, .mat) ----------------------------------------------------------------------------------------


def _load_svhn_mat(base: str, directory: Path) -> tuple[np.ndarray, np.ndarray, str]:
    path = _find_file(directory, [f"{base}_32x32.mat"], f"svhn_cropped {base}")
    try:
        from scipy.io import loadmat

        mat = loadmat(path)
        x, y = mat["X"], mat["y"]
    except ImportError:
        raise DataError(f"{path}: reading SVHN's .mat files needs scipy (pip install scipy)") from None
    except Exception as err:  # noqa: BLE001 - scipy's MatReadError and friends: the file is not what it should be
        raise DataError(f"{path}: not a readable SVHN .mat file ({err}); download it again") from None
    if x.ndim != 4 or x.shape[:3] != (32, 32, 3) or y.size != x.shape[3]:
        raise DataError(f"{path}: X has shape {x.shape} and y {y.shape}, expected [32, 32, 3, N] and [N, 1]")
    labels = y.reshape(-1).astype(np.int32)
    labels[labels == 10] = 0  # SVHN labels the digit 0 as 10
    return np.ascontiguousarray(x.transpose(3, 0, 1, 2)).astype(np.uint8), labels, str(path)


# TFDS ---------------------------------------------------------------------------------------------------------------

TFDS_PROBE = ("storage.googleapis.com", 443)


def _import_tfds(name: str):
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        searched = " or ".join(str(d) for d in _default_dirs(name))
        raise DataError(
            f"{name}: no local copy in {searched}, and TensorFlow Datasets is not installed; "
            f'pip install "capsjax[tfds]" to download it, or {_HINT}'
        ) from None
    return tfds


def _network_reachable(address: tuple[str, int] = TFDS_PROBE, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to ``address`` opens within ``timeout`` seconds (name lookup included).

    With an HTTPS proxy configured the direct probe proves nothing, so it answers True and lets TFDS try."""
    if os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy"):
        return True
    result: list[bool] = []

    def probe():
        try:
            socket.create_connection(address, timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)  # name lookups have no timeout of their own
    return bool(result and result[0])


def _tfds_source(name: str, tfds_name: str, split: str) -> Sequence[dict[str, Any]]:
    """A TFDS ArrayRecord data source of ``split``, downloading and preparing the dataset first if needed.

    Returns a random-access sequence of ``{"image": uint8 [H, W, C], "label": int}`` examples."""
    tfds = _import_tfds(name)
    tfds_dir = os.environ.get("TFDS_DATA_DIR") or None  # read now: TFDS itself reads it once, at import
    try:
        builder = tfds.builder(tfds_name, data_dir=tfds_dir, file_format="array_record")
    except Exception as err:  # noqa: BLE001 - TFDS raises many kinds; all mean the same to the user
        raise DataError(f"{name}: TFDS has no dataset {tfds_name!r} ({err}); {_HINT}") from None
    if not builder.is_prepared():
        if not _network_reachable():
            raise DataError(
                f"{name} is not prepared in the TFDS data dir ({builder.data_dir}) and {TFDS_PROBE[0]} cannot be "
                f"reached to download it; {_HINT}"
            )
        try:
            builder.download_and_prepare()
        except ImportError as err:
            raise DataError(
                f"{name}: TFDS needs TensorFlow to prepare a dataset the first time ({err}); pip install tensorflow-cpu, "
                f"or {_HINT}"
            ) from None
        except Exception as err:  # noqa: BLE001
            raise DataError(
                f"{name}: TFDS could not download and prepare it ({type(err).__name__}: {err}); {_HINT}"
            ) from None
    try:
        return builder.as_data_source(split=split)
    except Exception as err:  # noqa: BLE001
        raise DataError(
            f"{name}: TFDS cannot read split {split!r} from {builder.data_dir} as ArrayRecord "
            f"({type(err).__name__}: {err}); delete that folder to prepare it again, or {_HINT}"
        ) from None


def _load_tfds(name: str, spec: DatasetSpec, base: str) -> tuple[np.ndarray, np.ndarray]:
    source = _tfds_source(name, spec.tfds_name, base)
    images, labels = _source_to_arrays(source, f"{name} {base} (TFDS)")
    _check_labels(labels, spec.num_classes, f"{name} {base} labels (TFDS)")
    return images, labels


def _source_to_arrays(source: Sequence[dict[str, Any]], what: str, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Reads every ``{"image", "label"}`` example of a random-access source into uint8 [N, H, W, C] / int32 [N]."""
    n = len(source)
    if n == 0:
        raise DataError(f"{what}: the split is empty")
    first = source[0]
    if not isinstance(first, dict) or "image" not in first or "label" not in first:
        keys = list(first) if isinstance(first, dict) else type(first).__name__
        raise DataError(f"{what}: examples have {keys}, expected 'image' and 'label'")
    shape = np.shape(first["image"])
    shape = shape + (1,) if len(shape) == 2 else shape
    if len(shape) != 3:
        raise DataError(f"{what}: images of shape {np.shape(first['image'])}, expected [H, W, C]")
    images = np.empty((n, *shape), np.uint8)
    labels = np.empty((n,), np.int32)
    get_many = getattr(source, "__getitems__", None)  # ArrayRecord reads a batch of records in parallel
    for start in range(0, n, chunk):
        keys = list(range(start, min(n, start + chunk)))
        examples = None
        if get_many is not None:
            try:
                examples = get_many(keys)
            except (TypeError, NotImplementedError):  # a source whose batch read is missing or broken (TFDS's mock)
                get_many = None
        if examples is None:
            examples = [source[i] for i in keys]
        for i, example in zip(keys, examples):
            image = np.asarray(example["image"])
            if image.shape != shape and image.shape + (1,) != shape:
                raise DataError(f"{what}: example {i} has an image of shape {image.shape}, the first {shape}")
            images[i] = image.reshape(shape)
            labels[i] = example["label"]
    return images, labels


# Synthetic ----------------------------------------------------------------------------------------------------------


def load_synthetic(
    n: int, image_shape: tuple[int, int, int] = (28, 28, 1), num_classes: int = 10, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic generated images whose class is recoverable from the pixels.

    Class ``k`` draws a stroke through (about) the centre at angle ``180° k / num_classes`` and a dot on a circle at
    angle ``360° k / num_classes``; length, thickness, brightness, position and angle jitter per example.

    Returns:
      ``(images, labels)``: images ``uint8 [n, *image_shape]``, labels ``int32 [n]``, a pure function of the arguments.
    """
    h, w, c = image_shape
    rng = np.random.default_rng([seed, 0x5EED])
    labels = rng.integers(0, num_classes, n).astype(np.int32)
    f32 = np.float32
    k = labels / num_classes
    angle = (np.pi * k + rng.uniform(-0.08, 0.08, n)).astype(f32)
    half_length = rng.uniform(0.45, 0.7, n).astype(f32)
    inv_thickness = 1 / rng.uniform(0.07, 0.11, n).astype(f32)
    centre = rng.uniform(-0.12, 0.12, (n, 2)).astype(f32)
    dot = centre + 0.62 * np.stack([np.sin(2 * np.pi * k), np.cos(2 * np.pi * k)], axis=-1).astype(f32)
    brightness = (255 * rng.uniform(0.75, 1.0, n)).astype(f32)
    colour = rng.uniform(0.4, 1.0, (n, c)).astype(f32) if c > 1 else np.ones((n, 1), f32)
    colour = colour / colour.max(axis=1, keepdims=True)
    # pixel centres in [-1, 1] (y down, x right)
    ys = (np.arange(h, dtype=np.float32) + 0.5) / h * 2 - 1
    xs = (np.arange(w, dtype=np.float32) + 0.5) / w * 2 - 1
    images = np.empty((n, h, w, c), np.uint8)
    for lo in range(0, n, 2048):  # bounded memory for large n
        s = slice(lo, min(n, lo + 2048))
        py = ys[None, :, None] - centre[s, 0, None, None]  # [b, h, 1]
        px = xs[None, None, :] - centre[s, 1, None, None]  # [b, 1, w]
        dy, dx = np.sin(angle[s])[:, None, None], np.cos(angle[s])[:, None, None]
        t = np.clip(py * dy + px * dx, -half_length[s, None, None], half_length[s, None, None])
        stroke = (np.square(py - t * dy) + np.square(px - t * dx)) * np.square(inv_thickness[s, None, None])
        spot = np.square(ys[None, :, None] - dot[s, 0, None, None]) + np.square(
            xs[None, None, :] - dot[s, 1, None, None]
        )
        value = np.exp(-np.minimum(stroke, spot * f32(1 / 0.12**2))) * brightness[s, None, None]
        images[s] = np.rint(value[..., None] * colour[s, None, None, :]).astype(np.uint8)
    return images, labels


# --------------------------------------------------------------------------------------------------------------------
# Input pipeline
# --------------------------------------------------------------------------------------------------------------------


def num_batches(num_examples: int, batch_size: int, drop_remainder: bool = True) -> int:
    """Batches per epoch: ``num_examples // batch_size``, or rounded up when the remainder is kept."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return num_examples // batch_size if drop_remainder else -(-num_examples // batch_size)


def _process(process_index: int | None, process_count: int | None, batch_size: int) -> tuple[int, int, int]:
    """(index, count, local batch size), defaulting to JAX's view of this process."""
    count = jax.process_count() if process_count is None else process_count
    index = jax.process_index() if process_index is None else process_index
    if not 0 <= index < count:
        raise ValueError(f"process_index {index} is outside [0, {count})")
    if batch_size < 1 or batch_size % count:
        raise ValueError(f"the global batch size {batch_size} must be a positive multiple of process_count {count}")
    return index, count, batch_size // count


def _epoch_order(n: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)


def _local_part(global_idx: np.ndarray, batch_size: int, index: int, count: int) -> np.ndarray:
    """This process's contiguous slice of one global batch (a partial last batch is split as evenly as possible)."""
    if len(global_idx) == batch_size:
        local = batch_size // count
        return global_idx[index * local : (index + 1) * local]
    return np.array_split(global_idx, count)[index]


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
    """One epoch of host-local batches.

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
      process's contiguous slice of each global batch.
    """
    n = len(images)
    if len(labels) != n:
        raise ValueError(f"{n} images but {len(labels)} labels")
    index, count, _ = _process(process_index, process_count, batch_size)
    order = _epoch_order(n, seed, epoch, shuffle)
    for b in range(num_batches(n, batch_size, drop_remainder)):
        idx = _local_part(order[b * batch_size : (b + 1) * batch_size], batch_size, index, count)
        yield images[idx], np.asarray(labels[idx], np.int32)


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


# --------------------------------------------------------------------------------------------------------------------
# On-device preprocessing
# --------------------------------------------------------------------------------------------------------------------


def to_float(images: jax.Array) -> jax.Array:
    """``uint8 [..]`` in 0..255 -> ``float32 [..]`` in [0, 1]; other dtypes are only cast to float32."""
    images = jnp.asarray(images)
    if images.dtype == jnp.uint8:
        return images.astype(jnp.float32) * jnp.float32(1 / 255)
    return images.astype(jnp.float32)


def shift_images(images: jax.Array, offsets: jax.Array) -> jax.Array:
    """Translates each image by its own integer offset, filling the vacated area with zeros.

    ``out[b, y, x] = images[b, y - dy_b, x - dx_b]`` where that is inside the image, else 0 (like ``np.roll`` without
    the wrap-around): positive ``dy`` moves content down, positive ``dx`` right. Pure ``jnp`` (two gathers along the
    image axes and a mask); jit-able, and shards along the batch under any mesh.

    Args:
      images: ``[B, H, W, C]``, any dtype.
      offsets: integer ``[B, 2]`` of ``(dy, dx)``.

    Returns:
      ``[B, H, W, C]`` in ``images``' dtype.
    """
    _, h, w, _ = images.shape
    offsets = jnp.asarray(offsets, jnp.int32)
    rows = jnp.arange(h, dtype=jnp.int32)[None, :] - offsets[:, 0:1]  # [B, H]: the source row of each output row
    cols = jnp.arange(w, dtype=jnp.int32)[None, :] - offsets[:, 1:2]  # [B, W]
    out = jnp.take_along_axis(images, jnp.clip(rows, 0, h - 1)[:, :, None, None], axis=1, mode="clip")
    out = jnp.take_along_axis(out, jnp.clip(cols, 0, w - 1)[:, None, :, None], axis=2, mode="clip")
    inside = ((rows >= 0) & (rows < h))[:, :, None, None] & ((cols >= 0) & (cols < w))[:, None, :, None]
    return jnp.where(inside, out, jnp.zeros((), images.dtype))


def random_shift(key: jax.Array, images: jax.Array, max_shift: int = 2) -> jax.Array:
    """The paper's augmentation: each image shifted by its own ``(dy, dx)``, uniform in ``[-max_shift, max_shift]``,
    zero padded (content moved out is lost).

    Args:
      key: a JAX PRNG key.
      images: ``[B, H, W, C]``, any dtype.
      max_shift: a static Python int; 0 returns ``images`` unchanged.

    Returns:
      ``[B, H, W, C]`` in ``images``' dtype.
    """
    if max_shift < 0:
        raise ValueError(f"max_shift must be >= 0, got {max_shift}")
    if max_shift == 0:
        return images
    offsets = jax.random.randint(key, (images.shape[0], 2), -max_shift, max_shift + 1, dtype=jnp.int32)
    return shift_images(images, offsets)


# --------------------------------------------------------------------------------------------------------------------
# MultiMNIST (paper, section 6)
# --------------------------------------------------------------------------------------------------------------------

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
    """One epoch of MultiMNIST, generated on the fly (Sabour et al. 2017, section 6).

    Each example overlays two digits of different classes: every image of the set is the first digit of one example
    per epoch (in a seeded order); the second is drawn uniformly from the images of the other classes. Each digit is
    placed at the centre of a ``canvas x canvas`` image and shifted by its own ``(dy, dx)`` uniform in
    ``[-max_shift, max_shift]``; the overlay is the pixel-wise maximum. Batch ``b`` of an epoch is a pure function of
    ``(seed, epoch, b)``, so resuming mid-epoch reproduces it.

    Args:
      images: ``uint8 [N, H, W, C]`` single digits; ``H + 2 max_shift <= canvas`` (MNIST: 28 + 2*4 = 36).
      labels: ``int [N]`` in ``[0, num_classes)``, with at least two classes present.
      batch_size: the GLOBAL batch size (see :func:`batches` for the process arguments and ``drop_remainder``).
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
    index, count, _ = _process(process_index, process_count, batch_size)
    # the examples sorted by class: the second digit of a class-c first digit is a uniform draw from the examples
    # outside c's block of that order
    by_class = np.argsort(labels, kind="stable")
    class_count = np.bincount(labels, minlength=num_classes)
    class_start = np.concatenate([[0], np.cumsum(class_count)[:-1]])
    if np.count_nonzero(class_count) < 2:
        raise ValueError("MultiMNIST needs examples of at least two classes")
    first_order = np.random.default_rng([seed, epoch, _MULTI_TAG]).permutation(n)
    rows, cols = np.arange(h), np.arange(w)
    for b in range(num_batches(n, batch_size, drop_remainder)):
        first = first_order[b * batch_size : (b + 1) * batch_size]
        rng = np.random.default_rng([seed, epoch, _MULTI_TAG, b])
        cls = labels[first]
        r = (rng.random(len(first)) * (n - class_count[cls])).astype(np.int64)
        second = by_class[np.where(r < class_start[cls], r, r + class_count[cls])]
        shifts = rng.integers(-max_shift, max_shift + 1, (len(first), 2, 2))  # [B, digit, (dy, dx)]
        part = _local_part(np.arange(len(first)), batch_size, index, count)
        pair = np.stack([first[part], second[part]], axis=1)  # [B, 2]
        y0 = top + shifts[part, :, 0]  # [B, 2]
        x0 = left + shifts[part, :, 1]
        digits = np.zeros((len(part), 2, canvas, canvas, c), np.uint8)
        bi = np.arange(len(part))[:, None, None, None]
        ki = np.arange(2)[None, :, None, None]
        digits[bi, ki, (y0[:, :, None] + rows)[..., None], (x0[:, :, None] + cols)[:, :, None, :]] = images[pair]
        classes = labels[pair].astype(np.int32)
        yield {
            "images": digits.max(axis=1),
            "labels": two_hot(classes, num_classes),
            "classes": classes,
            "digits": digits,
        }
