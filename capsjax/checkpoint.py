"""The one thin module over Orbax: atomic saves of the train state, the latest for resuming, the best for evaluation.

Layout of a work directory: ``checkpoints/<step>/`` (the most recent ``keep`` saves) and ``best/<step>/`` (the save
with the highest validation accuracy). Each save holds ``state`` (the ``TrainState`` pytree) and ``meta`` (JSON: epoch,
validation metrics). Orbax writes into a temporary folder and renames it when complete, so a killed run leaves the
previous checkpoint intact.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

for _name in ("absl", "orbax"):
    logging.getLogger(_name).setLevel(logging.ERROR)


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete or unreadable; the message names the folder."""


def _manager(directory: Path, keep: int) -> ocp.CheckpointManager:
    # Synchronous saves: the train step donates the state buffers, so nothing may read them after save() returns.
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
    return ocp.CheckpointManager(Path(directory).absolute(), options=options)


class Checkpoints:
    """Latest and best checkpoints of one work directory: ``<workdir>/checkpoints/<step>/`` (the last ``keep``) and
    ``<workdir>/best/<step>/`` (one), each holding the ``TrainState`` pytree and a small JSON ``meta`` dict (epoch,
    best validation accuracy). Orbax writes each save atomically, so a save cut short is not restored."""

    def __init__(self, workdir: str | Path, keep: int = 2):
        self.workdir = Path(workdir)
        self._latest = _manager(self.workdir / "checkpoints", keep)
        self._best = _manager(self.workdir / "best", 1)

    def latest_step(self) -> int | None:
        """Step of the newest complete checkpoint under ``checkpoints/``, or None."""
        return self._latest.latest_step()

    def best_step(self) -> int | None:
        """Step of the best checkpoint (highest validation accuracy) under ``best/``, or None."""
        return self._best.latest_step()

    def save(self, step: int, state: Any, meta: dict[str, Any], best: bool = False) -> None:
        """Saves ``state`` and ``meta`` at ``step`` (also as the best one when ``best``); returns once on disk."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        managers = [self._latest, self._best] if best else [self._latest]
        for manager in managers:
            if manager.latest_step() != step:
                manager.save(step, args=args, force=True)
        for manager in managers:
            manager.wait_until_finished()

    def restore(self, abstract_state: Any, which: str = "latest") -> tuple[Any, dict[str, Any]]:
        """Restores into the shapes, dtypes and shardings of ``abstract_state`` (a pytree of arrays or
        ``jax.ShapeDtypeStruct``). ``which`` is "latest" or "best"."""
        manager = {"latest": self._latest, "best": self._best}[which]
        step = manager.latest_step()
        folder = manager.directory
        if step is None:
            raise CheckpointError(f"no complete checkpoint in {folder}")
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
        args = ocp.args.Composite(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore())
        try:
            restored = manager.restore(step, args=args)
        except Exception as err:  # Orbax raises many types for a damaged folder
            raise CheckpointError(
                f"checkpoint {folder / str(step)} is unreadable or does not match this model "
                f"({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
                "delete that folder to fall back to an earlier one, or use a new --workdir"
            ) from None
        return restored.state, dict(restored.meta)

    def close(self) -> None:
        """Waits for pending saves and releases the Orbax managers."""
        self._latest.close()
        self._best.close()


def has_checkpoint(workdir: str | Path) -> bool:
    """Whether ``workdir`` holds any step folder under ``checkpoints/`` (complete or not)."""
    folder = Path(workdir) / "checkpoints"
    return folder.is_dir() and any(p.is_dir() for p in folder.iterdir())
