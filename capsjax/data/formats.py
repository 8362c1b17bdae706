"""The original distribution files: IDX (the MNIST family), CIFAR-10's binary version, SVHN's and affNIST's ``.mat``.

Each ``load_*`` reads one base split (``"train"`` or ``"test"``) from a directory and returns
``(images uint8 [N, H, W, C], labels int32 [N], where)``, ``where`` naming the label file for error messages. Every
problem raises :class:`~capsjax.data.errors.DataError` naming the file.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from capsjax.data.errors import HINT, DataError

Arrays = tuple[np.ndarray, np.ndarray, str]

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
        raise DataError(f"cannot read {path}: {err.strerror or err}; {HINT}") from None
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
    """The first of ``candidates`` that is a file in ``directory``; a :class:`DataError` naming them if none is."""
    for candidate in candidates:
        path = directory / candidate
        if path.is_file():
            return path
    raise DataError(
        f"{what}: none of {', '.join(candidates[:2])} (or their variants) found in {directory}; "
        f"put the dataset's files there, or {HINT}"
    )


def _idx_candidates(prefix: str, base: str, kind: str) -> list[str]:
    """File names for (base "train"/"test", kind "images"/"labels"): with the dataset's ``prefix`` only (EMNIST's
    names say which of its sets a file is; plain names are MNIST's), '-' and '.', raw and .gz."""
    rank = 3 if kind == "images" else 1
    stems = ("train",) if base == "train" else ("t10k", "test")
    return [
        f"{prefix}{stem}-{kind}{sep}idx{rank}-ubyte{ext}"
        for stem in stems
        for sep in ("-", ".")
        for ext in (".gz", "")
    ]


def _read_idx_expecting(path: Path, magic: int, what: str) -> np.ndarray:
    array, found = _parse_idx(path)
    if found != magic:
        raise DataError(f"{path}: magic number {found}, expected {magic} (IDX {what}); is it the right file?")
    return array


def load_idx_pair(directory: Path, base: str, what: str, prefix: str = "", transpose: bool = False) -> Arrays:
    """The images and labels IDX files of ``base`` in ``directory`` (file names starting with ``prefix``);
    ``transpose`` swaps H and W (EMNIST stores its images transposed)."""
    image_path = _find_file(directory, _idx_candidates(prefix, base, "images"), f"{what} {base} images")
    label_path = _find_file(directory, _idx_candidates(prefix, base, "labels"), f"{what} {base} labels")
    images = _read_idx_expecting(image_path, IDX_IMAGES_MAGIC, "images [N, H, W] of unsigned bytes")
    labels = _read_idx_expecting(label_path, IDX_LABELS_MAGIC, "labels [N] of unsigned bytes")
    if len(images) != len(labels):
        raise DataError(
            f"{image_path.name} holds {len(images)} images but {label_path.name} holds {len(labels)} labels "
            f"(in {directory}); the two files belong to different sets, download them again"
        )
    if transpose:
        images = np.ascontiguousarray(images.transpose(0, 2, 1))
    return images[..., None], labels.astype(np.int32), str(label_path)


# CIFAR-10 binary version ------------------------------------------------------------------------------------------

_CIFAR_RECORD = 1 + 32 * 32 * 3


def load_cifar10_bin(directory: Path, base: str) -> Arrays:
    """``data_batch_{1..5}.bin`` (train) or ``test_batch.bin`` in ``directory`` or its ``cifar-10-batches-bin/``."""
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


def load_svhn_mat(directory: Path, base: str) -> Arrays:
    """``train_32x32.mat`` or ``test_32x32.mat`` in ``directory`` (needs scipy); SVHN's label 10 becomes 0."""
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


# affNIST (.mat) -----------------------------------------------------------------------------------------------------

AFFNIST_SIZE = 40
# Where each split lives in the official distribution: one file, or a folder of numbered batches 1.mat, 2.mat, ...
_AFFNIST_FILES = {"test": ("test.mat",), "train": ("training_and_validation.mat", "training.mat", "train.mat")}
_AFFNIST_FOLDERS = {
    "test": ("test_batches", "test"),
    "train": ("training_and_validation_batches", "training_batches", "train_batches", "train", "training"),
}


