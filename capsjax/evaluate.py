"""Evaluation and inference from a work directory: metrics, confusion matrix, figures, one-call prediction."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from capsjax.checkpoint import CheckpointError, Checkpoints
from capsjax.config import ConfigError, TrainConfig, load_config
from capsjax.data.pipeline import padded_batches
from capsjax.model import CapsNetOutput
from capsjax.steps import MAX_IN_FLIGHT, Steps, default_mesh, init_state, make_steps, wait_for_queue


def global_batch(sharding, local: np.ndarray) -> jax.Array:
    """This process's slice of a global batch -> one global array sharded along ``data``."""
    return jax.make_array_from_process_local_data(sharding, local)


class StopRequested(Exception):
    """``should_stop()`` returned True during an evaluation."""


def _device_multiple(batch_size: int, steps: Steps) -> int:
    """``batch_size`` rounded down to a multiple of the device count (at least one example per device)."""
    return max(batch_size - batch_size % steps.mesh.size, steps.mesh.size)


def evaluate_arrays(
    steps: Steps,
    params: Any,
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    should_stop: Callable[[], bool] | None = None,
) -> dict[str, Any]:
    """Mean loss terms, accuracy, error rate, per-class accuracy and the confusion matrix (rows: true class) over all
    ``images`` [N, H, W, C] (uint8 or float in [0, 1]) and ``labels`` [N], decoding the predicted class.

    ``should_stop()`` is polled between batches; raises :class:`StopRequested` when it returns True."""
    sharding = steps.data_sharding
    totals, dispatched = None, []
    for mask, x, y in padded_batches((images, labels.astype(np.int32)), _device_multiple(batch_size, steps)):
        if should_stop is not None and should_stop():
            raise StopRequested
        sums = steps.evaluate(params, global_batch(sharding, x), global_batch(sharding, y), global_batch(sharding, mask))
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
        dispatched = [*dispatched[-MAX_IN_FLIGHT:], totals]
        wait_for_queue(dispatched)
    totals = jax.device_get(totals)
    count = float(totals["count"])
    confusion = np.asarray(totals["confusion"], np.int64)
    result = {k: float(totals[k]) / count for k in ("loss", "margin_loss", "recon_loss") if k in totals}
    result["accuracy"] = float(totals["correct"]) / count
    result["error_rate"] = 1.0 - result["accuracy"]
    result["count"] = int(count)
    per_class = confusion.diagonal() / np.maximum(confusion.sum(1), 1)
    result["per_class_accuracy"] = [float(a) for a in per_class]
    result["confusion"] = confusion.tolist()
    return result


@dataclasses.dataclass
class Run:
    """A trained model loaded from a work directory by :func:`load_run`.

    ``config`` is the run's :class:`~capsjax.config.TrainConfig`; ``steps`` its compiled steps on the current devices;
    ``params`` the parameter pytree (replicated over the mesh); ``step`` the training step of the checkpoint;
    ``which`` "best" or "latest".
    """

    config: TrainConfig
    steps: Steps
    params: Any
    step: int
    which: str

    @property
    def model(self):
        """The NNX CapsNet with the loaded parameters."""
        return nnx.merge(self.steps.graphdef, self.params)


