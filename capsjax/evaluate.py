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
from capsjax.files import read_json, write_atomic
from capsjax.steps import MAX_IN_FLIGHT, Steps, default_mesh, init_state, make_steps, wait_for_queue
from capsjax.workdir import DATA


def global_batch(sharding, local: np.ndarray) -> jax.Array:
    """This process's slice of a global batch -> one global array sharded along ``data``."""
    return jax.make_array_from_process_local_data(sharding, local)


class StopRequested(Exception):
    """``should_stop()`` returned True during an evaluation."""


def _device_multiple(batch_size: int, steps: Steps, count: int | None = None) -> int:
    """``batch_size`` rounded down to a multiple of the device count (at least one example per device), and no larger
    than ``count`` examples rounded up to that multiple (a larger batch would be padding)."""
    devices = steps.mesh.size
    if count is not None:
        batch_size = min(batch_size, -(-count // devices) * devices)
    return max(batch_size - batch_size % devices, devices)


def evaluate_arrays(
    steps: Steps,
    params: Any,
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    should_stop: Callable[[], bool] | None = None,
    *,
    digits: np.ndarray | None = None,
) -> dict[str, Any]:
    """Mean loss terms (the model's), accuracy, error rate and, for int labels, per-class accuracy and the confusion
    matrix (rows: true class) over all ``images`` [N, H, W, C] (uint8 or float in [0, 1]) and ``labels`` (int [N], or
    k-hot [N, K], scored by :func:`capsjax.steps.correct_predictions`).

    For k-object images (MultiMNIST) ``labels`` are k-hot [N, K] and ``digits`` [N, k, H, W, C] the objects alone
    (ascending class order): ``accuracy`` is then the exact-set accuracy (both digits right), ``error_rate`` its
    complement (the paper's MultiMNIST error), ``almost_accuracy`` the share with at least one digit right, and the
    confusion matrix the per-digit one (:func:`capsjax.scoring.pair_confusion`).

    ``should_stop()`` is polled between batches; raises :class:`StopRequested` when it returns True."""
    if not len(images):
        raise ValueError("no examples to evaluate")
    sharding = steps.data_sharding
    totals, dispatched = None, []
    labels = labels.astype(np.int32) if labels.ndim == 1 else labels.astype(np.float32)
    arrays = (images, labels) if digits is None else (images, labels, digits)
    for mask, x, y, *d in padded_batches(arrays, _device_multiple(batch_size, steps, len(images))):
        if should_stop is not None and should_stop():
            raise StopRequested
        inputs = [global_batch(sharding, a) for a in (x, y, mask, *d)]
        sums = steps.evaluate(params, *inputs)
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
        dispatched = [*dispatched[-MAX_IN_FLIGHT:], totals]
        wait_for_queue(dispatched)
    totals = jax.device_get(totals)
    count = float(totals["count"])
    tables = ("correct", "count", "confusion")
    result = {k: float(v) / count for k, v in totals.items() if k not in tables}  # the model's loss terms
    result["accuracy"] = float(totals["correct"]) / count
    result["error_rate"] = 1.0 - result["accuracy"]
    if "almost" in totals:
        result["almost_accuracy"] = float(totals["almost"]) / count
    result["count"] = int(count)
    if "confusion" in totals:
        confusion = np.asarray(totals["confusion"], np.int64)
        per_class = confusion.diagonal() / np.maximum(confusion.sum(1), 1)
        result["per_class_accuracy"] = [float(a) for a in per_class]
        result["confusion"] = confusion.tolist()
    return result


@dataclasses.dataclass
class Run:
    """A trained model loaded from a work directory by :func:`load_run`.

    ``config`` is the run's :class:`~capsjax.config.TrainConfig`; ``steps`` its compiled steps on the current devices;
    ``params`` the parameter pytree (replicated over the mesh); ``step`` the training step of the checkpoint;
    ``which`` "best" or "latest"; ``scored_sha256`` the hashes of the validation and test sets the run was scored on
    in training (:meth:`capsjax.data.Datasets.scored_sha256`; empty for a run or weights file from before they were
    recorded).
    """

    config: TrainConfig
    steps: Steps
    params: Any
    step: int
    which: str
    scored_sha256: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def model(self):
        """The NNX model (``config.model.arch``) with the loaded parameters."""
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
        if which not in ("best", "weights"):
            raise ConfigError(f"a weights file holds one set of parameters; drop the checkpoint choice {which!r}")
        return _load_weights(workdir)
    if which not in ("best", "latest") and not str(which).isdigit():
        raise ConfigError(f"checkpoint must be 'best', 'latest' or a step number, got {which!r}")
    workdir = Path(workdir)
    config = load_config(workdir / "config.json")
    mesh = default_mesh()
    graphdef, state = init_state(config.model, config.optim, config.seed, mesh)
    steps = make_steps(graphdef, config.optim, config.loss, mesh=mesh, num_targets=config.model.num_targets)
    checkpoints = Checkpoints(workdir, config.keep_checkpoints, read_only=True)  # the run may still be training
    try:
        available = checkpoints.all_steps()
        if not available:
            exported = sorted(workdir.glob("*.safetensors"))
            hint = f"pass its weights file, {exported[0]}" if exported else "has the run saved one yet?"
            raise CheckpointError(f"no complete checkpoint in {checkpoints.directory}: {hint}")
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
        try:
            state = checkpoints.restore(state, step)
        except CheckpointError as err:
            others = [s for s in available if s != step]
            if not others:
                raise
            raise CheckpointError(f"{err}; evaluate another with --checkpoint STEP (steps {others})") from None
    finally:
        checkpoints.close()
    data = workdir / DATA
    scored = read_json(data, "restore it or delete it").get("scored_sha256", {}) if data.exists() else {}
    return Run(config, steps, state.params, int(jax.device_get(state.step)), which, scored)


def _load_weights(path: str | Path) -> Run:
    from capsjax import weights

    config, arrays, metadata = weights.read_weights(path)
    mesh = default_mesh()
    graphdef, state = init_state(config.model, config.optim, config.seed, mesh)
    params = weights.params_from_arrays(state.params, arrays, str(path))
    params = jax.device_put(params, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    steps = make_steps(graphdef, config.optim, config.loss, mesh=mesh, num_targets=config.model.num_targets)
    try:
        scored = json.loads(metadata.get("scored_sha256", "{}"))
    except ValueError:
        raise weights.WeightsError(f"{path}: its scored_sha256 metadata is not JSON; export it again") from None
    return Run(config, steps, params, int(metadata.get("step", 0)), "weights", scored)


def _unit_images(images: np.ndarray, expected: tuple[int, ...]) -> np.ndarray:
    """Checks images for :func:`predict`: [N, H, W(, C)] of uint8 in 0..255 or float in [0, 1]."""
    images = np.asarray(images)
    if images.ndim == 3 and len(expected) == 3 and expected[-1] == 1:
        images = images[..., None]
    if images.ndim != 4 or images.shape[1:] != expected:
        raise ValueError(f"images must be [N, {', '.join(map(str, expected))}], got {images.shape}")
    if images.dtype == np.uint8:
        return images
    if not jnp.issubdtype(images.dtype, jnp.floating):  # bfloat16 included
        raise ValueError(f"images must be uint8 (0..255) or float (0..1), got {images.dtype}: convert them first")
    if images.size and not np.isfinite(images).all():  # (dividing by 255 would not mend those)
        bad = int(np.sum(~np.isfinite(images.reshape(len(images), -1)).all(axis=1)))
        raise ValueError(
            f"images hold NaN or infinite values ({bad} of {len(images)} images): check how they were made"
        )
    if images.size and (images.min() < 0 or images.max() > 1):
        raise ValueError(
            f"float images must lie in [0, 1], got values in [{images.min():g}, {images.max():g}]: divide 0..255 "
            "images by 255 or pass them as uint8"
        )
    return images.astype(np.float32)


def _gather(steps: Steps, out: Any, *local: np.ndarray) -> tuple[Any, ...]:
    """The whole global batch on the host: the outputs ``out`` (sharded over every process's devices) and the global
    arrays whose process slices are ``local``, laid out as ``out`` is. One process: ``out`` as is."""
    if jax.process_count() == 1:
        return (jax.device_get(out), *local)
    from jax.experimental import multihost_utils

    arrays = (out, *(global_batch(steps.data_sharding, a) for a in local))
    return tuple(multihost_utils.process_allgather(arrays, tiled=True))


def predict_arrays(steps: Steps, params: Any, images: np.ndarray, batch_size: int = 100):
    """:func:`predict` for compiled ``steps`` and ``params``: ``images`` [N, H, W, C] (N >= 1), uint8 or float in
    [0, 1]. Returns the model's output tuple of NumPy arrays."""
    outputs = []
    index = np.arange(len(images))
    for mask, where, x in padded_batches((index, images), _device_multiple(batch_size, steps)):  # one program for any N
        out = steps.predict(params, global_batch(steps.data_sharding, x))
        out, mask, where = _gather(steps, out, mask, where)
        keep = mask.astype(bool)
        order = np.argsort(where[keep], kind="stable")  # the images' order (the mesh may place processes' rows apart)
        outputs.append(jax.tree.map(lambda a: a[keep][order], out))
    return type(outputs[0])(*(None if parts[0] is None else np.concatenate(parts) for parts in zip(*outputs)))


def predict(run: Run | str | Path, images: np.ndarray, batch_size: int = 100):
    """The model's outputs for ``images`` [N, H, W, C] or [N, H, W] (uint8 in [0, 255] or float in [0, 1]), from a
    :class:`Run` or a work directory (its best checkpoint); :func:`class_scores` gives the predictions.

    Returns:
      The model's output tuple of NumPy arrays. For the CapsNet a :class:`~capsjax.model.CapsNetOutput`:
      ``capsules`` [N, num_classes, class_dim], ``lengths`` [N, num_classes] (the class probabilities;
      ``lengths.argmax(-1)`` is the prediction) and ``reconstructions`` [N, H, W, C] in [0, 1] (of the predicted
      class; None without decoder). For the baseline CNN a :class:`~capsjax.baseline.CNNOutput`: ``logits``.
    """
    if not isinstance(run, Run):
        run = load_run(run)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    images = _unit_images(images, tuple(run.config.model.image_shape))
    if len(images) == 0:
        batch = jax.ShapeDtypeStruct((run.steps.mesh.size, *images.shape[1:]), images.dtype)
        shapes = jax.eval_shape(run.steps.predict, run.params, batch)
        return jax.tree.map(lambda s: np.zeros((0, *s.shape[1:]), s.dtype), shapes)
    return predict_arrays(run.steps, run.params, images, batch_size)


def class_scores(run: Run, output) -> np.ndarray:
    """The class scores [N, num_classes] of :func:`predict`'s ``output`` (the model's ``class_scores``: capsule
    lengths, logits); their argmax is the prediction."""
    return np.asarray(run.model.class_scores(output))


def decode(run: Run, capsules: np.ndarray) -> np.ndarray:
    """Decoder images [N, H, W, C] for (already masked) class capsules [N, num_classes, class_dim]."""
    if getattr(run.model, "decoder", None) is None:
        raise ValueError("this model has no decoder")
    model = run.model
    return np.asarray(jax.jit(lambda c: model.decoder(c))(jnp.asarray(capsules, jnp.float32)))


def format_confusion(confusion: list[list[int]], class_names: list[str] | None = None) -> str:
    """The confusion matrix as a fixed-width text table (rows: true class, columns: predicted)."""
    k = len(confusion)
    names = class_names or [str(i) for i in range(k)]
    width = max(5, max(len(n) for n in names) + 1, len(str(max(max(r) for r in confusion))) + 1)
    label = max(10, max(len(n) for n in names) + 1)
    lines = ["true\\pred".ljust(label) + "".join(n.rjust(width) for n in names) + "   acc%"]
    for i, row in enumerate(confusion):
        total = max(sum(row), 1)
        lines.append(names[i].ljust(label) + "".join(str(v).rjust(width) for v in row) + f"{100 * row[i] / total:7.2f}")
    return "\n".join(lines)


def class_names_for(metrics: dict[str, Any]) -> list[str] | None:
    """The class names of the dataset an evaluation scored (``metrics["dataset"]``, e.g. Fashion-MNIST's words) when
    they match its confusion matrix, else None (the labels themselves)."""
    from capsjax.data import class_names

    names = class_names(metrics.get("dataset", ""))
    return names if len(names) == len(metrics.get("confusion", ())) else None


def evaluate_workdir(
    workdir: str | Path,
    *,
    split: str = "test",
    data_dir: str | None = None,
    which: str = "best",
    out_dir: str | Path | None = None,
    figures: bool = True,
    batch_size: int | None = None,
    dataset: str | None = None,
) -> dict[str, Any]:
    """Evaluates a trained run on ``split`` of its dataset (placed on its canvas as in training, for expanded MNIST)
    and writes ``eval_<split>.json`` and the figures (reconstructions, pose-perturbation grid, training curves,
    confusion matrix) into ``out_dir`` (default: ``workdir``; for a weights file ``FILE.safetensors``, the folder
    ``FILE_eval`` beside it).

    With another ``dataset`` (e.g. ``"affine_mnist"`` or ``"affnist"`` for a run trained on expanded MNIST) it
    writes ``eval_<dataset>_<split>.json``, ``<dataset>_examples.png`` (transformed digits with predictions and, for
    the CapsNet, reconstructions; the wrong ones first) and ``confusion_<dataset>.png``.

    Returns:
      The metrics of :func:`evaluate_arrays` (``accuracy``, ``error_rate``, the model's loss terms, ``count``,
      ``per_class_accuracy`` [K], ``confusion`` [K, K]) plus ``split``, ``checkpoint``, ``step``, ``dataset``,
      ``data_sha256`` (of the scored images and labels: :func:`capsjax.data.arrays_sha256`), ``note`` for a dataset
      that needs one (``affine_mnist``: an approximation of affNIST) and, with ``figures``,
      the written ``figures`` paths (in a multi-process program: process 0 draws them, the others get none).
    """
    from capsjax import data as datalib
    from capsjax.data.canvas import DATASET_NOTES

    if dataset is not None and not dataset.strip():
        raise ConfigError("--dataset needs a dataset's name (e.g. affine_mnist); leave it out to score the run's own")
    run = load_run(workdir, which)
    if out_dir is None:  # a weights file: its own folder beside it, never over the files its run recorded
        out_dir = Path(workdir).with_name(Path(workdir).stem + "_eval") if run.which == "weights" else workdir
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = run.config
    # the run's own set: eval_<split>.json and its figures, checked against the hashes training recorded; --dataset
    # (even the run's own dataset's name, e.g. for a variant of its test set) writes eval_<name>_<split>.json
    own = dataset is None
    name = config.dataset if own else dataset
    loaded_as = None if own or dataset == config.dataset else name  # the run's dataset: on its canvas, as trained
    images, labels, *digits = datalib.load_eval_split(config, split, data_dir, loaded_as)
    scored = datalib.arrays_sha256(images, labels, *digits)  # equal: two runs scored the same examples
    recorded = run.scored_sha256.get(split) if own else None
    if recorded is not None and recorded != scored:  # before the evaluation: refused in seconds, not minutes
        _refuse_other_data(config, name, split, data_dir)
    batch_size = batch_size or config.eval_batch_size
    metrics = evaluate_arrays(run.steps, run.params, images, labels, batch_size, digits=digits[0] if digits else None)
    metrics.update(split=split, checkpoint=run.which, step=run.step, dataset=name, data_sha256=scored)
    if name in DATASET_NOTES:
        metrics["note"] = DATASET_NOTES[name]
    stem = f"eval_{split}" if own else f"eval_{name.replace('/', '_')}_{split}"
    write_atomic(out_dir / f"{stem}.json", json.dumps(metrics, indent=2) + "\n")
    if figures:  # every process predicts what the figures show (one computation over all devices); process 0 draws
        draw = jax.process_index() == 0
        if own:
            paths = _figures(run, images, labels, metrics, Path(workdir), out_dir, draw)
        else:
            paths = _transfer_figures(run, images, labels, metrics, name.replace("/", "_"), out_dir, draw)
        metrics["figures"] = [str(p) for p in paths]
    return metrics


def _refuse_other_data(config: TrainConfig, name: str, split: str, data_dir: str | None) -> None:
    """Raises the DataError for a run's own ``split`` whose examples are not those it was scored on in training."""
    from capsjax.data import DataError

    trained = config.data_dir or "the default data folder"
    if data_dir is None or data_dir == config.data_dir:
        raise DataError(
            f"the {name} {split} examples in {trained} changed since the run was trained (other files, or a source "
            "that orders them differently): restore them, or score them as another set with --dataset " + name
        )
    raise DataError(
        f"the {name} {split} examples from {data_dir} are not those the run was scored on in training: pass the "
        f"--data-dir it trained with ({trained}), or score them as another set with --dataset NAME"
    )


def _transfer_figures(
    run: Run, images, labels, metrics, name: str, out_dir: Path, draw: bool = True, count: int = 12
) -> list[Path]:
    """Examples of another dataset (the wrong predictions among the first 500 first, then right ones) and its
    confusion matrix: predicted on every process, drawn where ``draw`` (else none, and no paths)."""
    from capsjax import viz

    head = images[:500]
    out = predict(run, head)
    if not draw:
        return []
    predictions = class_scores(run, out).argmax(-1)
    wrong = np.flatnonzero(predictions != labels[:500])
    right = np.flatnonzero(predictions == labels[:500])
    chosen = np.concatenate([wrong[: count // 2], right])[:count]
    recon = getattr(out, "reconstructions", None)
    note = " (an approximation of affNIST)" if name == "affine_mnist" else ""
    title = f"{name}{note} {metrics['split']}: accuracy {100 * metrics['accuracy']:.2f}%"
    paths = [viz.plot_reconstructions(head[chosen], None if recon is None else recon[chosen], labels[:500][chosen],
                                      predictions[chosen], out_dir / f"{name}_examples.png", max_images=count,
                                      title=title)]  # fmt: skip
    if "confusion" in metrics:
        confusion = np.asarray(metrics["confusion"])
        paths.append(viz.plot_confusion_matrix(confusion, out_dir / f"confusion_{name}.png", class_names_for(metrics)))
    return paths


def _figures(run: Run, images, labels, metrics, workdir: Path, out_dir: Path, draw: bool = True) -> list[Path]:
    """The run's figures: what they show is predicted and decoded on every process (in a multi-process run, one
    computation over all devices), then drawn where ``draw`` (else none, and no paths)."""
    from capsjax import viz

    sample = images[:10]
    out = predict(run, sample)
    predictions = class_scores(run, out).argmax(-1)
    recon = getattr(out, "reconstructions", None)
    groups = multidigit_groups(run, images, labels) if recon is not None and recon.ndim == 5 else None  # k objects
    if recon is not None:
        first, label = out.capsules[0], int(predictions[0])
        posed = decode(run, viz.perturbed_capsules(first, label))
    if not draw:
        return []
    paths = []
    if groups is not None:
        paths.append(viz.plot_multidigit(groups, out_dir / "multimnist.png"))
    elif recon is not None:
        paths.append(
            viz.plot_reconstructions(sample, out.reconstructions, labels[:10], predictions, out_dir / "reconstructions.png")
        )
    if recon is not None:
        paths.append(viz.plot_pose_grid(lambda _: posed, first, label, out_dir / "pose_grid.png"))
    if "confusion" in metrics:
        confusion = np.asarray(metrics["confusion"])
        paths.append(viz.plot_confusion_matrix(confusion, out_dir / "confusion.png", class_names_for(metrics)))
    metrics_file = workdir / "metrics.jsonl"
    if metrics_file.exists() and metrics_file.stat().st_size:
        paths.append(viz.plot_training_curves(metrics_file, out_dir / "training_curves.png"))
    return paths


def _top_classes(scores: np.ndarray, k: int) -> np.ndarray:
    """The k highest-scoring classes in ascending class order, ties to the lower index (as the eval step)."""
    return np.sort(np.argsort(-scores, axis=-1, kind="stable")[:, :k], axis=-1)


def _decode_pairs(run: Run, capsules: np.ndarray, classes: np.ndarray, image_shape) -> np.ndarray:
    """Reconstructions [n, 2, H, W, C] of ``classes`` [n, 2] from each example's capsules [n, K, D], one class at a
    time."""
    n, k, d = capsules.shape
    if n == 0:
        return np.zeros((0, 2, *image_shape), np.float32)
    masked = capsules[:, None] * (np.arange(k) == classes[..., None])[..., None]  # [n, 2, K, D]
    return decode(run, masked.reshape(2 * n, k, d)).reshape(n, 2, *image_shape)


def multidigit_groups(run: Run, images: np.ndarray, labels: np.ndarray, count: int = 8, pool: int = 400) -> list:
    """The groups of :func:`capsjax.viz.plot_multidigit` (the paper's Fig. 5) from the first ``pool`` two-digit
    ``images`` and their two-hot ``labels``: ``count`` correctly classified ones (R: reconstructed from the two
    longest capsules, which are the labels); ``count`` wrong ones, reconstructed from the labels (R) and, below, from
    the prediction (P); and the probe (R*): correct ones reconstructed from their lower true class and from the most
    active class that is in the image neither as label nor as prediction."""
    images, labels = images[:pool], np.asarray(labels[:pool])
    out = predict(run, images)
    predicted, true = _top_classes(out.lengths, 2), _top_classes(labels, 2)
    correct = (predicted == true).all(axis=1)
    right, wrong = np.flatnonzero(correct)[:count], np.flatnonzero(~correct)[:count]
    shape = images.shape[1:]
    absent = np.where(labels[right] > 0.5, -np.inf, out.lengths[right])
    probe = np.stack([true[right, 0], absent.argmax(axis=1)], axis=1)  # [n, 2]: a true class, an absent one
    group = lambda title, i, recon, shown, **kw: {  # noqa: E731
        "title": title, "images": images[i], "reconstructions": recon, "labels": true[i], "shown": shown, **kw
    }  # fmt: skip
    return [
        group("correct", right, out.reconstructions[right], predicted[right]),
        group("wrong", wrong, _decode_pairs(run, out.capsules[wrong], true[wrong], shape), true[wrong]),
        group("wrong", wrong, out.reconstructions[wrong], predicted[wrong], prefix="P", show_input=False),
        group("probe", right, _decode_pairs(run, out.capsules[right], probe, shape), probe, prefix="R*"),
    ]
