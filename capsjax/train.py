"""The training loop: ``train_and_evaluate(config, workdir)``.

Data parallel over every device (one ``data`` mesh axis), resumable from the work directory's latest checkpoint with
the same data order and the same random keys as an uninterrupted run, metrics appended to ``metrics.jsonl``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import jax
import numpy as np

from capsjax import data as datalib
from capsjax.checkpoint import CheckpointError, Checkpoints, has_checkpoint
from capsjax.config import ConfigError, TrainConfig, load_config, save_config
from capsjax.evaluate import evaluate_arrays
from capsjax.fast.hostmem import trim_after_compiles
from capsjax.steps import Steps, default_mesh, init_state, make_steps, wait_for_queue


class TrainingDiverged(RuntimeError):
    """The loss or the gradients became NaN or infinite."""


@dataclasses.dataclass
class Datasets:
    """Host-side uint8 images [N, H, W, C] and int32 labels [N] of each split."""

    train: tuple[np.ndarray, np.ndarray]
    validation: tuple[np.ndarray, np.ndarray]
    test: tuple[np.ndarray, np.ndarray]
    validation_name: str  # "validation" (held out of train) or "test"


def load_datasets(config: TrainConfig) -> Datasets:
    """Loads train and test; holds the last ``validation_examples`` training examples out; applies ``train_examples``."""
    images, labels = datalib.load(config.dataset, "train", config.data_dir)
    test = datalib.load(config.dataset, "test", config.data_dir)
    held_out = config.validation_examples
    if held_out >= len(images):
        raise ConfigError(f"validation_examples={held_out} leaves no training data ({len(images)} examples)")
    if held_out:
        validation = (images[-held_out:], labels[-held_out:])
        images, labels = images[:-held_out], labels[:-held_out]
    else:
        validation = test
    if config.train_examples is not None:
        images, labels = images[: config.train_examples], labels[: config.train_examples]
    return Datasets((images, labels), validation, test, "validation" if held_out else "test")


def adapt_model_to_data(config: TrainConfig, datasets: Datasets) -> TrainConfig:
    """Takes the image shape and the class count from the data when the config's differ (e.g. CIFAR-10)."""
    images, labels = datasets.train
    shape = tuple(int(s) for s in images.shape[1:])
    num_classes = max(config.model.num_classes, int(max(labels.max(), datasets.test[1].max())) + 1)
    if shape == tuple(config.model.image_shape) and num_classes == config.model.num_classes:
        return config
    try:
        model = dataclasses.replace(config.model, image_shape=shape, num_classes=num_classes)
    except ValueError as err:
        raise ConfigError(f"the model does not fit {config.dataset} images of shape {shape}: {err}") from None
    return dataclasses.replace(config, model=model)


def _check_resumable(config: TrainConfig, workdir: Path) -> None:
    """A work directory with checkpoints must belong to a run of the same model."""
    path = workdir / "config.json"
    if not path.exists() or not has_checkpoint(workdir):
        return
    previous = load_config(path)
    if previous.model != config.model or previous.seed != config.seed or previous.dataset != config.dataset:
        raise ConfigError(
            f"{workdir} holds checkpoints of a run with another model, seed or dataset; "
            "use a new --workdir, or the same settings to resume"
        )


class _Progress:
    """tqdm on a terminal or in a Jupyter kernel (process 0 only); plain lines otherwise (logs, pipes)."""

    def __init__(self, enabled: bool, total: int, initial: int):
        self.bar = None
        interactive = sys.stderr.isatty() or "ipykernel" in sys.modules
        if enabled and interactive and jax.process_index() == 0:
            try:  # a widget in notebooks that have ipywidgets, text otherwise
                import ipywidgets  # noqa: F401
                from tqdm.auto import tqdm
            except ImportError:
                from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, smoothing=0.1)

    def update(self, n: int = 1, **postfix) -> None:
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)

    def write(self, message: str) -> None:
        if jax.process_index() != 0:
            return
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _MetricsLog:
    """Appends one JSON object per line to ``metrics.jsonl`` (process 0 only)."""

    def __init__(self, path: Path):
        self.path = path

    def write(self, record: dict[str, Any]) -> None:
        if jax.process_index() == 0:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def _epoch_batches(
    config: TrainConfig, images: np.ndarray, labels: np.ndarray, epoch: int, skip: int, steps: Steps
) -> Iterator[tuple[jax.Array, jax.Array]]:
    """This epoch's global batches from the first not yet trained one, prefetched onto the devices."""
    local = datalib.batches(images, labels, config.batch_size, seed=config.seed, epoch=epoch)
    for _ in range(skip):
        next(local)
    sharding = steps.data_sharding
    return datalib.prefetch_to_device(local, size=2, sharding=sharding)


