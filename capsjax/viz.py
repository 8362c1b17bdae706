"""Figures: reconstructions, capsule pose perturbations (Fig. 4 of the paper), MultiMNIST reconstructions (Fig. 5),
training curves, confusion matrices.

Everything here works on NumPy arrays (JAX arrays are converted) and plain callables, and writes PNG files through
:class:`matplotlib.figure.Figure` objects with the Agg canvas, so no global pyplot state and no display are involved.
Every ``plot_*`` function creates the parent directory of ``path`` and returns ``path`` as a :class:`~pathlib.Path`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = [
    "plot_reconstructions",
    "perturbed_capsules",
    "plot_pose_grid",
    "read_metrics",
    "plot_training_curves",
    "plot_confusion_matrix",
    "overlay_pair",
    "plot_multidigit",
]

DEFAULT_DELTAS = np.linspace(-0.25, 0.25, 11)

_STYLES = {  # line styles of the training curves, by split
    "train": {"linewidth": 1.0},
    "validation": {"marker": "o", "markersize": 3},
    "test": {"marker": "*", "markersize": 9, "linestyle": ""},
}


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | Path, dpi: int = 100) -> Path:
    path = Path(path)
    if not path.suffix:  # Matplotlib would write NAME.png and the caller report NAME
        path = path.with_suffix(".png")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight", pad_inches=0.1)
    return path


def _as_display(images: Any) -> np.ndarray:
    """[N, H, W, C] or [N, H, W] (uint8 in [0, 255] or float in [0, 1]) -> float [N, H, W] or [N, H, W, 3] in [0, 1]."""
    images = np.asarray(images)
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] != 3):
        raise ValueError(f"images must be [N, H, W, 1 or 3] or [N, H, W], got shape {images.shape}")
    if images.dtype == np.uint8:
        return images.astype(np.float32) / 255.0
    return np.clip(images.astype(np.float32), 0.0, 1.0)


def _show(ax, image: np.ndarray) -> None:
    ax.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def _label_text(label: Any) -> str:
    """A class index, or the classes present in a multi-hot vector (MultiMNIST), as text."""
    label = np.asarray(label)
    if label.ndim == 0:
        return str(int(label))
    return ",".join(str(i) for i in np.flatnonzero(label))


def plot_reconstructions(
    images: Any,
    reconstructions: Any,
    labels: Any,
    predictions: Any,
    path: str | Path,
    max_images: int = 10,
    title: str | None = None,
) -> Path:
    """Top row: the inputs ``images`` [N, H, W, C] titled with their true ``labels`` [N]; bottom row: the
    ``reconstructions`` [N, H, W, C] titled with the ``predictions`` [N] (in red where wrong). Images are uint8 in
    [0, 255] or float in [0, 1], C is 1 (gray) or 3 (RGB); at most ``max_images`` columns are drawn. With
    ``reconstructions=None`` (a model without decoder) one row of inputs, titled with both; ``title`` goes above."""
    images = _as_display(images)
    recon = None if reconstructions is None else _as_display(reconstructions)
    n = min(len(images), len(labels), len(predictions), max_images, len(images) if recon is None else len(recon))
    if n == 0:
        raise ValueError("plot_reconstructions needs at least one image")
    rows = 1 if recon is None else 2
    fig = _figure(1.2 * n, 1.4 * rows + (0.3 if title else 0.0))
    axes = fig.subplots(rows, n, squeeze=False)
    for i in range(n):
        true, pred = _label_text(labels[i]), _label_text(predictions[i])
        color = "black" if pred == true else "red"
        _show(axes[0, i], images[i])
        if recon is None:
            axes[0, i].set_title(f"true {true}\npred {pred}", fontsize=9, color=color)
            continue
        axes[0, i].set_title(f"true {true}", fontsize=9)
        _show(axes[1, i], recon[i])
        axes[1, i].set_title(f"pred {pred}", fontsize=9, color=color)
    axes[0, 0].set_ylabel("input")
    if recon is not None:
        axes[1, 0].set_ylabel("reconstruction")
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def perturbed_capsules(capsules: Any, label: int, deltas: Sequence[float] = DEFAULT_DELTAS) -> np.ndarray:
    """From one example's class capsules [n_classes, d]: the batch [d * len(deltas), n_classes, d] in which entry
    ``i * len(deltas) + j`` keeps only capsule ``label``, with ``deltas[j]`` added to its dimension ``i``."""
    capsules = np.asarray(capsules, dtype=np.float32)
    if capsules.ndim != 2:
        raise ValueError(f"capsules must be [n_classes, d], got shape {capsules.shape}")
    n_classes, d = capsules.shape
    if not 0 <= label < n_classes:
        raise ValueError(f"label {label} is outside [0, {n_classes})")
    deltas = np.asarray(deltas, dtype=np.float32).reshape(-1)
    shifts = np.eye(d, dtype=np.float32)[:, None, :] * deltas[None, :, None]  # [d, n_deltas, d]
    batch = np.zeros((d, len(deltas), n_classes, d), np.float32)
    batch[:, :, label, :] = capsules[label] + shifts
    return batch.reshape(d * len(deltas), n_classes, d)


def plot_pose_grid(
    decode: Callable[[np.ndarray], Any],
    capsules: Any,
    label: int,
    path: str | Path,
    deltas: Sequence[float] = DEFAULT_DELTAS,
) -> Path:
    """Fig. 4 of the paper: row ``i`` shows the decoding of capsule ``label`` (all other capsules zeroed) as its
    dimension ``i`` is shifted by each of ``deltas`` (columns). ``capsules`` [n_classes, d] are one example's class
    capsules; ``decode(masked [N, n_classes, d]) -> images [N, H, W, C]`` is called once on the whole batch
    (:func:`perturbed_capsules`)."""
    deltas = np.asarray(deltas, dtype=np.float32).reshape(-1)
    batch = perturbed_capsules(capsules, label, deltas)
    d, m = batch.shape[-1], len(deltas)
    images = _as_display(decode(batch))
    if len(images) != len(batch):
        raise ValueError(f"decode returned {len(images)} images for {len(batch)} capsule sets")
    h, w = images.shape[1:3]
    # Tile into one mosaic [d * H, m * W (, 3)]: row = dimension, column = delta.
    grid = images.reshape(d, m, *images.shape[1:]).swapaxes(1, 2).reshape(d * h, m * w, *images.shape[3:])
    fig = _figure(0.5 * m + 1.2, 0.5 * d + 1.0)
    ax = fig.add_subplot()
    ax.imshow(grid, cmap="gray" if grid.ndim == 2 else None, vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.vlines(np.arange(1, m) * w - 0.5, -0.5, d * h - 0.5, colors="white", linewidth=0.5)
    ax.hlines(np.arange(1, d) * h - 0.5, -0.5, m * w - 0.5, colors="white", linewidth=0.5)
    ax.set_xticks((np.arange(m) + 0.5) * w - 0.5, [f"{x:+.2f}" for x in deltas], fontsize=6, rotation=90)
    ax.set_yticks((np.arange(d) + 0.5) * h - 0.5, [str(i) for i in range(d)], fontsize=6)
    ax.set_xlabel("perturbation")
    ax.set_ylabel("capsule dimension")
    ax.set_title(f"class {label} capsule", fontsize=9)
    return _save(fig, path)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file (one JSON object per line), in file order. Blank lines and a truncated
    last line (left by a killed run) are skipped; any other unreadable line raises ``ValueError`` with its location."""
    path = Path(path)
    lines = path.read_text().splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines):
                break
            raise ValueError(f"{path}:{number}: not a JSON line ({err.msg}): {line[:80]!r}") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        records.append(record)
    return records