def load_run(workdir: str | Path, which: str = "best", log=print) -> Run:
    """Loads ``config.json`` and the ``which`` checkpoint of ``workdir`` onto all local devices: "best" (the validated
    checkpoint with the highest validation accuracy; before the first epoch ends, the latest, saying so through
    ``log``), "latest", or a step number. ``workdir`` may also be a weights file (``*.safetensors``,
    :mod:`capsjax.weights`): its parameters and config, ``which`` "weights".

    Raises :class:`~capsjax.config.ConfigError` (not a work directory),
    :class:`~capsjax.checkpoint.CheckpointError` (no checkpoint that reads back) or
    :class:`~capsjax.weights.WeightsError` (a weights file that does not read back or fit its model)."""
    from capsjax import weights

    if weights.is_weights_file(workdir):
        return _load_weights(workdir)
    if which not in ("best", "latest") and not str(which).isdigit():
        raise ConfigError(f"checkpoint must be 'best', 'latest' or a step number, got {which!r}")
    workdir = Path(workdir)
    config = load_config(workdir / "config.json")
    mesh = default_mesh()
    graphdef, state = init_state(config.model, config.optim, config.seed, mesh)
    steps = make_steps(graphdef, config.optim, config.loss, mesh=mesh)
    checkpoints = Checkpoints(workdir, config.keep_checkpoints)
    try:
        available = checkpoints.all_steps()
        if not available:
            raise CheckpointError(f"no complete checkpoint in {checkpoints.directory}: has the run saved one yet?")
        if which == "best":
            step = checkpoints.best_step()
            if step is None:
                step = available[-1]
                log(f"note: no epoch of {workdir} has been validated yet; evaluating the latest checkpoint (step {step})")
                which = "latest"
        elif which == "latest":
            step = available[-1]
        else:
            step = int(which)
            if step not in available:
                raise CheckpointError(f"no checkpoint of step {step} in {checkpoints.directory} (there are {available})")
        state = checkpoints.restore(state, step)
    finally:
        checkpoints.close()
    return Run(config, steps, state.params, int(jax.device_get(state.step)), which)