def train_and_evaluate(config: TrainConfig, workdir: str | Path) -> dict[str, Any]:
    """Trains ``config`` in ``workdir`` (resuming from its latest checkpoint), validates every epoch, keeps the best
    checkpoint, and evaluates the final model on the test set.

    Writes ``config.json``, ``metrics.jsonl``, ``checkpoints/``, ``best/`` and ``results.json`` into ``workdir`` and
    returns the results dict (test accuracy and loss, best validation accuracy, steps, time).
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    trim_after_compiles()  # the compiler's freed heap back to the system before the steps' scratch memory is taken
    datasets = load_datasets(config)
    config = adapt_model_to_data(config, datasets)
    _check_resumable(config, workdir)
    mesh = default_mesh()
    if config.batch_size % mesh.size or config.eval_batch_size % mesh.size:
        raise ConfigError(
            f"batch_size ({config.batch_size}) and eval_batch_size ({config.eval_batch_size}) must be divisible by "
            f"the number of devices ({mesh.size})"
        )
    train_images, train_labels = datasets.train
    steps_per_epoch = len(train_images) // config.batch_size
    if steps_per_epoch == 0:
        raise ConfigError(f"batch_size {config.batch_size} exceeds the {len(train_images)} training examples")
    total_steps = steps_per_epoch * config.epochs
    if jax.process_index() == 0:
        save_config(config, workdir / "config.json")

    graphdef, state = init_state(config.model, config.optim, config.seed, mesh)
    steps = make_steps(graphdef, config.optim, config.loss, max_shift=config.max_shift, mesh=mesh)
    checkpoints = Checkpoints(workdir, config.keep_checkpoints)
    meta: dict[str, Any] = {"best_accuracy": None, "epoch": 0}
    if checkpoints.latest_step() is not None:
        state, meta = checkpoints.restore(state)
    elif has_checkpoint(workdir):
        raise CheckpointError(
            f"{workdir / 'checkpoints'} holds only an incomplete checkpoint (a run killed while saving?); "
            "delete that folder to start afresh"
        )
    step = int(jax.device_get(state.step))
    log = _MetricsLog(workdir / "metrics.jsonl")
    progress = _Progress(config.progress, total_steps, step)
    if step:
        progress.write(f"resuming from step {step} (epoch {step // steps_per_epoch + 1}) in {workdir}")
    progress.write(
        f"training on {len(train_images)} {config.dataset} images, {steps_per_epoch} steps/epoch x {config.epochs} "
        f"epochs, batch {config.batch_size} over {mesh.size} {jax.devices()[0].platform} device(s)"
    )

    pending: list[dict[str, jax.Array]] = []
    last_saved = step if checkpoints.latest_step() is not None else None
    window_start, window_steps = time.perf_counter(), 0

    def flush() -> dict[str, float] | None:
        """Fetches the pending step metrics; raises if any step diverged; logs their mean."""
        nonlocal pending, window_start, window_steps
        if not pending:
            return None
        fetched = jax.device_get(pending)
        for offset, m in enumerate(fetched):
            if not (math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"])):
                bad_step = step - len(fetched) + offset + 1
                raise TrainingDiverged(
                    f"the loss became non-finite at step {bad_step}; the last good checkpoint "
                    f"(step {last_saved}) is kept in {workdir}; try a lower --learning-rate"
                )
        mean = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
        elapsed = time.perf_counter() - window_start
        mean["images_per_s"] = window_steps * config.batch_size / elapsed if elapsed > 0 else 0.0
        log.write({"step": step, "epoch": step / steps_per_epoch, "split": "train", **mean})
        pending, window_start, window_steps = [], time.perf_counter(), 0
        return mean

    def save(best: bool = False) -> None:
        nonlocal last_saved
        flush()
        checkpoints.save(step, state, meta, best=best)
        last_saved = step

    try:
        while step < total_steps:
            epoch = step // steps_per_epoch
            epoch_start = time.perf_counter()
            for images, labels in _epoch_batches(
                config, train_images, train_labels, epoch, step - epoch * steps_per_epoch, steps
            ):
                state, metrics = steps.train(state, images, labels)
                step += 1
                window_steps += 1
                pending.append(metrics)
                wait_for_queue(pending)
                if step % config.log_every_steps == 0:
                    mean = flush()
                    progress.update(0, loss=f"{mean['loss']:.4f}", img_s=f"{mean['images_per_s']:.0f}")
                if step % config.checkpoint_every_steps == 0:
                    save()
                progress.update(1)
            flush()
            validation = evaluate_arrays(steps, state.params, *datasets.validation, config.eval_batch_size)
            improved = meta["best_accuracy"] is None or validation["accuracy"] > meta["best_accuracy"]
            if improved:
                meta["best_accuracy"] = validation["accuracy"]
            meta["epoch"] = epoch + 1
            record = {k: v for k, v in validation.items() if k not in ("confusion", "per_class_accuracy")}
            epoch_time = time.perf_counter() - epoch_start
            log.write({"step": step, "epoch": epoch + 1, "split": datasets.validation_name, **record,
                       "epoch_time_s": epoch_time})  # fmt: skip
            progress.write(
                f"epoch {epoch + 1}/{config.epochs}: {datasets.validation_name} accuracy "
                f"{100 * validation['accuracy']:.2f}% (loss {validation['loss']:.4f}), {epoch_time:.0f} s"
            )
            if config.test_every_epoch and datasets.validation_name != "test":
                test = evaluate_arrays(steps, state.params, *datasets.test, config.eval_batch_size)
                record = {k: v for k, v in test.items() if k not in ("confusion", "per_class_accuracy")}
                log.write({"step": step, "epoch": epoch + 1, "split": "test", **record})
                progress.write(f"epoch {epoch + 1}/{config.epochs}: test accuracy {100 * test['accuracy']:.2f}%")
            save(best=improved)
    except KeyboardInterrupt:
        progress.close()
        if last_saved != step:
            try:
                save()
                progress.write(f"interrupted: saved step {step} in {workdir}; run the same command to resume")
            except TrainingDiverged:
                pass
        checkpoints.close()
        raise
    progress.close()

    test = evaluate_arrays(steps, state.params, *datasets.test, config.eval_batch_size)
    record = {k: v for k, v in test.items() if k not in ("confusion", "per_class_accuracy")}
    log.write({"step": step, "epoch": step / steps_per_epoch, "split": "test", **record})
    results = {
        "test_accuracy": test["accuracy"],
        "test_loss": test["loss"],
        "best_validation_accuracy": meta["best_accuracy"],
        "validation_split": datasets.validation_name,
        "steps": step,
        "epochs": config.epochs,
        "devices": mesh.size,
        "platform": jax.devices()[0].platform,
    }
    if jax.process_index() == 0:
        (workdir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    progress.write(f"test accuracy {100 * test['accuracy']:.2f}% after {step} steps; results in {workdir}")
    checkpoints.close()
    return results


def maybe_initialize_distributed(force: bool = False) -> None:
    """Joins a multi-host run when asked (``force``) or when ``JAX_COORDINATOR_ADDRESS`` is set; a no-op otherwise."""
    if force or os.environ.get("JAX_COORDINATOR_ADDRESS"):
        jax.distributed.initialize()
