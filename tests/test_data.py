"""Loading datasets: the registry and its directories, file formats and their failure modes, TFDS, synthetic data.

The input pipeline, augmentation and MultiMNIST are tested in test_data_pipeline.py."""

import gzip
import importlib.util
import socket
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from capsjax import data as datalib
from capsjax.data import DataError, registry
from capsjax.data import tfds as tfds_source

ROOT = Path(__file__).resolve().parents[1]
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")

SHAPE = (7, 5)  # tiny, non-square images: catches H/W mix-ups
N_TRAIN, N_TEST = 12, 4


@pytest.fixture(autouse=True)
def _no_default_data(tmp_path_factory, monkeypatch):
    """No test sees (or writes into) the user's $CAPSJAX_DATA, ~/.cache/capsjax or TFDS data dir."""
    empty = tmp_path_factory.mktemp("no_default_data")
    monkeypatch.setenv(datalib.DATA_ENV, str(empty / "env"))
    monkeypatch.setenv("TFDS_DATA_DIR", str(empty / "tfds"))
    monkeypatch.setattr(registry, "CACHE_DIR", empty / "cache")


def _tiny_arrays(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "train": (
            rng.integers(0, 256, (N_TRAIN, *SHAPE), dtype=np.uint8),
            rng.integers(0, 10, N_TRAIN, dtype=np.uint8),
        ),
        "t10k": (rng.integers(0, 256, (N_TEST, *SHAPE), dtype=np.uint8), rng.integers(0, 10, N_TEST, dtype=np.uint8)),
    }


