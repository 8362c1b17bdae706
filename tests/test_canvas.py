"""Expanded MNIST (random placement on device, fixed placement on the host), the affNIST .mat loader, and the
affine-transformed MNIST set (affine_mnist, an approximation of affNIST)."""

import dataclasses

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from capsjax import data as datalib
from capsjax.config import ConfigError, get_config
from capsjax.data import DataError
from capsjax.data.augment import place_images, random_placement, train_augmentation
from capsjax.data.canvas import affine_transform, fixed_placement, place_on_canvas

RNG = np.random.default_rng(7)


def _digits(n, h=28, w=28):
    """Random sparse 'digits' whose every border row and column is lit (so the placement is recoverable)."""
    lit = RNG.uniform(size=(n, h, w, 1)) > 0.7
    images = np.where(lit, RNG.integers(1, 256, (n, h, w, 1)), 0).astype(np.uint8)
    images[:, 0, 0] = images[:, -1, -1] = 255
    return images


# ---- expanded MNIST: placement on the device


def test_random_placement_shape_mass_offsets_and_key():
    images = _digits(64)
    placed = np.asarray(random_placement(jax.random.key(3), jnp.asarray(images), 40))
    assert placed.shape == (64, 40, 40, 1) and placed.dtype == np.uint8
    np.testing.assert_array_equal(placed.reshape(64, -1).sum(1, dtype=np.int64),
                                  images.reshape(64, -1).sum(1, dtype=np.int64))  # fmt: skip
    corner = np.array([np.argwhere(p[..., 0] == 255).min(0) for p in placed])  # the top-left lit pixel: the offset
    assert corner.min() >= 0 and corner.max() <= 12
    for i, (dy, dx) in enumerate(corner):  # exactly the digit, shifted
        np.testing.assert_array_equal(placed[i, dy : dy + 28, dx : dx + 28], images[i])
    again = np.asarray(random_placement(jax.random.key(3), jnp.asarray(images), 40))
    np.testing.assert_array_equal(again, placed)
    other = np.asarray(random_placement(jax.random.key(4), jnp.asarray(images), 40))
    assert not np.array_equal(other, placed)


def test_random_placement_covers_every_offset_uniformly():
    dot = np.zeros((4000, 28, 28, 1), np.float32)
    dot[:, 0, 0] = 1.0
    placed = np.asarray(jax.jit(lambda k, x: random_placement(k, x, 40))(jax.random.key(0), dot))
    where = np.argwhere(placed[..., 0] == 1.0)[:, 1:]  # [N, (row, col)] of each image's single lit pixel
    counts = np.bincount(where[:, 0] * 13 + where[:, 1], minlength=169)
    assert len(where) == 4000 and counts.size == 169 and counts.min() > 0  # all 13 x 13 offsets, none outside
    assert abs(counts.mean() - 4000 / 169) < 1e-9 and counts.max() < 3 * 4000 / 169


def test_device_and_host_placement_agree_and_reject_bad_sizes():
    images = _digits(5)
    offsets = np.array([[0, 0], [12, 12], [3, 9], [12, 0], [5, 5]])
    np.testing.assert_array_equal(np.asarray(place_images(jnp.asarray(images), jnp.asarray(offsets), 40)),
                                  place_on_canvas(images, offsets, 40))  # fmt: skip
    with pytest.raises(ValueError, match="cannot hold"):
        random_placement(jax.random.key(0), jnp.asarray(images), 20)
    with pytest.raises(ValueError, match="offsets must be"):
        place_on_canvas(images, offsets + 1, 40)
    with pytest.raises(ValueError, match="set max_shift=0"):
        train_augmentation(max_shift=2, canvas_size=40)
    assert train_augmentation() is None


def test_fixed_placement_is_seeded_per_split():
    images = _digits(50)
    test = fixed_placement(images, 40, "test")
    np.testing.assert_array_equal(fixed_placement(images, 40, "test"), test)
    assert not np.array_equal(fixed_placement(images, 40, "validation"), test)
    mass = images.reshape(50, -1).sum(1, dtype=np.int64)
    np.testing.assert_array_equal(test.reshape(50, -1).sum(1, dtype=np.int64), mass)


