"""The training loop: ``train_and_evaluate(config, workdir)``, in six visible stages.

1. devices and mesh; 2. data; 3. the work directory (lock, resume rules) and the state (the newest intact checkpoint);
4. the compiled steps; 5. the loop; 6. the end of the run (test, ``results.json``).

One rule for saving: a checkpoint every ``checkpoint_every_steps`` steps, and one at the end of every epoch, written
after that epoch's validation and holding its metrics (the two never fall on one step: the epoch's end takes it). The
best checkpoint is the validated one with the highest accuracy (:mod:`capsjax.checkpoint`). A run stopped between an
epoch's last step and the save of its validation validates that epoch first when it resumes. Resuming replays the
same batches and random keys, so a resumed run ends with the parameters and ``metrics.jsonl`` of an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import numpy as np

from capsjax import data as datalib
from capsjax import distributed
from capsjax.checkpoint import Checkpoints
from capsjax.config import ConfigError, TrainConfig, to_dict
from capsjax.data import Datasets, adapt_model_to_data, load_also_test, load_datasets
from capsjax.evaluate import StopRequested, evaluate_arrays, predict_arrays
from capsjax.files import write_atomic
from capsjax.reporting import Console, TensorBoard, Window
from capsjax.steps import Steps, default_mesh, init_state, make_steps, wait_for_queue
from capsjax.workdir import DIVERGED, MetricsLog, WorkdirLock, apply_resume_rules, check_workdir

class TrainingDiverged(RuntimeError):
    """The loss or the gradients became NaN or infinite."""


class Preempted(RuntimeError):
    """Training stopped on request (SIGTERM / SIGINT, or a preemption notice) after saving; rerun to resume."""


@dataclasses.dataclass
class _Run:
    """What the stages hand on to each other."""

    config: TrainConfig
    workdir: Path
    datasets: Datasets
    steps_per_epoch: int
    checkpoints: Checkpoints
    state: Any
    step: int
    validate_first: bool  # the restored step ends an epoch whose validation was not saved
    log: MetricsLog
    console: Console
    tensorboard: TensorBoard
    stop: distributed.StopSignal
    saved_step: int | None = None
    window: Window | None = None  # the steps trained since the last report (the loop's)
    epoch_started: float = dataclasses.field(default_factory=time.perf_counter)
    epoch_first_step: int | None = None  # the step this process started the current epoch's timing at

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.config.epochs


def train_and_evaluate(
    config: TrainConfig, workdir: str | Path, *, should_stop: Callable[[], bool] | None = None
) -> dict[str, Any]:
    """Trains ``config`` in ``workdir`` (resuming from its newest intact checkpoint), validates and checkpoints every
    epoch, and evaluates the final model on the test set (rerun after the run has ended, it returns the recorded
    ``results.json`` without training or scoring again).

    Writes ``config.json``, ``metrics.jsonl``, ``tensorboard/``, ``checkpoints/`` and ``results.json`` into
    ``workdir`` and returns the results dict. ``should_stop()`` is polled every step (and between evaluation batches):
    when it returns True the run saves and raises :class:`Preempted`; a multi-process run instead stops at JAX's
    preemption sync point, on which every process agrees. Raises :class:`~capsjax.workdir.WorkdirBusy` if another run
    holds ``workdir``, :class:`~capsjax.config.ConfigError` for settings that can't resume the run in ``workdir`` or
    a ``workdir`` that holds other files (:func:`~capsjax.workdir.check_workdir`),
    :class:`TrainingDiverged` if the loss blows up.
    """
    workdir = Path(workdir)
    check_workdir(workdir)  # a new or empty folder, or a run's: never among other files
    mesh = default_mesh()  # 1. devices and mesh
    if config.batch_size % mesh.size or config.eval_batch_size % mesh.size:
        raise ConfigError(
            f"batch_size ({config.batch_size}) and eval_batch_size ({config.eval_batch_size}) must be divisible by "
            f"the number of devices ({mesh.size})"
        )
    datasets = load_datasets(config)  # 2. data
    config = adapt_model_to_data(config, datasets)
    datasets.also_test = load_also_test(config)
    steps_per_epoch = len(datasets.train[0]) // config.batch_size
    if steps_per_epoch == 0:
        raise ConfigError(f"batch_size {config.batch_size} exceeds the {len(datasets.train[0])} training examples")

    fingerprint, scored = datasets.fingerprint(), datasets.scored_sha256()
    if jax.process_count() > 1:  # every process the same settings and data (data_dir aside: a copy of the files may
        # sit elsewhere on each host; progress aside: only process 0 draws)
        settings = json.dumps({**to_dict(config), "data_dir": None, "progress": None}, sort_keys=True)
        also = {name: datalib.arrays_sha256(*arrays) for name, arrays in datasets.also_test.items()}
        data = json.dumps([fingerprint, scored, also], sort_keys=True)
        distributed.check_same({"settings": settings, "data": data})
    lock = distributed.lock_workdir(WorkdirLock(workdir))  # 3. work directory and state
    try:
        distributed.check_shared(workdir)
        config = apply_resume_rules(config, workdir, fingerprint, scored)
        graphdef, state = init_state(config.model, config.optim, config.seed, mesh)
        run = _open_run(config, workdir, datasets, steps_per_epoch, state, should_stop)
        augment = datalib.train_augmentation(
            config.max_shift, config.canvas_size, config.horizontal_flip, config.augmentation
        )
        steps = make_steps(
            graphdef, config.optim, config.loss, augment=augment, mesh=mesh, num_targets=config.model.num_targets
        )  # 4. steps
        try:
            finished = _finished_results(run)
            if finished is not None:  # the same command rerun after the run had ended: nothing to train or score
                return finished
            if jax.process_index() == 0:  # written again when this run ends (e.g. resumed for more epochs): not done
                (workdir / "results.json").unlink(missing_ok=True)
            _loop(run, steps)  # 5. the loop
            return _end_of_run(run, steps)  # 6. end of run
        except KeyboardInterrupt:
            _save_on_interrupt(run)
            raise
        finally:
            run.console.close()
            run.tensorboard.close()
            run.checkpoints.close()
    finally:
        lock.release()


# ---- 3. work directory and state
def _open_run(config, workdir, datasets, steps_per_epoch, state, should_stop) -> _Run:
    console_log = print if jax.process_index() == 0 else (lambda _: None)
    checkpoints = Checkpoints(workdir, config.keep_checkpoints, config.safe_checkpoint_margin)
    restored = checkpoints.restore_newest_intact(state, log=console_log)
    step = 0
    if restored is not None:
        state, step = restored
    validate_first = step > 0 and step % steps_per_epoch == 0 and checkpoints.metrics(step) is None
    log = MetricsLog(workdir / "metrics.jsonl", enabled=jax.process_index() == 0)
    log.truncate(step, drop_epoch_end=validate_first)
    total = steps_per_epoch * config.epochs
    run = _Run(
        config, workdir, datasets, steps_per_epoch, checkpoints, state, step, validate_first, log,
        Console(config.progress, total, step, steps_per_epoch),
        TensorBoard(workdir, config.tensorboard, purge_step=step + 1 if step else None),
        distributed.StopSignal(should_stop),
        saved_step=step if restored is not None else None,
    )  # fmt: skip
    if step:
        run.console.write(f"resuming from step {step} (epoch {step / steps_per_epoch:.2f}) in {workdir}")
    run.console.write(
        f"training on {len(datasets.train[0])} {config.dataset} "
        + ("images" if datasets.pairs is None else "digits as bases of new pairs each epoch")
        + f", {steps_per_epoch} steps/epoch x "
        f"{config.epochs} epochs, batch {config.batch_size} over {jax.device_count()} {jax.devices()[0].platform} "
        f"device(s) in {jax.process_count()} process(es)"
    )
    if config.train_examples is not None and len(datasets.train[0]) < config.train_examples:
        run.console.write(
            f"note: train_examples={config.train_examples}, but {config.dataset} has only {len(datasets.train[0])} "
            f"training examples after the {config.validation_examples} held out: training on all of them"
        )
    return run


# ---- 5. the loop
def _epoch_batches(run: _Run, steps: Steps) -> Iterator[tuple[jax.Array, ...]]:
    """The current epoch's global batches from the first one not yet trained, prefetched onto the devices:
    ``(images, labels)``, or ``(images, labels, digits)`` for MultiMNIST (:meth:`Datasets.train_batches`)."""
    epoch, done = divmod(run.step, run.steps_per_epoch)
    local = run.datasets.train_batches(run.config.batch_size, seed=run.config.seed, epoch=epoch)
    for _ in range(done):
        next(local)
    return datalib.prefetch_to_device(local, size=2, sharding=steps.data_sharding)


def _loop(run: _Run, steps: Steps) -> None:
    window = run.window = Window(run.config.batch_size)
    if run.validate_first:
        _end_epoch(run, steps)
    while run.step < run.total_steps:
        run.epoch_started = window.started = time.perf_counter()
        run.epoch_first_step = run.step
        stop = False
        for batch in _epoch_batches(run, steps):
            run.state, metrics = steps.train(run.state, *batch)
            run.step += 1
            window.add(metrics)
            wait_for_queue(window.pending)
            run.console.step()
            stop = run.stop.at_step(run.step)  # every step: the processes of a run agree on the step to stop at
            if run.step % run.steps_per_epoch:  # the epoch's last step is validated and saved by _end_epoch
                _between_steps(run, stop)
        _end_epoch(run, steps)
        if stop:
            raise Preempted(_stopped(run))


def _stopped(run: _Run) -> str:
    return f"stopped at step {run.step}; saved in {run.workdir}: run the same command to resume"


def _between_steps(run: _Run, stop: bool) -> None:
    if stop:
        _save(run)
        raise Preempted(_stopped(run))
    if run.step % run.config.log_every_steps == 0:
        _report(run)
    if run.step % run.config.checkpoint_every_steps == 0:
        _save(run)


def _report(run: _Run) -> None:
    """Logs the mean of the window's step metrics; raises :class:`TrainingDiverged` if any step's loss blew up."""
    window = run.window
    if window is None or not window.pending:
        return
    count = len(window.pending)
    fetched = window.take()
    for offset, m in enumerate(fetched):
        if not (math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"])):
            _diverged(run, run.step - count + offset + 1)
    mean = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
    rates = window.rates(count)
    record = {"step": run.step, "epoch": run.step / run.steps_per_epoch, "split": "train", **mean,
              "images_per_s": rates["images_per_s"]}  # fmt: skip
    run.log.write(record)
    run.tensorboard.record(record)
    run.console.window(run.step, {**record, **rates})


def _diverged(run: _Run, bad_step: int) -> None:
    margin = run.config.safe_checkpoint_margin
    safe = [s for s in run.checkpoints.all_steps() if s <= bad_step - margin]
    safe_step = safe[-1] if safe else None
    if jax.process_index() == 0:
        note = {"step": bad_step, "safe_step": safe_step, "learning_rate": run.config.optim.learning_rate,
                "optim": to_dict(run.config.optim)}  # fmt: skip
        write_atomic(run.workdir / DIVERGED, json.dumps(note) + "\n")
    where = f"checkpoint step {safe_step}, {bad_step - safe_step} steps before," if safe else "no checkpoint"
    raise TrainingDiverged(
        f"the loss became non-finite at step {bad_step}; {where} is kept in {run.workdir}; rerun with a lower "
        "--learning-rate to restart from " + ("it" if safe else "scratch")
    )


def _save(run: _Run, metrics: dict[str, float] | None = None) -> None:
    _report(run)  # checks the losses up to this step before they are saved
    run.checkpoints.save(run.step, run.state, metrics)
    run.saved_step = run.step


def _save_on_interrupt(run: _Run) -> None:
    """KeyboardInterrupt (a notebook's stop button, the CLI's second Ctrl-C): keeps the steps done if the state is
    intact, logging them and checking their losses first, as every save does."""
    if run.saved_step == run.step or run.window is None:
        return
    try:
        if int(jax.device_get(run.state.step)) != run.step:  # between a step and its bookkeeping: not saved as step N
            raise RuntimeError("the state and the step count disagree")
        _save(run)
        run.console.write(f"interrupted: saved step {run.step} in {run.workdir}; run the same command to resume")
    except TrainingDiverged as err:
        run.console.write(f"interrupted: {err}")
    except Exception:  # the interrupt hit a step that had taken the state's buffers
        run.console.write(f"interrupted: the newest checkpoint in {run.workdir} is step {run.saved_step}")


def _evaluate(run: _Run, steps: Steps, split: tuple[np.ndarray, ...], stop=None) -> dict[str, Any]:
    """:func:`evaluate_arrays` on a split's ``(images, labels)`` or ``(images, labels, digits)``."""
    images, labels, *digits = split
    return evaluate_arrays(
        steps, run.state.params, images, labels, run.config.eval_batch_size, stop, digits=digits[0] if digits else None
    )