def _write_idx_dir(directory, arrays=None, ext=".gz", sep="-", prefix=""):
    """Writes the four IDX files of a tiny MNIST-like dataset; returns the arrays written."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    arrays = arrays or _tiny_arrays()
    for stem, (images, labels) in arrays.items():
        datalib.write_idx(directory / f"{prefix}{stem}-images{sep}idx3-ubyte{ext}", images)
        datalib.write_idx(directory / f"{prefix}{stem}-labels{sep}idx1-ubyte{ext}", labels)
    return arrays


def _listing(directory):
    return sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in Path(directory).iterdir())


# ---------------------------------------------------------------------------------------------------------------------
# IDX files
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ext, sep", [(".gz", "-"), ("", "-"), ("", "."), (".gz", ".")])
def test_idx_round_trip(tmp_path, ext, sep):
    arrays = _write_idx_dir(tmp_path, ext=ext, sep=sep)
    before = _listing(tmp_path)
    for split, stem in (("train", "train"), ("test", "t10k")):
        images, labels = datalib.load("mnist", split, data_dir=tmp_path)
        assert images.dtype == np.uint8 and images.shape == (len(arrays[stem][0]), *SHAPE, 1)
        assert labels.dtype == np.int32
        np.testing.assert_array_equal(images[..., 0], arrays[stem][0])
        np.testing.assert_array_equal(labels, arrays[stem][1])
        assert images.flags.writeable
    assert _listing(tmp_path) == before, "load() must not write into the data directory"


@pytest.mark.parametrize(
    "array", [np.arange(24, dtype=np.int16).reshape(4, 6) - 7, np.linspace(-1, 1, 10, dtype=np.float32), np.eye(3)]
)
def test_read_write_idx_other_dtypes(tmp_path, array):
    for name in ("a.idx", "a.idx.gz"):
        datalib.write_idx(tmp_path / name, array)
        back = datalib.read_idx(tmp_path / name)
        assert back.dtype == array.dtype and back.dtype.isnative
        np.testing.assert_array_equal(back, array)


def test_idx_header_is_big_endian_mnist_layout(tmp_path):
    datalib.write_idx(tmp_path / "x", np.zeros((3, 2, 4), np.uint8))
    raw = (tmp_path / "x").read_bytes()
    assert raw[:16] == bytes([0, 0, 8, 3, 0, 0, 0, 3, 0, 0, 0, 2, 0, 0, 0, 4]) and len(raw) == 16 + 24


def _truncate(path, keep):
    path.write_bytes(path.read_bytes()[:keep])


def _rewrite_gz(path, change):
    """Rewrites a gzipped file with ``change(decompressed bytes)``, as a valid gzip."""
    path.write_bytes(gzip.compress(change(gzip.decompress(path.read_bytes()))))


def _corrupt_middle(path):
    raw = bytearray(path.read_bytes())
    mid = len(raw) // 2
    raw[mid : mid + 8] = bytes(b ^ 0xFF for b in raw[mid : mid + 8])
    path.write_bytes(bytes(raw))


def _truncated_raw_images(d):
    """Replaces the gzipped training images by a raw file missing its last 9 bytes."""
    gz = d / "train-images-idx3-ubyte.gz"
    (d / "train-images-idx3-ubyte").write_bytes(gzip.decompress(gz.read_bytes())[:-9])
    gz.unlink()


def _bad_labels(d):
    labels = np.full(N_TRAIN, 3, np.uint8)
    labels[5] = 10
    datalib.write_idx(d / "train-labels-idx1-ubyte.gz", labels)


TRAIN_IMAGES, TRAIN_LABELS = "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"
TEST_IMAGES, TEST_LABELS = "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"
HTML = b"<html>not found</html>"

# what to break in a good directory, the split to load, the file the message must name, and a text it must contain
BREAKAGES = [
    pytest.param(lambda d: (d / TEST_LABELS).unlink(), "test", TEST_LABELS, "--data-dir", id="missing file"),
    pytest.param(_truncated_raw_images, "train", "train-images-idx3-ubyte", "truncated", id="truncated raw"),
    pytest.param(lambda d: _rewrite_gz(d / TRAIN_IMAGES, lambda b: b[:-3]), "train", TRAIN_IMAGES, "truncated",
                 id="truncated payload"),
    pytest.param(lambda d: _rewrite_gz(d / TEST_LABELS, lambda b: b + b"\0"), "test", TEST_LABELS,
                 "longer than its header", id="too long"),
    pytest.param(lambda d: _truncate(d / TRAIN_LABELS, 30), "train", TRAIN_LABELS, "gzip", id="truncated gzip"),
    pytest.param(lambda d: _corrupt_middle(d / TRAIN_IMAGES), "train", TRAIN_IMAGES, "gzip", id="corrupt gzip"),
    pytest.param(lambda d: (d / TEST_IMAGES).write_bytes(HTML), "test", TEST_IMAGES, "not a gzip file", id="not gzip"),
    pytest.param(lambda d: (d / TEST_IMAGES).write_bytes(gzip.compress(HTML)), "test", TEST_IMAGES, "not an IDX file",
                 id="not idx"),
    pytest.param(lambda d: datalib.write_idx(d / TEST_IMAGES, np.zeros(N_TEST, np.uint8)), "test", TEST_IMAGES,
                 "magic number 2049, expected 2051", id="wrong magic"),
    pytest.param(lambda d: datalib.write_idx(d / TEST_LABELS, np.zeros(N_TEST, np.int32)), "test", TEST_LABELS,
                 "expected 2049", id="wrong dtype"),
    pytest.param(lambda d: datalib.write_idx(d / TRAIN_LABELS, np.zeros(N_TRAIN - 1, np.uint8)), "train", TRAIN_LABELS,
                 f"{N_TRAIN} images but {TRAIN_LABELS} holds {N_TRAIN - 1}", id="count mismatch"),
    pytest.param(_bad_labels, "train", TRAIN_LABELS, "outside [0, 10)", id="labels out of range"),
]  # fmt: skip


@pytest.mark.parametrize("break_it, split, name, text", BREAKAGES)
def test_bad_files_raise_data_error_naming_the_file(tmp_path, break_it, split, name, text):
    _write_idx_dir(tmp_path)
    break_it(tmp_path)
    before = _listing(tmp_path)
    with pytest.raises(DataError) as info:
        datalib.load("mnist", split, data_dir=tmp_path)
    message = str(info.value)
    assert name in message and text in message, message
    assert str(tmp_path) in message, message
    assert _listing(tmp_path) == before


def test_missing_directory(tmp_path):
    with pytest.raises(DataError, match="--data-dir") as info:
        datalib.load("mnist", "train", data_dir=tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(info.value) and "does not exist" in str(info.value)
    assert not (tmp_path / "nowhere").exists()
    (tmp_path / "afile").write_text("x")
    with pytest.raises(DataError, match="not a directory"):
        datalib.load("mnist", "train", data_dir=tmp_path / "afile")


@pytest.mark.parametrize("name", ["nosuchdata", "MNIST", "emnist"])
def test_unknown_dataset(name):
    with pytest.raises(DataError, match="unknown dataset") as info:
        datalib.load(name, "train")
    assert repr(name) in str(info.value) and "fashion_mnist" in str(info.value)


@pytest.mark.parametrize("split", ["valid", "validation"])
def test_unknown_split(tmp_path, split):
    """Only the original splits: the trainer holds its validation examples out of "train" itself."""
    _write_idx_dir(tmp_path)
    with pytest.raises(DataError, match=f"unknown split '{split}'") as info:
        datalib.load("mnist", split, tmp_path)
    assert datalib.SPLITS == ("train", "test") and all(s in str(info.value) for s in datalib.SPLITS)


def test_default_directories_in_order(tmp_path, monkeypatch):
    env_root, cache_root = tmp_path / "env", tmp_path / "cache"
    cache = _write_idx_dir(cache_root / "fashion_mnist", _tiny_arrays(seed=1))
    monkeypatch.setenv(datalib.DATA_ENV, str(env_root))
    monkeypatch.setattr(registry, "CACHE_DIR", cache_root)
    np.testing.assert_array_equal(datalib.load("fashion_mnist", "test")[1], cache["t10k"][1])
    env = _write_idx_dir(env_root / "fashion_mnist", _tiny_arrays(seed=2))
    np.testing.assert_array_equal(datalib.load("fashion_mnist", "test")[1], env["t10k"][1])
    # a default directory that exists but is broken is reported, not skipped
    (env_root / "fashion_mnist" / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(DataError, match="t10k-images"):
        datalib.load("fashion_mnist", "test")


def test_data_dir_may_be_a_root_of_dataset_folders(tmp_path):
    arrays = _write_idx_dir(tmp_path / "kmnist")
    np.testing.assert_array_equal(datalib.load("kmnist", "test", tmp_path)[1], arrays["t10k"][1])


def test_emnist_prefixed_files_are_transposed(tmp_path):
    arrays = _tiny_arrays()
    arrays = {"train": arrays["train"], "test": arrays["t10k"]}
    _write_idx_dir(tmp_path / "emnist", arrays, prefix="emnist-digits-")
    images, labels = datalib.load("emnist/digits", "test", tmp_path / "emnist")
    assert images.shape == (N_TEST, SHAPE[1], SHAPE[0], 1)
    np.testing.assert_array_equal(images[..., 0], arrays["test"][0].transpose(0, 2, 1))
    np.testing.assert_array_equal(labels, arrays["test"][1])


def test_emnist_refuses_a_folder_of_plain_mnist_names(tmp_path):
    # EMNIST fell back to unprefixed names: a folder of MNIST's files loaded as emnist/letters (their labels 0..9 lie
    # in its 27 classes), transposed, without a word
    _write_idx_dir(tmp_path / "mnist")
    with pytest.raises(datalib.DataError, match="emnist-letters-t10k-images-idx3-ubyte.gz"):
        datalib.load("emnist/letters", "test", tmp_path / "mnist")


def test_cifar10_binary_version(tmp_path):
    rng = np.random.default_rng(0)
    chw = rng.integers(0, 256, (6, 3, 32, 32), dtype=np.uint8)
    labels = np.array([0, 9, 3, 4, 5, 1], np.uint8)
    records = np.concatenate([labels[:, None], chw.reshape(6, -1)], axis=1)
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    for i in range(5):
        (folder / f"data_batch_{i + 1}.bin").write_bytes(records[i : i + 1].tobytes())
    (folder / "test_batch.bin").write_bytes(records[5:].tobytes())
    images, got = datalib.load("cifar10", "train", tmp_path)
    assert images.shape == (5, 32, 32, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(images, chw[:5].transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(got, labels[:5])
    _truncate(folder / "test_batch.bin", 3000)
    with pytest.raises(DataError, match="test_batch.bin.*truncated"):
        datalib.load("cifar10", "test", tmp_path)


def test_svhn_mat_files(tmp_path):
    scipy_io = pytest.importorskip("scipy.io")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (32, 32, 3, 4), dtype=np.uint8)
    scipy_io.savemat(tmp_path / "test_32x32.mat", {"X": x, "y": np.array([[10], [1], [9], [10]], np.uint8)})
    images, labels = datalib.load("svhn_cropped", "test", tmp_path)
    np.testing.assert_array_equal(images, x.transpose(3, 0, 1, 2))
    np.testing.assert_array_equal(labels, [0, 1, 9, 0])  # SVHN's "10" is the digit 0
    (tmp_path / "train_32x32.mat").write_bytes(b"garbage")
    with pytest.raises(DataError, match="train_32x32.mat"):
        datalib.load("svhn_cropped", "train", tmp_path)


# ---------------------------------------------------------------------------------------------------------------------
# TFDS
# ---------------------------------------------------------------------------------------------------------------------


def test_without_tfds_the_error_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # makes the import fail
    with pytest.raises(DataError) as info:
        datalib.load("kmnist", "train")
    message = str(info.value)
    assert 'pip install "capsjax[tfds]"' in message and "--data-dir" in message and "kmnist" in message


class _FakeSource:
    """A random-access source shaped like TFDS's ArrayRecord data source (no batch __getitems__)."""

    def __init__(self, images, labels):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i], "label": np.int64(self.labels[i])}


