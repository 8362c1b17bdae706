"""The one thin module over Orbax: atomic saves of the train state, resume from the newest intact one, keep the best.

A work directory holds ``checkpoints/<step>/``, written by ONE Orbax ``CheckpointManager``. Each save is the
``TrainState`` pytree plus, at the end of an epoch, the validation metrics of that epoch (Orbax's ``metrics`` item,
written in the same atomic save). Which saves survive is Orbax's preservation policy:

- ``LatestN(keep)``: the newest ``keep`` saves, for resuming;
- ``BestN(1)`` on validation accuracy: the best validated save, for evaluation (``best_step()``);
- :class:`KeepOneBehind`: the newest save at least ``margin`` steps older than the newest one, so that a run whose
  loss blows up still has a checkpoint from before the blow-up.

The best is therefore derived from the metrics saved with the checkpoints: a save cut short by a crash leaves no
half-updated "best" behind, and a resumed run sees the same best as the run that wrote it.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from capsjax import distributed

BEST_METRIC = "accuracy"  # the validation metric the best checkpoint is chosen by (higher is better)
_QUIET = ("absl", "orbax", "jax._src.distributed")


def quiet_logs(verbose: bool = False) -> None:
    """Orbax and absl log every failed restore with a traceback; keep them to critical messages unless ``verbose``."""
    for name in _QUIET:
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.CRITICAL)


quiet_logs()


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete or unreadable; the message names the folder and what to do."""


@dataclasses.dataclass
class KeepOneBehind:
    """Orbax preservation policy: keeps the newest checkpoint at least ``margin`` steps before the next step to run.

    Saves happen only after the losses up to their step were checked finite, but a loss that is about to blow up can
    be finite with parameters already far off; this keeps a checkpoint from ``margin`` or more steps before any
    blow-up that the steps after the newest checkpoint may bring.
    """

    margin: int

    def should_preserve(self, checkpoints: Sequence[Any], *, context: Any) -> list[bool]:
        keep = [False] * len(checkpoints)
        if self.margin > 0 and checkpoints:
            newest = max(c.step for c in checkpoints)
            behind = [i for i, c in enumerate(checkpoints) if c.step <= newest + 1 - self.margin]
            if behind:
                keep[max(behind, key=lambda i: checkpoints[i].step)] = True
        return keep


def _accuracy(metrics: dict[str, Any]) -> float:
    return float(metrics[BEST_METRIC])


