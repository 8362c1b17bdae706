"""TensorFlow Datasets as a source (the ``tfds`` extra), read through its ArrayRecord data source.

Preparing a dataset the first time downloads it (and TFDS needs TensorFlow for that step); reading an already prepared
one does not. Without a network TFDS retries for minutes before failing, so :func:`network_reachable` is asked first.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from capsjax.data.errors import HINT, DataError

TFDS_PROBE = ("storage.googleapis.com", 443)
"""Where TFDS downloads from: a dataset is prepared only if a connection there opens."""


def _import_tfds(name: str, searched: str):
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise DataError(
            f"{name}: no local copy in {searched}, and TensorFlow Datasets is not installed; "
            f'pip install "capsjax[tfds]" to download it, or {HINT}'
        ) from None
    return tfds


def network_reachable(address: tuple[str, int] = TFDS_PROBE, timeout: float = 3.0) -> bool:
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


def data_source(name: str, tfds_name: str, split: str, searched: str) -> Sequence[dict[str, Any]]:
    """A TFDS ArrayRecord data source of ``split``, downloading and preparing the dataset first if needed.

    ``searched`` names the local directories already searched (for the message when TFDS is missing).

    Returns a random-access sequence of ``{"image": uint8 [H, W, C], "label": int}`` examples."""
    tfds = _import_tfds(name, searched)
    tfds_dir = os.environ.get("TFDS_DATA_DIR") or None  # read now: TFDS itself reads it once, at import
    try:
        builder = tfds.builder(tfds_name, data_dir=tfds_dir, file_format="array_record")
    except Exception as err:  # noqa: BLE001 - TFDS raises many kinds; all mean the same to the user
        raise DataError(f"{name}: TFDS has no dataset {tfds_name!r} ({err}); {HINT}") from None
    if not builder.is_prepared():
        if not network_reachable():
            raise DataError(
                f"{name} is not prepared in the TFDS data dir ({builder.data_dir}) and {TFDS_PROBE[0]} cannot be "
                f"reached to download it; {HINT}"
            )
        try:
            builder.download_and_prepare()
        except ImportError as err:
            raise DataError(
                f"{name}: TFDS needs TensorFlow to prepare a dataset the first time ({err}); "
                f"pip install tensorflow-cpu, or {HINT}"
            ) from None
        except Exception as err:  # noqa: BLE001
            raise DataError(
                f"{name}: TFDS could not download and prepare it ({type(err).__name__}: {err}); {HINT}"
            ) from None
    try:
        return builder.as_data_source(split=split)
    except Exception as err:  # noqa: BLE001
        raise DataError(
            f"{name}: TFDS cannot read split {split!r} from {builder.data_dir} as ArrayRecord "
            f"({type(err).__name__}: {err}); delete that folder to prepare it again, or {HINT}"
        ) from None


def load_tfds(name: str, tfds_name: str, split: str, searched: str) -> tuple[np.ndarray, np.ndarray, str]:
    """``(images uint8 [N, H, W, C], labels int32 [N], where)`` of one TFDS split (see :func:`data_source`)."""
    images, labels = source_to_arrays(data_source(name, tfds_name, split, searched), f"{name} {split} (TFDS)")
    return images, labels, "TFDS"


def source_to_arrays(source: Sequence[dict[str, Any]], what: str, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
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
