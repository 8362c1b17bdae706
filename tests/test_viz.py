"""Figures: the perturbation batch of Fig. 4, PNG outputs, and metrics.jsonl reading."""

import json

import matplotlib.image
import numpy as np
import pytest

from capsjax import viz


def _read_png(path):
    assert path.exists() and path.stat().st_size > 0
    return matplotlib.image.imread(path)


def test_perturbed_capsules_matches_hand_built_batch():
    capsules = np.arange(12, dtype=np.float32).reshape(3, 4) + 1.0  # [n_classes=3, d=4], no zeros
    deltas = [-0.2, 0.0, 0.1]
    batch = viz.perturbed_capsules(capsules, 1, deltas)
    expected = np.zeros((4 * 3, 3, 4), np.float32)
    for i in range(4):
        for j, delta in enumerate(deltas):
            expected[i * 3 + j, 1] = capsules[1]
            expected[i * 3 + j, 1, i] += delta
    np.testing.assert_allclose(batch, expected, rtol=0, atol=1e-7)
    # Only capsule 1 survives and exactly one of its dimensions moves (none for delta 0).
    assert not batch[:, [0, 2]].any()
    moved = (batch[:, 1] != capsules[1]).sum(-1)
    np.testing.assert_array_equal(moved, np.tile([1, 0, 1], 4))
    with pytest.raises(ValueError, match="label 3"):
        viz.perturbed_capsules(capsules, 3, deltas)


@pytest.mark.parametrize("channels", [1, 3])
def test_pose_grid_decodes_once_and_grows_with_capsule_dim(tmp_path, channels):
    heights = {}
    for d in (4, 8):
        calls = []

        def decode(masked):
            calls.append(np.array(masked))
            level = np.abs(masked).sum((1, 2)) / (np.abs(masked).sum((1, 2)).max() + 1e-6)
            return np.broadcast_to(level[:, None, None, None], (len(masked), 10, 10, channels)).astype(np.float32)

        capsules = np.random.default_rng(d).normal(size=(5, d)).astype(np.float32)
        path = viz.plot_pose_grid(decode, capsules, 2, tmp_path / f"pose_{d}.png")
        assert len(calls) == 1
        assert calls[0].shape == (d * 11, 5, d)
        np.testing.assert_allclose(calls[0], viz.perturbed_capsules(capsules, 2, viz.DEFAULT_DELTAS))
        heights[d] = _read_png(path).shape[0]
    assert heights[8] > heights[4]


def test_pose_grid_rejects_wrong_number_of_decoded_images(tmp_path):
    with pytest.raises(ValueError, match="decode returned 1 images for 6"):
        viz.plot_pose_grid(lambda c: np.zeros((1, 4, 4, 1)), np.ones((2, 3)), 0, tmp_path / "p.png", deltas=[0, 1])


def _red_pixels(png):
    rgb = png[..., :3]
    return int(((rgb[..., 0] > 0.6) & (rgb[..., 1] < 0.3) & (rgb[..., 2] < 0.3)).sum())


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_reconstructions_png_for_gray_and_rgb(tmp_path, channels, dtype):
    rng = np.random.default_rng(0)
    gray = rng.uniform(size=(4, 12, 12, 1))
    images = np.repeat(gray, channels, -1)  # gray content in either layout, so red can only come from titles
    images = (255 * images).astype(np.uint8) if dtype == np.uint8 else images.astype(np.float32)
    labels = np.array([0, 1, 2, 3])
    right = viz.plot_reconstructions(images, images, labels, labels, tmp_path / "right.png", max_images=3)
    wrong = viz.plot_reconstructions(images, images, labels, np.array([0, 7, 2, 3]), tmp_path / "sub/wrong.png")
    assert wrong == tmp_path / "sub" / "wrong.png"
    right_png, wrong_png = _read_png(right), _read_png(wrong)
    assert right_png.shape[1] < wrong_png.shape[1]  # 3 columns vs 4
    assert _red_pixels(right_png) == 0 and _red_pixels(wrong_png) > 0


def test_reconstructions_rejects_two_channels(tmp_path):
    with pytest.raises(ValueError, match="1 or 3"):
        viz.plot_reconstructions(np.zeros((2, 8, 8, 2)), np.zeros((2, 8, 8, 2)), [0, 1], [0, 1], tmp_path / "x.png")