def _without_tables(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if k not in ("confusion", "per_class_accuracy")}


def _end_epoch(run: _Run, steps: Steps) -> None:
    """Validates the epoch that just ended (and tests, with ``test_every_epoch``, and scores the ``also_test_on``
    sets), then saves with the metrics."""
    _report(run)
    train_time = time.perf_counter() - run.epoch_started
    # the steps of this epoch that this process trained and timed: fewer after a resume inside the epoch, none when
    # it only validates an epoch trained before a stop
    timed_steps = 0 if run.epoch_first_step is None else run.step - run.epoch_first_step
    config, epoch, name = run.config, run.step // run.steps_per_epoch, run.datasets.validation_name
    stop = run.stop.now
    try:
        validation = _evaluate(run, steps, run.datasets.validation, stop)
        test = None
        if config.test_every_epoch and name != "test":
            test = _evaluate(run, steps, run.datasets.test, stop)
        also = {other: _evaluate(run, steps, split, stop) for other, split in run.datasets.also_test.items()}
    except StopRequested:
        _save(run)  # without metrics: the resumed run validates this epoch first
        raise Preempted(_stopped(run)) from None
    epoch_time = time.perf_counter() - run.epoch_started
    for split, metrics in ((name, validation), ("test", test), *also.items()):
        if metrics is not None:
            record = {"step": run.step, "epoch": epoch, "split": split, **_without_tables(metrics)}
            if split == name:  # wall time of the epoch: training, then its validation (test, also_test_on sets)
                record.update(epoch_time_s=epoch_time, train_time_s=train_time, timed_steps=timed_steps)
            run.log.write(record)
            run.tensorboard.record(record)
    _reconstructions_to_tensorboard(run, steps)
    _save(run, {"accuracy": validation["accuracy"], "loss": validation["loss"], "epoch": epoch})
    best = run.checkpoints.best_step()
    run.console.write(
        f"epoch {epoch}/{config.epochs}: {name} accuracy {100 * validation['accuracy']:.2f}% "
        f"(loss {validation['loss']:.4f})" + (f", test {100 * test['accuracy']:.2f}%" if test else "")
        + "".join(f", {other} {100 * metrics['accuracy']:.2f}%" for other, metrics in also.items())
        + f", {epoch_time:.0f} s" + (" (new best)" if best == run.step else "")
    )