def test_tfds_source_conversion(monkeypatch):
    """Our conversion of a data source's examples, through load(), without TFDS itself."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2100, 28, 28), dtype=np.uint8)  # 2-D images get a channel axis; > one chunk
    labels = rng.integers(0, 10, 2100)
    calls = []

    def fake_source(name, tfds_name, split, searched):
        calls.append((name, tfds_name, split))
        return _FakeSource(images, labels)

    monkeypatch.setattr(tfds_source, "data_source", fake_source)
    x, y = datalib.load("emnist/mnist", "test")
    assert calls == [("emnist/mnist", "emnist/mnist", "test")]
    assert x.shape == (2100, 28, 28, 1) and x.dtype == np.uint8 and y.dtype == np.int32
    np.testing.assert_array_equal(x[..., 0], images)
    np.testing.assert_array_equal(y, labels)
    labels[7] = 12
    with pytest.raises(DataError, match="outside"):
        datalib.load("emnist/mnist", "test")


@pytest.fixture
def tfds():
    tfds = pytest.importorskip("tensorflow_datasets")
    pytest.importorskip("importlib_resources")
    return tfds


@pytest.mark.parametrize("name, shape", [("mnist", (28, 28, 1)), ("cifar10", (32, 32, 3))])
def test_tfds_mock_data(tfds, monkeypatch, name, shape):
    """TFDS's own mock (random examples, no files, no network) through our TFDS path: builder, data source, decode."""
    monkeypatch.setattr(tfds_source, "network_reachable", lambda *a, **k: True)
    with tfds.testing.mock_data(num_examples=9):
        images, labels = datalib.load(name, "train")
    assert images.shape == (9, *shape) and images.dtype == np.uint8
    assert labels.shape == (9,) and labels.dtype == np.int32
    assert labels.min() >= 0 and labels.max() < 10 and images.std() > 0