def test_expanded_mnist_preset_and_splits(mnist_dir):
    config = get_config("expanded_mnist")
    assert config.canvas_size == 40 and config.max_shift == 0
    assert config.model.primary_grid == (12, 12) and config.model.num_primary_capsules == 12 * 12 * 32
    with pytest.raises(ConfigError, match="set max_shift=0"):
        dataclasses.replace(config, max_shift=2)
    config = dataclasses.replace(config, data_dir=str(mnist_dir), validation_examples=100)
    splits = datalib.load_datasets(config)
    assert splits.train[0].shape == (59900, 28, 28, 1)  # placed on the device, every step
    assert splits.validation[0].shape == (100, 40, 40, 1) and splits.test[0].shape == (10000, 40, 40, 1)
    raw_test = datalib.load("mnist", "test", mnist_dir)[0]
    np.testing.assert_array_equal(splits.test[0], fixed_placement(raw_test, 40, "test"))
    images, labels = datalib.load_eval_split(config, "test")  # what eval.py scores: the same fixed test set
    np.testing.assert_array_equal(images, splits.test[0])
    assert datalib.adapt_model_to_data(config, splits) == config
    # --split validation scores the run's held-out digits (it was "unknown split"); --split train the digits it trained
    # on, without the held-out ones (it scored all 60,000), at fixed offsets of the canvas
    images, labels = datalib.load_eval_split(config, "validation")
    np.testing.assert_array_equal(images, splits.validation[0])
    np.testing.assert_array_equal(labels, splits.validation[1])
    small = dataclasses.replace(config, train_examples=500)
    images, labels = datalib.load_eval_split(small, "train")
    np.testing.assert_array_equal(images, fixed_placement(splits.train[0][:500], 40, "train"))
    np.testing.assert_array_equal(labels, splits.train[1][:500])
    with pytest.raises(ConfigError, match="held out no validation examples"):
        datalib.load_eval_split(dataclasses.replace(config, validation_examples=0), "validation")


@pytest.mark.slow
def test_expanded_mnist_preset_does_not_saturate_the_class_capsules(mnist_dir):
    # Without a warm-up, Adam's first step (every W moved by the full 1e-3) made the 4,608 votes of each class capsule
    # agree: every capsule's length went to ~1 and the margin loss from 1.3 to 3.5 (chance) in one step, where it
    # stayed for ~200 steps of the first epoch (a one-epoch run ended at 50% expanded-test accuracy).
    from capsjax.steps import init_state, make_steps

    config = get_config("expanded_mnist")
    images, labels = datalib.load("mnist", "train", mnist_dir)
    images, labels = fixed_placement(images[:8], 40, "train"), labels[:8].astype(np.int32)
    graphdef, state = init_state(config.model, config.optim, seed=0)
    steps = make_steps(graphdef, config.optim, config.loss)
    losses = []
    for _ in range(2):
        state, metrics = steps.train(state, jnp.asarray(images), jnp.asarray(labels))
        losses.append(float(metrics["margin_loss"]))
    assert losses[1] < 2.0, losses  # every capsule of length ~1: 9 absent classes x 0.5 x 0.9^2 = 3.6


# ---- the affine set


def test_affine_transform_is_deterministic_keeps_mass_and_stays_on_the_canvas(mnist_dir):
    images, labels = datalib.load("mnist", "test", mnist_dir)
    images, labels = images[:300], labels[:300]
    out, matrices, centres = affine_transform(images, seed=2)
    again, _, _ = affine_transform(images, seed=2)
    np.testing.assert_array_equal(out, again)
    assert not np.array_equal(affine_transform(images, seed=3)[0], out)
    assert out.shape == (300, 40, 40, 1) and out.dtype == np.uint8
    # within affNIST's ranges: rotation +-20 deg, shear +-0.2, scales 0.8..1.2 (det = sx * sy)
    det = np.linalg.det(matrices)
    assert det.min() >= 0.8**2 - 1e-9 and det.max() <= 1.2**2 + 1e-9
    angle = np.degrees(np.arctan2(matrices[:, 1, 0], matrices[:, 0, 0]))  # the rotation (shear and scale keep x's axis)
    assert np.abs(angle).max() <= 20 + 1e-6 and np.abs(angle).max() > 15
    # the pixel mass scales with the area: det(A) times the digit's (bilinear resampling, rounding to uint8)
    ratio = out.reshape(300, -1).sum(1) / images.reshape(300, -1).sum(1) / det
    assert abs(ratio.mean() - 1) < 0.01 and np.abs(ratio - 1).max() < 0.1
    # the digits' centres spread over the canvas (translation), each digit whole on it
    assert centres.min(0).max() < 15 and centres.max(0).min() > 24