def _write_metrics(path, tail=""):
    lines = []
    for step in range(10, 110, 10):
        lines.append({"step": step, "epoch": step / 50, "split": "train", "loss": 1.0 / step, "margin_loss": 0.5 / step,
                      "recon_loss": 0.5 / step, "accuracy": 1 - 1.0 / step, "learning_rate": 1e-3 * 0.96 ** step,
                      "images_per_s": 1000.0})  # fmt: skip
        if step % 50 == 0:
            lines.append({"step": step, "epoch": step // 50, "split": "validation", "loss": 2.0 / step,
                          "accuracy": 1 - 2.0 / step, "error_rate": 2.0 / step})  # fmt: skip
    lines.append({"step": 100, "epoch": 2, "split": "test", "loss": 0.02, "accuracy": 0.98})
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + tail)
    return lines


def test_read_metrics_skips_truncated_last_line_only(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = _write_metrics(path, tail='{"step": 110, "epoch": 2.2, "split": "tr')
    assert viz.read_metrics(path) == lines
    _write_metrics(path, tail="\n\n")  # trailing blank lines are fine too
    assert viz.read_metrics(path) == lines

    text = path.read_text().splitlines()
    text[2] = text[2][:20]
    path.write_text("\n".join(text) + "\n")
    with pytest.raises(ValueError, match=r"metrics\.jsonl:3: not a JSON line"):
        viz.read_metrics(path)
    path.write_text('{"step": 1}\n[1, 2]\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2: expected a JSON object"):
        viz.read_metrics(path)


def test_training_curves(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    _write_metrics(metrics, tail='{"step": 11')
    full = _read_png(viz.plot_training_curves(metrics, tmp_path / "curves.png"))
    assert full.shape[1] > full.shape[0] > 100

    # Only train lines, without accuracy or learning rate: still drawn, panels left empty.
    sparse = tmp_path / "sparse.jsonl"
    sparse.write_text("".join(json.dumps({"step": s, "split": "train", "loss": 1.0 / s}) + "\n" for s in (1, 2, 3)))
    _read_png(viz.plot_training_curves(sparse, tmp_path / "sparse.png"))

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match=r"empty\.jsonl.*empty file"):
        viz.plot_training_curves(empty, tmp_path / "none.png")
    empty.write_text('{"step": 1, "spl')  # a run killed while writing its first line
    with pytest.raises(ValueError, match=r"empty\.jsonl"):
        viz.plot_training_curves(empty, tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()


def test_confusion_matrix(tmp_path):
    confusion = np.array([[50, 2, 0], [3, 40, 7], [0, 1, 60]])
    path = viz.plot_confusion_matrix(confusion, tmp_path / "confusion.png", class_names=["cat", "dog", "bird"])
    png = _read_png(path)
    assert png.shape[0] > 100 and png.shape[1] > 100
    with pytest.raises(ValueError, match="2 class names"):
        viz.plot_confusion_matrix(confusion, tmp_path / "bad.png", class_names=["a", "b"])
    with pytest.raises(ValueError, match=r"\[K, K\]"):
        viz.plot_confusion_matrix(np.zeros((2, 3)), tmp_path / "bad.png")


def test_confusion_tables_name_the_classes_of_the_dataset_scored():
    # Fashion-MNIST's confusion matrix was printed and drawn with labels 0-9; its classes are words
    from capsjax.data import class_names
    from capsjax.evaluate import class_names_for, format_confusion

    assert class_names("fashion_mnist")[9] == "Ankle boot" and class_names("cifar10")[0] == "airplane"
    assert class_names("mnist") == [str(i) for i in range(10)] and len(class_names("emnist/balanced")) == 47
    assert class_names("multimnist") == [str(i) for i in range(10)]  # MNIST's digits, two per image
    confusion = np.eye(10, dtype=int).tolist()
    names = class_names_for({"dataset": "fashion_mnist", "confusion": confusion})
    assert names == class_names("fashion_mnist")
    assert class_names_for({"dataset": "fashion_mnist", "confusion": [[1, 0], [0, 1]]}) is None  # sizes differ
    lines = format_confusion(confusion, names).splitlines()
    assert lines[0].split()[1:3] == ["T-shirt/top", "Trouser"] and lines[10].startswith("Ankle boot ")
    assert len({len(line) for line in lines}) == 1  # "T-shirt/top" (11 characters) keeps the columns aligned