def describe_error(err: BaseException) -> str:
    """One clean line for an exception from Orbax or JAX: its type and the first line of its message, without the
    object reprs some of them embed."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    if "<" in text and " at 0x" in text or "pybind11" in text or "bound method" in text:
        text = ""
    text = text[:160]
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


class Checkpoints:
    """The checkpoints of one work directory (``<workdir>/checkpoints/<step>/``) behind one Orbax manager.

    Args:
      workdir: the run's directory.
      keep: how many of the newest saves to keep for resuming.
      safe_margin: also keep the newest save at least this many steps older than the newest (0: off).
      read_only: for readers (evaluation, weights export): never saves, deletes or cleans up, so a reader started
        while the run trains leaves the save in progress (its temporary folder) alone.
    """

    def __init__(self, workdir: str | Path, keep: int = 2, safe_margin: int = 0, read_only: bool = False):
        self.workdir = Path(workdir)
        self.directory = (self.workdir / "checkpoints").absolute()
        policy = policies.AnyPreservationPolicy(
            [
                policies.LatestN(max(keep, 1)),
                policies.BestN(get_metric_fn=_accuracy, n=1, keep_checkpoints_without_metrics=False),
                KeepOneBehind(safe_margin),
            ]
        )
        options = ocp.CheckpointManagerOptions(
            best_fn=_accuracy,
            best_mode="max",
            preservation_policy=policy,
            create=not read_only,
            # a save cut short by a kill leaves a tmp folder: removed when the run starts again
            cleanup_tmp_directories=not read_only,
            read_only=read_only,
            # Synchronous saves: the train step donates the state buffers, so nothing may read them after save().
            enable_async_checkpointing=False,
        )
        try:
            self._manager = ocp.CheckpointManager(self.directory, options=options)
        except Exception as err:  # a workdir that can't be created or read
            raise CheckpointError(f"cannot open {self.directory} ({describe_error(err)})") from None

    # ---- what is there
    def all_steps(self) -> list[int]:
        """Steps of every complete checkpoint, oldest first."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """Step of the newest complete checkpoint, or None."""
        return self._manager.latest_step()

    def best_step(self) -> int | None:
        """Step of the validated checkpoint with the highest validation accuracy, or None before the first epoch."""
        return self._manager.best_step()

    def metrics(self, step: int) -> dict[str, Any] | None:
        """The validation metrics saved with ``step`` (None for a save that is not an epoch end's)."""
        metrics = self._manager.metrics(step)
        return None if metrics is None else dict(metrics)

    # ---- writing
    def save(self, step: int, state: Any, metrics: dict[str, float] | None = None) -> None:
        """Saves ``state`` at ``step`` (with the epoch's validation ``metrics`` at an epoch end); returns once it is
        complete on disk. A save at a step that already has a checkpoint replaces it (the old one is removed first;
        the older checkpoints that :class:`KeepOneBehind` and ``LatestN`` keep cover a crash in between)."""
        if step in self._manager.all_steps():
            self._manager.delete(step)
        self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)), metrics=metrics, force=True)
        self._manager.wait_until_finished()

    def delete_after(self, step: int | None) -> list[int]:
        """Deletes every checkpoint newer than ``step`` (all of them for None); returns their steps."""
        doomed = [s for s in self.all_steps() if step is None or s > step]
        for s in doomed:
            self._manager.delete(s)
        return doomed

    # ---- reading
    def restore(self, abstract_state: Any, step: int) -> Any:
        """Restores checkpoint ``step`` into the shapes, dtypes and shardings of ``abstract_state`` (a pytree of arrays
        or ``jax.ShapeDtypeStruct``); raises :class:`CheckpointError` naming the folder if it can't."""
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
        except Exception as err:  # Orbax raises many types for a damaged or mismatched folder
            if not (self.directory / str(step)).exists():
                raise CheckpointError(
                    f"checkpoint {self.directory / str(step)} was removed while it was read (the run is still training "
                    "and keeps only its newest and best checkpoints); rerun"
                ) from None
            raise CheckpointError(
                f"checkpoint {self.directory / str(step)} is unreadable or does not match this model "
                f"({describe_error(err)})"
            ) from None
        return restored.state

    def restore_newest_intact(self, abstract_state: Any, log=print) -> tuple[Any, int] | None:
        """Restores the newest checkpoint that reads back; a damaged newer one is moved to ``<workdir>/damaged/``
        with one line through ``log``. Returns ``(state, step)``, or None when there is no checkpoint."""
        for step in reversed(self.all_steps()):
            try:
                restored, error = self.restore(abstract_state, step), None
            except CheckpointError as err:
                restored, error = None, err
            # Every process must resume from the same step: one that any process can't read is given up by all.
            if distributed.all_processes(error is None):
                return restored, step
            if jax.process_index() == 0:
                moved = self._quarantine(step)
                reason = error or f"checkpoint {self.directory / str(step)} is unreadable in another process"
                log(f"warning: {reason}; moved it to {moved} and falling back to an earlier checkpoint")
            distributed.barrier("quarantined")  # moved before any process lists the checkpoints again
            self._manager.reload()
        return None

    def _quarantine(self, step: int) -> Path:
        target = self.workdir / "damaged" / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(self.directory / str(step)), str(target))
        return target

    def close(self) -> None:
        """Waits for pending saves and releases the Orbax manager."""
        self._manager.close()