def test_affine_mnist_dataset_keeps_the_labels_and_is_named_an_approximation(mnist_dir, tmp_path):
    from capsjax.data.canvas import DATASET_NOTES

    images, labels = datalib.load("affine_mnist", "test", mnist_dir)
    _, mnist_labels = datalib.load("mnist", "test", mnist_dir)
    assert images.shape == (10000, 40, 40, 1)
    np.testing.assert_array_equal(labels, mnist_labels)
    np.testing.assert_array_equal(datalib.load("affine_mnist", "test", mnist_dir)[0][:50], images[:50])
    assert "approximation of affNIST" in DATASET_NOTES["affine_mnist"]
    with pytest.raises(DataError, match="mnist"):
        datalib.load("affine_mnist", "test", tmp_path)


def test_eval_split_checks_the_image_shape(mnist_dir):
    config = dataclasses.replace(get_config("default"), data_dir=str(mnist_dir))
    with pytest.raises(ConfigError, match=r"affine_mnist test images are 40x40x1, but the run's model takes 28x28x1"):
        datalib.load_eval_split(config, "test", dataset="affine_mnist")


# ---- the affNIST .mat files


def _write_affnist(path, images, labels, **fields):
    """An affNIST file as the official ones: struct affNISTdata, image 1600 x N (one image per column, row after
    row), label_int 1 x N."""
    scipy_io = pytest.importorskip("scipy.io")
    struct = {"image": images.reshape(len(images), -1).T.copy(), "label_int": labels.reshape(1, -1).astype(np.uint8),
              "label_one_of_n": np.eye(16, dtype=np.uint8)[labels, :10].T}  # fmt: skip
    struct.update(fields)
    path.parent.mkdir(parents=True, exist_ok=True)
    scipy_io.savemat(path, {"affNISTdata": struct})


def test_affnist_single_file_and_numbered_batches(tmp_path):
    images = _digits(7, 40, 40)
    images[0, 1, 30] = 200  # not symmetric: a transposed read would move it
    labels = np.array([3, 1, 4, 1, 5, 9, 2])
    _write_affnist(tmp_path / "single" / "test.mat", images, labels)
    x, y = datalib.load("affnist", "test", tmp_path / "single")
    assert x.shape == (7, 40, 40, 1) and x.dtype == np.uint8 and y.dtype == np.int32
    np.testing.assert_array_equal(x, images)
    np.testing.assert_array_equal(y, labels)
    for k, part in enumerate(np.array_split(np.arange(7), 3), start=1):  # 1.mat, 2.mat, 3.mat in test_batches/
        _write_affnist(tmp_path / "batches" / "test_batches" / f"{k}.mat", images[part], labels[part])
    _write_affnist(tmp_path / "batches" / "training_batches" / "1.mat", images[:2], labels[:2])
    x, y = datalib.load("affnist", "test", tmp_path / "batches")
    np.testing.assert_array_equal(x, images)
    np.testing.assert_array_equal(y, labels)
    assert datalib.load("affnist", "train", tmp_path / "batches")[0].shape == (2, 40, 40, 1)
    _write_affnist(tmp_path / "root" / "affnist" / "test.mat", images[:4], labels[:4])  # a root of dataset folders
    assert datalib.load("affnist", "test", tmp_path / "root")[0].shape == (4, 40, 40, 1)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: (d / "test.mat").write_bytes(b"not a mat file"), "not a readable MATLAB .mat file"),
        (lambda d: _write_affnist(d / "test.mat", _digits(3, 28, 28), np.array([1, 2, 3])),
         r"image has shape \(784, 3\), expected \[1600, N\]"),
        (lambda d: _write_affnist(d / "test.mat", _digits(3, 40, 40), np.array([1, 2])), "3 images but 2 labels"),
        (lambda d: _write_affnist(d / "test.mat", _digits(2, 40, 40), np.array([1, 12])), r"outside \[0, 10\)"),
        (lambda d: _write_affnist(d / "test.mat", _digits(2, 40, 40) / 255.0, np.array([1, 2])),
         r"whole numbers in 0\.\.255"),
        (lambda d: pytest.importorskip("scipy.io").savemat(d / "test.mat", {"images": np.zeros((1600, 2))}),
         "no affNISTdata struct"),
        (lambda d: pytest.importorskip("scipy.io").savemat(d / "test.mat", {"affNISTdata": {"image": np.zeros((1600, 1))}}),
         "no field 'label_int'"),
        (lambda d: [_write_affnist(d / "test_batches" / f"{k}.mat", _digits(1, 40, 40), np.array([1])) for k in (1, 3)],
         "not 2.mat"),
        (lambda d: d.mkdir(exist_ok=True), "none of test.mat"),
    ],
    ids=["garbage", "28x28", "count", "label", "scaled", "no-struct", "no-field", "gap", "missing"],
)  # fmt: skip
def test_affnist_broken_files_raise_one_clear_error(tmp_path, make, message):
    directory = tmp_path / "affnist"
    directory.mkdir()
    make(directory)
    with pytest.raises(DataError, match=message) as info:
        datalib.load("affnist", "test", directory)
    assert "\n" not in str(info.value)