def _affnist_paths(directory: Path, base: str) -> list[Path]:
    """The split's ``.mat`` file, or its numbered batches in order (all of 1..n, else an error naming the gap)."""
    for name in _AFFNIST_FILES[base]:
        if (directory / name).is_file():
            return [directory / name]
    for name in _AFFNIST_FOLDERS[base]:
        folder = directory / name
        numbered = {int(p.stem): p for p in folder.glob("*.mat") if p.stem.isdigit()} if folder.is_dir() else {}
        if numbered:
            missing = sorted(set(range(1, max(numbered) + 1)) - set(numbered))
            if missing:
                raise DataError(
                    f"affnist {base}: {folder} holds batches up to {max(numbered)}.mat but not "
                    f"{', '.join(f'{m}.mat' for m in missing[:5])}; download the batches again"
                )
            return [numbered[k] for k in sorted(numbered)]
    names = list(_AFFNIST_FILES[base]) + [f"{f}/1.mat" for f in _AFFNIST_FOLDERS[base]]
    raise DataError(
        f"affnist {base}: none of {', '.join(names[:4])} found in {directory}; put the official affNIST .mat files "
        f"(unzipped) there, or {HINT}"
    )


def _affnist_field(struct: np.ndarray, name: str, path: Path) -> np.ndarray:
    if struct.dtype.names is None or name not in struct.dtype.names:
        fields = ", ".join(struct.dtype.names or ()) or "none"
        raise DataError(
            f"{path}: the affNISTdata struct has no field {name!r} (fields: {fields}); is it an affNIST file?"
        )
    return np.asarray(struct[name].flat[0])


def read_affnist_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One affNIST ``.mat`` file: the struct ``affNISTdata`` whose ``image`` is ``1600 x N`` (one 40x40 image per
    column, its pixels row after row, as every public reader takes them) and ``label_int`` holds the N digits.

    Returns ``(images uint8 [N, 40, 40, 1], labels int32 [N])``."""
    try:
        from scipy.io import loadmat
    except ImportError:
        raise DataError(f"{path}: reading affNIST's .mat files needs scipy (pip install scipy)") from None
    try:
        mat = loadmat(path)
    except Exception as err:  # noqa: BLE001 - scipy's MatReadError, v7.3 (HDF5) files, truncated files, ...
        raise DataError(
            f"{path}: not a readable MATLAB .mat file ({type(err).__name__}: {err}); download it again"
        ) from None
    if "affNISTdata" not in mat:
        found = ", ".join(k for k in mat if not k.startswith("__")) or "nothing"
        raise DataError(f"{path}: no affNISTdata struct (holds {found}); is it an affNIST file?")
    struct = np.asarray(mat["affNISTdata"])
    image, label = _affnist_field(struct, "image", path), _affnist_field(struct, "label_int", path)
    pixels = AFFNIST_SIZE * AFFNIST_SIZE
    if image.ndim != 2 or image.shape[0] != pixels:
        raise DataError(f"{path}: affNISTdata.image has shape {image.shape}, expected [{pixels}, N] (40x40 images)")
    if image.dtype != np.uint8 and (
        image.min(initial=0) < 0 or image.max(initial=0) > 255 or not np.array_equal(image, np.round(image))
    ):  # e.g. pixels scaled to [0, 1]: a cast to uint8 would keep only 0 and 1
        raise DataError(f"{path}: affNISTdata.image must hold whole numbers in 0..255 (affNIST's uint8 pixels)")
    labels = label.reshape(-1)
    if labels.size != image.shape[1]:
        raise DataError(
            f"{path}: {image.shape[1]} images but {labels.size} labels in affNISTdata.label_int; download it again"
        )
    # each column one image, its 1,600 values row by row (as every public affNIST reader takes them)
    images = np.ascontiguousarray(image.T, dtype=np.uint8).reshape(-1, AFFNIST_SIZE, AFFNIST_SIZE, 1)
    return images, labels.astype(np.int32)


def load_affnist_mat(directory: Path, base: str) -> Arrays:
    """affNIST's ``train`` or ``test`` split from ``directory`` (needs scipy): ``test.mat`` or the numbered batches
    of ``test_batches/`` (or ``test/``); for ``train``, ``training_and_validation.mat`` / ``training.mat`` or the
    batches of ``training_and_validation_batches/``, ``training_batches/`` (or ``train/``)."""
    paths = _affnist_paths(directory, base)
    parts = [read_affnist_mat(p) for p in paths]
    images = np.concatenate([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
    labels = np.concatenate([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
    where = str(paths[0]) + (f" ... {paths[-1].name}" if len(paths) > 1 else "")
    return images, labels, where
