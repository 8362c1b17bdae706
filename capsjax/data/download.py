"""MNIST's four IDX files from a public mirror, without TensorFlow: :func:`download_mnist`.

TensorFlow Datasets needs TensorFlow to prepare a dataset the first time, and some runtimes (Colab's TPU ones among
them) no longer ship it. The IDX files need nothing: fetched once into ``~/.cache/capsjax/mnist``, where
:func:`capsjax.data.load` looks when no ``data_dir`` is given (after ``$CAPSJAX_DATA/mnist``, if that exists), they
serve every later run offline.
"""

from __future__ import annotations

import http.client
import os
import shutil
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

from capsjax.data.errors import DataError
from capsjax.data.formats import read_idx
from capsjax.data.registry import CACHE_DIR

MNIST_MIRROR = "https://storage.googleapis.com/cvdf-datasets/mnist/"  # the mirror TFDS downloads MNIST from
MNIST_FILES = {  # file -> examples it holds
    "train-images-idx3-ubyte.gz": 60000,
    "train-labels-idx1-ubyte.gz": 60000,
    "t10k-images-idx3-ubyte.gz": 10000,
    "t10k-labels-idx1-ubyte.gz": 10000,
}


def _holds(path: Path, count: int) -> bool:
    """Whether ``path`` is an intact IDX file of ``count`` examples."""
    try:
        return read_idx(path).shape[0] == count
    except DataError:
        return False


def download_mnist(
    directory: str | os.PathLike | None = None,
    *,
    base_url: str = MNIST_MIRROR,
    files: dict[str, int] | None = None,
    timeout: float = 60.0,
    log: Callable[[str], None] = print,
) -> Path:
    """Downloads MNIST's IDX files into ``directory`` (default ``~/.cache/capsjax/mnist``) and returns it.

    Files already there and intact are kept; a missing or damaged one is fetched from ``base_url``, checked to be an
    IDX file of the expected number of examples (``files``: name -> examples; MNIST's by default: a check of the
    format and the count, not a checksum), and only then put under its name, so an interrupted download never leaves
    a half file behind. Raises :class:`~capsjax.data.DataError` (one line, with what to do) when the network or the
    mirror fails.
    """
    files = MNIST_FILES if files is None else files
    directory = Path(directory).expanduser() if directory is not None else CACHE_DIR.expanduser() / "mnist"
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(f"cannot create {directory}: {err.strerror or err}; pass another directory") from None
    for name, count in files.items():
        target = directory / name
        if target.exists() and _holds(target, count):
            continue
        url = base_url.rstrip("/") + "/" + name
        partial = directory / f".partial-{os.getpid()}-{name}"  # (ends in .gz like the file: read as gzip)
        log(f"downloading {url}")
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response, open(partial, "wb") as out:
                shutil.copyfileobj(response, out)
        except (urllib.error.URLError, OSError, http.client.HTTPException) as err:  # (IncompleteRead: cut off)
            partial.unlink(missing_ok=True)
            if isinstance(err, urllib.error.HTTPError):
                reason = f"HTTP {err.code} {err.reason}"
            else:
                reason = getattr(err, "reason", None) or getattr(err, "strerror", None) or err
            raise DataError(
                f"cannot download {url} ({reason}); put the four MNIST IDX files into {directory} by hand, or pass "
                "a folder that holds them as --data-dir"
            ) from None
        if not _holds(partial, count):
            partial.unlink(missing_ok=True)
            raise DataError(
                f"{url} did not give an IDX file of {count} examples (a damaged download or a changed mirror); "
                f"try again, or put the files into {directory} by hand"
            )
        partial.replace(target)
    return directory