def test_affnist_without_local_files_says_tfds_has_none(tmp_path, monkeypatch):
    monkeypatch.setenv("CAPSJAX_DATA", str(tmp_path))
    monkeypatch.setattr("capsjax.data.registry.CACHE_DIR", tmp_path / "cache")
    with pytest.raises(DataError, match="TFDS has no affnist"):
        datalib.load("affnist", "test")


# ---- end to end


@pytest.mark.slow
def test_cli_expanded_mnist_cnn_then_affine_mnist(tmp_path, mnist_dir, optimized_env):
    """A tiny baseline CNN trained on expanded MNIST through train.py, scored by eval.py on its expanded test set and
    on affine_mnist (named as an approximation of affNIST); missing affNIST files are one line and status 2."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]

    def run(script, *args):
        env = {**optimized_env, "PYTHONPATH": str(root)}  # it scores 2 x 10,000 images: XLA's optimised code
        return subprocess.run([sys.executable, str(root / script), *args], cwd=tmp_path, env=env, capture_output=True,
                              text=True)  # fmt: skip

    work = tmp_path / "run"
    tiny = ["--set", "model.cnn_channels=4,4", "--set", "model.cnn_hidden=16", "--set", "test_every_epoch=false"]
    result = run("train.py", "--preset", "expanded_mnist", "--arch", "cnn", *tiny, "--data-dir", str(mnist_dir),
                 "--train-examples", "256", "--validation-examples", "100", "--epochs", "1", "--batch-size", "32",
                 "--set", "also_test_on=affine_mnist", "--workdir", str(work), "--quiet")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "affine_mnist" in result.stdout  # the epoch's line names the extra test set's accuracy
    logged = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    (epoch_end,) = [r for r in logged if r.get("split") == "affine_mnist"]
    config = json.loads((work / "config.json").read_text())
    assert config["model"]["arch"] == "cnn" and config["model"]["image_shape"] == [40, 40, 1]
    assert config["canvas_size"] == 40
    result = run("eval.py", "--workdir", str(work), "--no-figures")
    assert result.returncode == 0, result.stderr
    assert json.loads((work / "eval_test.json").read_text())["count"] == 10000
    result = run("eval.py", "--workdir", str(work), "--dataset", "affine_mnist")
    assert result.returncode == 0, result.stderr
    assert "affine_mnist (an approximation of affNIST) test: accuracy" in result.stdout
    metrics = json.loads((work / "eval_affine_mnist_test.json").read_text())
    assert metrics["dataset"] == "affine_mnist" and "approximation of affNIST" in metrics["note"]
    assert metrics["count"] == 10000 and "cross_entropy" in metrics
    # the epoch's own score of affine_mnist (also_test_on) is eval.py's score of the same checkpoint
    assert metrics["step"] == epoch_end["step"] and metrics["accuracy"] == epoch_end["accuracy"]
    from capsjax.config import load_config

    images, labels = datalib.load_eval_split(load_config(work / "config.json"), "test", mnist_dir, "affine_mnist")
    assert metrics["data_sha256"] == datalib.arrays_sha256(images, labels)  # what another run's evaluation compares
    for name in ("affine_mnist_examples.png", "confusion_affine_mnist.png"):
        assert (work / name).stat().st_size > 1000, name
    result = run("eval.py", "--workdir", str(work), "--dataset", "affnist", "--data-dir", str(tmp_path))
    assert result.returncode == 2 and "none of test.mat" in result.stderr


def test_also_test_on_names_other_test_sets_and_may_change_on_resume(tmp_path):
    from capsjax.config import replace_path
    from capsjax.workdir import refused_changes

    config = get_config("expanded_mnist")
    extra = replace_path(config, "also_test_on", "affine_mnist")
    assert extra.also_test_on == ("affine_mnist",)
    assert replace_path(config, "also_test_on", "affine_mnist,affnist").also_test_on == ("affine_mnist", "affnist")
    for bad in ("mnist", "test", "affine_mnist,affine_mnist"):  # the run's own set, a split's name, twice
        with pytest.raises(ConfigError, match="name other datasets than the run's own"):
            replace_path(config, "also_test_on", bad)
    assert not refused_changes(config, extra)  # scoring more sets changes no step: a resumed run may add them


def test_random_flip_mirrors_a_random_half_and_composes_with_the_shifts():
    from capsjax.data.augment import random_flip, random_shift

    images = jnp.asarray(_digits(64))
    key = jax.random.key(3)
    out = np.asarray(random_flip(key, images))
    mirrored = np.asarray(images)[:, :, ::-1, :]
    flipped = np.array([np.array_equal(o, m) for o, m in zip(out, mirrored)])
    kept = np.array([np.array_equal(o, i) for o, i in zip(out, np.asarray(images))])
    assert np.all(flipped ^ kept) and 16 < flipped.sum() < 48  # each image one or the other; about half flipped
    np.testing.assert_array_equal(np.asarray(random_flip(key, images)), out)  # reproducible from the key
    # with shifts: the shifts are those of the run without flips, then the flips of the folded key
    both = np.asarray(train_augmentation(max_shift=2, horizontal_flip=True)(key, images))
    shifted = np.asarray(random_shift(key, images, 2))
    expected = np.asarray(random_flip(jax.random.fold_in(key, 1), jnp.asarray(shifted)))
    np.testing.assert_array_equal(both, expected)
    alone = train_augmentation(horizontal_flip=True)(key, images)
    np.testing.assert_array_equal(np.asarray(alone), np.asarray(random_flip(jax.random.fold_in(key, 1), images)))
    assert train_augmentation(max_shift=2)(key, images).shape == images.shape


def test_horizontal_flip_config():
    from capsjax.config import ConfigError, TrainConfig, get_config, replace_path

    assert replace_path(get_config("fashion_mnist"), "horizontal_flip", "true").horizontal_flip is True
    assert TrainConfig().horizontal_flip is False
    with pytest.raises(ConfigError, match="horizontal_flip=false"):
        replace_path(get_config("multimnist"), "horizontal_flip", "true")


@pytest.mark.parametrize("preset", ["expanded_mnist", "multimnist"])
def test_the_hashes_a_run_records_are_those_eval_computes(preset, mnist_dir):
    # eval.py refuses data whose hash differs from the one training recorded (data.json): the two must agree for the
    # sets training builds (placed on a canvas, or MultiMNIST's fixed pairs), or eval would refuse the run's own data
    import dataclasses

    from capsjax import data as datalib
    from capsjax.config import get_config

    config = dataclasses.replace(get_config(preset), data_dir=str(mnist_dir))
    if preset == "multimnist":
        config = dataclasses.replace(
            config, multimnist=dataclasses.replace(config.multimnist, test_pairs=300, validation_pairs=200)
        )
    datasets = datalib.load_datasets(config)
    config = datalib.adapt_model_to_data(config, datasets)
    for split, recorded in datasets.scored_sha256().items():
        assert recorded == datalib.arrays_sha256(*datalib.load_eval_split(config, split)), split