def _series(records: list[dict[str, Any]], split: str, key: str) -> tuple[np.ndarray, np.ndarray]:
    """Steps and values of ``key`` for ``split``, sorted by step; a step logged twice (a resumed run) keeps the last."""
    by_step = {}
    for r in records:
        if r.get("split") == split and isinstance(r.get(key), (int, float)) and isinstance(r.get("step"), (int, float)):
            by_step[r["step"]] = float(r[key])
    steps = np.array(sorted(by_step), dtype=np.float64)
    return steps, np.array([by_step[s] for s in sorted(by_step)], dtype=np.float64)


def plot_training_curves(metrics_path: str | Path, path: str | Path) -> Path:
    """Three panels against the training step, from a ``metrics.jsonl`` (:func:`read_metrics`): loss, accuracy in
    percent (error rate on the right axis), and learning rate; train as a curve, validation as joined markers, test
    as stars. Missing keys or splits are left out; a step logged twice (a resumed run) shows its last value. Raises ``ValueError`` if the file holds no records."""
    records = read_metrics(metrics_path)
    if not records:
        raise ValueError(f"{metrics_path}: no metrics records to plot (empty file)")
    for r in records:  # accuracy from an error rate when only the latter was logged
        if "accuracy" not in r and isinstance(r.get("error_rate"), (int, float)):
            r["accuracy"] = 1.0 - r["error_rate"]
    logged = {r["split"] for r in records if isinstance(r.get("split"), str)}
    splits = ["train", "validation"] + sorted(logged - {"train", "validation", "test"}) + ["test"]
    fig = _figure(13.0, 3.6)
    ax_loss, ax_acc, ax_lr = fig.subplots(1, 3)
    panels = [(ax_loss, "loss", 1.0, "loss"), (ax_acc, "accuracy", 100.0, "accuracy (%)"),
              (ax_lr, "learning_rate", 1.0, "learning rate")]  # fmt: skip
    for ax, key, scale, title in panels:
        for split in splits:
            steps, values = _series(records, split, key)
            if len(steps):
                ax.plot(steps, scale * values, label=split, **_STYLES.get(split, _STYLES["validation"]))
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, f"no '{key}' logged", ha="center", va="center", transform=ax.transAxes, color="gray")
    if ax_loss.lines and all(min(line.get_ydata()) > 0 for line in ax_loss.lines):
        ax_loss.set_yscale("log")
    if ax_acc.lines:
        ax_acc.secondary_yaxis("right", functions=(lambda a: 100.0 - a, lambda e: 100.0 - e)).set_ylabel("error (%)")
    return _save(fig, path)