def test_tfds_fails_fast_without_network(tfds, monkeypatch):
    monkeypatch.setattr(tfds_source, "network_reachable", lambda *a, **k: False)
    start = time.perf_counter()
    with tfds.testing.mock_data(num_examples=3), pytest.raises(DataError) as info:
        datalib.load("mnist", "test")
    assert time.perf_counter() - start < 10
    message = str(info.value)
    assert "not prepared" in message and "--data-dir" in message and "mnist" in message


def test_network_probe_on_localhost(monkeypatch):
    monkeypatch.delenv("HTTPS_PROXY", raising=False)
    monkeypatch.delenv("https_proxy", raising=False)
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    try:
        assert tfds_source.network_reachable(("127.0.0.1", port), timeout=2.0)
    finally:
        server.close()
    start = time.perf_counter()
    assert not tfds_source.network_reachable(("127.0.0.1", port), timeout=2.0)  # closed now: refused
    assert time.perf_counter() - start < 3


def _fake_downloads(tfds, monkeypatch, directory):
    """TFDS's MNIST download step returns the (decompressed) IDX files in ``directory`` instead of fetching them."""
    files = {
        "train_data": directory / "train-images-idx3-ubyte",
        "train_labels": directory / "train-labels-idx1-ubyte",
        "test_data": directory / "t10k-images-idx3-ubyte",
        "test_labels": directory / "t10k-labels-idx1-ubyte",
    }
    monkeypatch.setattr(tfds.download.DownloadManager, "download_and_extract", lambda self, urls: files)