def _reconstructions_to_tensorboard(run: _Run, steps: Steps, count: int = 8) -> None:
    if not run.config.tensorboard or not run.config.model.use_decoder:
        return
    images = run.datasets.validation[0][:count]
    out = predict_arrays(steps, run.state.params, images, batch_size=count)
    if getattr(out, "reconstructions", None) is None:  # a model without decoder (the baseline CNN)
        return
    inputs = images.astype(np.float32) / 255.0 if images.dtype == np.uint8 else images
    recon = out.reconstructions
    if recon.ndim == 5:  # one reconstruction per digit (MultiMNIST): red and green over each other, as in Fig. 5
        from capsjax.viz import overlay_pair

        inputs, recon = np.repeat(inputs, 3, axis=-1), overlay_pair(recon[:, 0], recon[:, 1])
    run.tensorboard.images("reconstructions", np.concatenate([inputs, recon], axis=1), run.step)
    run.tensorboard.flush()


# ---- 6. end of run
def _finished_results(run: _Run) -> dict[str, Any] | None:
    """The ``results.json`` of a run that had already ended in its work directory (its last step trained, validated
    and scored), or None when there is training or its final evaluation left to do."""
    if run.step < run.total_steps or run.validate_first:
        return None
    try:
        results = json.loads((run.workdir / "results.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(results, dict) or results.get("steps") != run.step or "test_accuracy" not in results:
        return None
    run.console.write(
        f"the run in {run.workdir} has ended (step {run.step}): test accuracy {100 * results['test_accuracy']:.2f}% "
        "(results.json); more epochs continue it (--epochs)"
    )
    return results


def _end_of_run(run: _Run, steps: Steps) -> dict[str, Any]:
    config = run.config
    test = _evaluate(run, steps, run.datasets.test)
    record = {"step": run.step, "epoch": run.step / run.steps_per_epoch, "split": "test", **_without_tables(test)}
    final = [r for r in run.log.records() if r.get("split") == "test" and r.get("final")]
    if not any(r["step"] == run.step for r in final):
        run.log.write({**record, "final": True})
    best = run.checkpoints.best_step()
    best_metrics = run.checkpoints.metrics(best) if best is not None else None
    results = {
        "test_accuracy": test["accuracy"],
        "test_loss": test["loss"],
        **({"test_almost_accuracy": test["almost_accuracy"]} if "almost_accuracy" in test else {}),
        "best_validation_accuracy": None if best_metrics is None else best_metrics["accuracy"],
        "best_step": best,
        "validation_split": run.datasets.validation_name,
        "steps": run.step,
        "examples_seen": run.step * config.batch_size,  # MultiMNIST: training pairs generated and trained on
        "epochs": config.epochs,
        "devices": steps.mesh.size,
        "processes": jax.process_count(),
        "platform": jax.devices()[0].platform,
    }
    if jax.process_index() == 0:
        write_atomic(run.workdir / "results.json", json.dumps(results, indent=2) + "\n")
    run.console.write(f"test accuracy {100 * test['accuracy']:.2f}% after {run.step} steps; results in {run.workdir}")
    return results