def plot_robustness(lines: dict[str, Sequence[tuple[int, float, float]]], path: str | Path) -> Path:
    """One line per entry of ``lines``: its ``(epoch, own test accuracy, other set's accuracy)`` points in percent,
    the own accuracy across and the other set's up, each point labelled with its epoch."""
    fig = _figure(6.4, 4.6)
    ax = fig.subplots()
    for label, points in lines.items():
        epochs, own, other = zip(*points)
        x, y = 100.0 * np.asarray(own), 100.0 * np.asarray(other)
        (line,) = ax.plot(x, y, marker="o", label=label)
        for epoch, xi, yi in zip(epochs, x, y):
            ax.annotate(str(epoch), (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7,
                        color=line.get_color())  # fmt: skip
    ax.set_xlabel("own test accuracy (%)")
    ax.set_ylabel("accuracy on the other test set (%)")
    ax.set_title("robustness by epoch (numbers: epochs)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_confusion_matrix(confusion: Any, path: str | Path, class_names: Sequence[str] | None = None) -> Path:
    """The confusion matrix [K, K] of counts (rows: true class, columns: predicted class) as a heat map, each cell
    annotated with its count and each row's recall in the row label."""
    confusion = np.asarray(confusion)
    if confusion.ndim != 2 or confusion.shape[0] != confusion.shape[1]:
        raise ValueError(f"confusion must be [K, K], got shape {confusion.shape}")
    k = confusion.shape[0]
    names = [str(n) for n in class_names] if class_names is not None else [str(i) for i in range(k)]
    if len(names) != k:
        raise ValueError(f"{len(names)} class names for a {k}x{k} confusion matrix")
    recall = np.diag(confusion) / np.maximum(confusion.sum(1), 1)
    size = max(4.0, 0.5 * k + 2.0)
    fig = _figure(size + 1.0, size)
    ax = fig.add_subplot()
    image = ax.imshow(confusion, cmap="Blues", interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    threshold = confusion.max() / 2 if confusion.size else 0
    fontsize = max(4, min(9, 120 // max(k, 1)))
    for i in range(k):
        for j in range(k):
            color = "white" if confusion[i, j] > threshold else "black"
            ax.text(j, i, str(int(confusion[i, j])), ha="center", va="center", fontsize=fontsize, color=color)
    ax.set_xticks(np.arange(k), names, fontsize=fontsize, rotation=90 if max(map(len, names), default=0) > 2 else 0)
    ax.set_yticks(np.arange(k), [f"{n} ({100 * r:.1f}%)" for n, r in zip(names, recall)], fontsize=fontsize)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true (recall)")
    ax.set_title(f"accuracy {100 * np.trace(confusion) / max(confusion.sum(), 1):.2f}%")
    return _save(fig, path)


def overlay_pair(first: Any, second: Any) -> np.ndarray:
    """Two gray images [N, H, W(, 1)] (uint8 or float in [0, 1]) -> RGB [N, H, W, 3]: ``first`` in red, ``second``
    in green (yellow where they overlap), as the paper's Fig. 5 draws the two reconstructions."""
    red, green = _as_display(first), _as_display(second)
    if red.shape != green.shape or red.ndim != 3:
        raise ValueError(f"overlay_pair takes two gray batches of one shape, got {red.shape} and {green.shape}")
    return np.stack([red, green, np.zeros_like(red)], axis=-1)


def plot_multidigit(groups: Sequence[dict[str, Any]], path: str | Path, max_images: int = 8) -> Path:
    """MultiMNIST reconstructions like the paper's Fig. 5: per group, a row of inputs titled ``L:(a,b)`` with the true
    classes and below it the two reconstructions overlaid (:func:`overlay_pair`: the first class in red, the second
    in green), titled ``R:(c,d)`` with the classes reconstructed (in red when an ``R`` pair is not the true set).

    Args:
      groups: dicts with ``title`` (e.g. "correct", "wrong", "probe"), ``images`` [n, H, W, C], ``reconstructions``
        [n, 2, H, W, C], ``labels`` int [n, 2] (true classes) and ``shown`` int [n, 2] (the classes reconstructed);
        optional ``prefix`` of the bottom titles (default "R"; e.g. "P" for reconstructions from the prediction,
        "R*" for a probe of an absent class) and ``show_input`` (default True; False: only the overlay row, under
        the previous group's inputs). Empty groups are skipped.
      path: the PNG file to write.
      max_images: columns drawn per group at most.
    """
    groups = [g for g in groups if len(g["images"])]
    if not groups:
        raise ValueError("plot_multidigit needs at least one non-empty group")
    n = min(max_images, max(len(g["images"]) for g in groups))
    rows = [("input", g) for g in groups if g.get("show_input", True)] + [("overlay", g) for g in groups]
    rows.sort(key=lambda r: (next(i for i, g in enumerate(groups) if g is r[1]), r[0] == "overlay"))
    fig = _figure(1.15 * n + 0.6, 1.25 * len(rows))
    axes = fig.subplots(len(rows), n, squeeze=False)
    for ax_row, (kind, group) in zip(axes, rows):
        images = _as_display(group["images"])
        recon = np.asarray(group["reconstructions"])
        overlays = overlay_pair(recon[:, 0], recon[:, 1]) if kind == "overlay" else None
        prefix = group.get("prefix", "R")
        for i, ax in enumerate(ax_row):
            if i >= len(images):
                ax.axis("off")
                continue
            labels, shown = [int(c) for c in group["labels"][i]], [int(c) for c in group["shown"][i]]
            if kind == "input":
                _show(ax, images[i])
                ax.set_title("L:({},{})".format(*labels), fontsize=8)
                continue
            _show(ax, overlays[i])
            wrong = prefix == "R" and sorted(shown) != sorted(labels)
            ax.set_title("{}:({},{})".format(prefix, *shown), fontsize=8, color="red" if wrong else "black")
        if kind == "input" or not group.get("show_input", True):
            ax_row[0].set_ylabel(group["title"] + ("" if kind == "input" else f" ({prefix})"), fontsize=9)
    fig.suptitle("inputs (L: true classes); below, the two reconstructions: the first class in red, the second in "
                 "green. R: from the labels, P: from the prediction, R*: a true class and one that is absent",
                 fontsize=7)  # fmt: skip
    return _save(fig, path)