def test_tfds_prepare_without_tensorflow_says_so(tfds, tmp_path, monkeypatch):
    """The real TFDS builder, offline: without TensorFlow it cannot prepare, and the error says what to install."""
    if importlib.util.find_spec("tensorflow") is not None:
        pytest.skip("TensorFlow is installed: test_tfds_real_prepare_from_local_files prepares for real")
    _write_idx_dir(tmp_path / "raw", ext="")
    _fake_downloads(tfds, monkeypatch, tmp_path / "raw")
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
    monkeypatch.setattr(tfds_source, "network_reachable", lambda *a, **k: True)
    with pytest.raises(DataError, match="needs TensorFlow") as info:
        datalib.load("mnist", "test")
    assert "pip install tensorflow-cpu" in str(info.value) and "--data-dir" in str(info.value)
    assert (tmp_path / "tfds").is_dir()  # TFDS_DATA_DIR is honoured when set after TFDS was imported


def test_tfds_real_prepare_from_local_files(tfds, tmp_path, monkeypatch, mnist_dir):
    """The real TFDS build (TensorFlow needed to prepare) from the local MNIST files, then read without TF's help."""
    pytest.importorskip("tensorflow")
    raw = tmp_path / "raw"
    raw.mkdir()
    for gz in mnist_dir.glob("*-ubyte.gz"):
        (raw / gz.stem).write_bytes(gzip.decompress(gz.read_bytes()))
    _fake_downloads(tfds, monkeypatch, raw)
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
    monkeypatch.setattr(tfds_source, "network_reachable", lambda *a, **k: True)
    images, labels = datalib.load("mnist", "test")
    assert images.shape == (10000, 28, 28, 1) and images.dtype == np.uint8
    np.testing.assert_array_equal(np.bincount(labels, minlength=10), MNIST_TEST_COUNTS)
    # now prepared: read again with the network "down"
    monkeypatch.setattr(tfds_source, "network_reachable", lambda *a, **k: False)
    assert len(datalib.load("mnist", "test")[0]) == 10000
    assert (tmp_path / "tfds" / "mnist").is_dir()


# ---------------------------------------------------------------------------------------------------------------------
# Synthetic data
# ---------------------------------------------------------------------------------------------------------------------


def test_synthetic_is_deterministic_and_class_recoverable():
    x, y = datalib.load_synthetic(1000, seed=3)
    x2, y2 = datalib.load_synthetic(1000, seed=3)
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(y, y2)
    assert x.shape == (1000, 28, 28, 1) and x.dtype == np.uint8 and y.dtype == np.int32
    assert set(np.unique(y)) == set(range(10))
    assert not np.array_equal(datalib.load_synthetic(1000, seed=4)[0], x)
    # a nearest-class-mean classifier fit on the train split recovers the test labels
    train_x, train_y = datalib.load("synthetic", "train")
    test_x, test_y = datalib.load("synthetic", "test")
    assert len(train_x) == registry.SYNTHETIC_SIZES["train"] and len(test_x) == registry.SYNTHETIC_SIZES["test"]
    flat = train_x.reshape(len(train_x), -1).astype(np.float32)
    means = np.stack([flat[train_y == k].mean(0) for k in range(10)])
    test_flat = test_x.reshape(len(test_x), -1).astype(np.float32)
    distances = (np.square(test_flat[:, None, :] - means[None, :, :])).sum(-1)
    assert (distances.argmin(1) == test_y).mean() > 0.9


def test_synthetic_other_shapes():
    x, y = datalib.load_synthetic(20, image_shape=(32, 24, 3), num_classes=4, seed=0)
    assert x.shape == (20, 32, 24, 3) and y.max() < 4 and x.max() > 100


# ---------------------------------------------------------------------------------------------------------------------
# Real data, where this machine has it
# ---------------------------------------------------------------------------------------------------------------------

MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_real_mnist(mnist_dir):
    before = _listing(mnist_dir)
    x, y = datalib.load("mnist", "train", mnist_dir)
    assert x.shape == (60000, 28, 28, 1) and x.dtype == np.uint8 and y.dtype == np.int32
    np.testing.assert_array_equal(y[:5], [5, 0, 4, 1, 9])
    tx, ty = datalib.load("mnist", "test", mnist_dir)
    assert tx.shape == (10000, 28, 28, 1)
    np.testing.assert_array_equal(np.bincount(ty, minlength=10), MNIST_TEST_COUNTS)
    assert _listing(mnist_dir) == before


@pytest.mark.skipif(not FASHION_DIR.is_dir(), reason=f"Fashion-MNIST not found in {FASHION_DIR}")
def test_real_fashion_mnist():
    x, y = datalib.load("fashion_mnist", "test", FASHION_DIR)
    assert x.shape == (10000, 28, 28, 1) and x.dtype == np.uint8
    np.testing.assert_array_equal(np.bincount(y, minlength=10), [1000] * 10)
    assert len(datalib.load("fashion_mnist", "train", FASHION_DIR)[0]) == 60000


def test_download_mnist_from_a_mirror_without_tensorflow(tmp_path):
    # Colab's TPU runtimes have no TensorFlow, which TFDS needs to prepare MNIST: the notebook fetches the IDX files
    # instead. Served here by a local HTTP server from small files in MNIST's format.
    import functools
    import http.server
    import threading

    rng = np.random.default_rng(0)
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    counts = {"train": 30, "t10k": 10}
    arrays = {}
    for stem, n in counts.items():
        arrays[stem] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n).astype(np.uint8)
        datalib.write_idx(mirror / f"{stem}-images-idx3-ubyte.gz", arrays[stem][0])
        datalib.write_idx(mirror / f"{stem}-labels-idx1-ubyte.gz", arrays[stem][1])
    kinds = ("images-idx3-ubyte.gz", "labels-idx1-ubyte.gz")
    files = {f"{stem}-{kind}": counts[stem] for stem in counts for kind in kinds}
    requests = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            requests.append(self.path)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(mirror)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    try:
        dest = tmp_path / "cache" / "mnist"
        assert datalib.download_mnist(dest, base_url=url, files=files, log=lambda _: None) == dest
        images, labels = datalib.load("mnist", "train", dest)
        np.testing.assert_array_equal(images[..., 0], arrays["train"][0])
        np.testing.assert_array_equal(labels, arrays["train"][1])
        fetched = len(requests)
        datalib.download_mnist(dest, base_url=url, files=files, log=lambda _: None)  # all there: nothing fetched
        assert fetched == 4 and len(requests) == fetched
        (dest / "t10k-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8b damaged")  # fetched again, alone
        datalib.download_mnist(dest, base_url=url, files=files, log=lambda _: None)
        assert len(requests) == fetched + 1 and datalib.load("mnist", "test", dest)[1].shape == (10,)
        # a mirror that serves a truncated file, or none: one line, and nothing under the file's name
        halve = lambda b: b[: len(b) // 2]  # noqa: E731
        for stem, damage in (("train-images-idx3-ubyte.gz", halve), ("train-labels-idx1-ubyte.gz", None)):
            data = (mirror / stem).read_bytes()
            if damage is None:
                (mirror / stem).unlink()
            else:
                (mirror / stem).write_bytes(damage(data))
            fresh = tmp_path / f"fresh-{stem}"
            message = "did not give an IDX file of 30 examples" if damage else r"cannot download .*\(HTTP 404 "
            with pytest.raises(datalib.DataError, match=message):
                datalib.download_mnist(fresh, base_url=url, files=files, log=lambda _: None)
            assert not (fresh / stem).exists() and not list(fresh.glob(".partial-*"))
            (mirror / stem).write_bytes(data)
    finally:
        server.shutdown()
        server.server_close()
    with pytest.raises(datalib.DataError, match=r"cannot download http://127.0.0.1:1/train-images.* by hand"):
        datalib.download_mnist(tmp_path / "offline", base_url="http://127.0.0.1:1/", files=files, log=lambda _: None)
    from capsjax.data.__main__ import main  # python -m capsjax.data download mnist: the same, one line

    assert main(["download", "mnist", "--dir", str(tmp_path / "cli"), "--mirror", "http://127.0.0.1:1/"]) == 1