def _load_weights(path: str | Path) -> Run:
    from capsjax import weights

    config, arrays, metadata = weights.read_weights(path)
    mesh = default_mesh()
    graphdef, state = init_state(config.model, config.optim, config.seed, mesh)
    params = weights.params_from_arrays(state.params, arrays, str(path))
    params = jax.device_put(params, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    steps = make_steps(graphdef, config.optim, config.loss, mesh=mesh)
    return Run(config, steps, params, int(metadata.get("step", 0)), "weights")


def _unit_images(images: np.ndarray, expected: tuple[int, ...]) -> np.ndarray:
    """Checks images for :func:`predict`: [N, H, W(, C)] of uint8 in 0..255 or float in [0, 1]."""
    images = np.asarray(images)
    if images.ndim == 3 and len(expected) == 3 and expected[-1] == 1:
        images = images[..., None]
    if images.ndim != 4 or images.shape[1:] != expected:
        raise ValueError(f"images must be [N, {', '.join(map(str, expected))}], got {images.shape}")
    if images.dtype == np.uint8:
        return images
    if not np.issubdtype(images.dtype, np.floating):
        raise ValueError(f"images must be uint8 (0..255) or float (0..1), got {images.dtype}: convert them first")
    if images.size and (not np.isfinite(images).all() or images.min() < 0 or images.max() > 1):
        raise ValueError(
            f"float images must lie in [0, 1], got values in [{images.min():g}, {images.max():g}]: divide 0..255 "
            "images by 255 or pass them as uint8"
        )
    return images.astype(np.float32)


def predict_arrays(steps: Steps, params: Any, images: np.ndarray, batch_size: int = 100) -> CapsNetOutput:
    """:func:`predict` for compiled ``steps`` and ``params``: ``images`` [N, H, W, C], uint8 or float in [0, 1]."""
    outputs = []
    for mask, x in padded_batches((images,), _device_multiple(batch_size, steps)):
        out = jax.device_get(steps.predict(params, global_batch(steps.data_sharding, x)))
        valid = int(mask.sum())
        outputs.append(jax.tree.map(lambda a: a[:valid], out))
    return CapsNetOutput(*(None if parts[0] is None else np.concatenate(parts) for parts in zip(*outputs)))


def predict(run: Run | str | Path, images: np.ndarray, batch_size: int = 100) -> CapsNetOutput:
    """Class capsules, lengths (class probabilities) and reconstructions (of the predicted class) for ``images``
    [N, H, W, C] or [N, H, W] (uint8 in [0, 255] or float in [0, 1]), from a :class:`Run` or a work directory
    (its best checkpoint).

    Returns:
      A :class:`~capsjax.model.CapsNetOutput` of NumPy arrays: ``capsules`` [N, num_classes, class_dim],
      ``lengths`` [N, num_classes] (``lengths.argmax(-1)`` is the prediction) and ``reconstructions``
      [N, H, W, C] in [0, 1] (None for a model without decoder).
    """
    if not isinstance(run, Run):
        run = load_run(run)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    images = _unit_images(images, tuple(run.config.model.image_shape))
    if len(images) == 0:
        k, d = run.config.model.num_classes, run.config.model.class_dim
        recon = np.zeros((0, *run.config.model.image_shape), np.float32) if run.config.model.use_decoder else None
        return CapsNetOutput(np.zeros((0, k, d), np.float32), np.zeros((0, k), np.float32), recon)
    return predict_arrays(run.steps, run.params, images, batch_size)


def decode(run: Run, capsules: np.ndarray) -> np.ndarray:
    """Decoder images [N, H, W, C] for (already masked) class capsules [N, num_classes, class_dim]."""
    if run.config.model.use_decoder is False:
        raise ValueError("this model has no decoder")
    model = run.model
    return np.asarray(jax.jit(lambda c: model.decoder(c))(jnp.asarray(capsules, jnp.float32)))


def format_confusion(confusion: list[list[int]], class_names: list[str] | None = None) -> str:
    """The confusion matrix as a fixed-width text table (rows: true class, columns: predicted)."""
    k = len(confusion)
    names = class_names or [str(i) for i in range(k)]
    width = max(5, max(len(n) for n in names) + 1, len(str(max(max(r) for r in confusion))) + 1)
    lines = ["true\\pred".ljust(10) + "".join(n.rjust(width) for n in names) + "   acc%"]
    for i, row in enumerate(confusion):
        total = max(sum(row), 1)
        lines.append(names[i].ljust(10) + "".join(str(v).rjust(width) for v in row) + f"{100 * row[i] / total:7.2f}")
    return "\n".join(lines)


def evaluate_workdir(
    workdir: str | Path,
    *,
    split: str = "test",
    data_dir: str | None = None,
    which: str = "best",
    out_dir: str | Path | None = None,
    figures: bool = True,
    batch_size: int | None = None,
) -> dict[str, Any]:
    """Evaluates a trained run on ``split`` of its dataset and writes ``eval_<split>.json`` and the figures
    (reconstructions, pose-perturbation grid, training curves, confusion matrix) into ``out_dir`` (default:
    ``workdir``).

    Returns:
      The metrics of :func:`evaluate_arrays` (``accuracy``, ``error_rate``, ``loss``, ``margin_loss``,
      ``recon_loss``, ``count``, ``per_class_accuracy`` [K], ``confusion`` [K, K]) plus ``split``, ``checkpoint``,
      ``step``, ``dataset`` and, with ``figures``, the written ``figures`` paths.
    """
    from capsjax import data as datalib

    run = load_run(workdir, which)
    out_dir = Path(out_dir or (Path(workdir).parent if run.which == "weights" else workdir))
    out_dir.mkdir(parents=True, exist_ok=True)
    config = run.config
    images, labels = datalib.load(config.dataset, split, data_dir if data_dir is not None else config.data_dir)
    batch_size = batch_size or config.eval_batch_size
    metrics = evaluate_arrays(run.steps, run.params, images, labels, batch_size)
    metrics.update(split=split, checkpoint=run.which, step=run.step, dataset=config.dataset)
    (out_dir / f"eval_{split}.json").write_text(json.dumps(metrics, indent=2) + "\n")
    if figures and jax.process_index() == 0:
        metrics["figures"] = [str(p) for p in _figures(run, images, labels, metrics, Path(workdir), out_dir)]
    return metrics


def _figures(run: Run, images, labels, metrics, workdir: Path, out_dir: Path) -> list[Path]:
    from capsjax import viz

    paths = []
    sample = images[:10]
    out = predict(run, sample)
    predictions = out.lengths.argmax(-1)
    if out.reconstructions is not None:
        paths.append(
            viz.plot_reconstructions(sample, out.reconstructions, labels[:10], predictions, out_dir / "reconstructions.png")
        )
        first = out.capsules[0]
        paths.append(
            viz.plot_pose_grid(lambda c: decode(run, c), first, int(predictions[0]), out_dir / "pose_grid.png")
        )
    paths.append(viz.plot_confusion_matrix(np.asarray(metrics["confusion"]), out_dir / "confusion.png"))
    metrics_file = workdir / "metrics.jsonl"
    if metrics_file.exists() and metrics_file.stat().st_size:
        paths.append(viz.plot_training_curves(metrics_file, out_dir / "training_curves.png"))
    return paths
