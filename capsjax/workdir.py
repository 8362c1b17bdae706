"""What a work directory holds besides the checkpoints: its lock, ``metrics.jsonl``, and the rules for resuming.

- :func:`check_workdir`: a run trains in a new or empty folder, or in a run's own; never among other files.
- :class:`WorkdirLock`: one run per work directory (``<workdir>/LOCK`` with the owner's host and pid, taken atomically;
  a lock left by a dead process of the same host is taken over).
- :class:`MetricsLog`: ``metrics.jsonl``; on resume, the entries after the restored step are dropped, so the file
  holds exactly what an uninterrupted run writes.
- :func:`check_resume`: a resume must use the settings the run started with, except the ones listed in
  :data:`RESUMABLE_CHANGES`; :func:`apply_resume_rules` applies it, and after a divergence rolls the run back.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import time
from pathlib import Path
from typing import Any, Iterable

import jax

from capsjax import distributed
from capsjax.checkpoint import Checkpoints
from capsjax.config import (
    ConfigError, OptimConfig, TrainConfig, from_dict, is_saved_config, load_config, save_config, to_dict,
)  # fmt: skip
from capsjax.files import read_json, write_atomic

DIVERGED = "diverged.json"  # written when the loss blows up: the bad step and the checkpoint to restart from
DATA = "data.json"  # the fingerprint of the training and validation data the run started with

# Fields a resumed run may change: they do not alter what the steps already taken computed or the steps to come.
RESUMABLE_CHANGES = frozenset(
    {
        "epochs",
        "data_dir",
        "eval_batch_size",
        "log_every_steps",
        "checkpoint_every_steps",
        "keep_checkpoints",
        "safe_checkpoint_margin",
        "progress",
        "test_every_epoch",
        "also_test_on",
        "tensorboard",
        "multimnist.test_pairs",
    }
)


class WorkdirBusy(RuntimeError):
    """Another run holds the work directory's lock."""


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class WorkdirLock:
    """An exclusive lock on a work directory, held for the life of one run (a context manager).

    The lock file is created with ``O_CREAT | O_EXCL`` (atomic, also on NFS v3+) and holds the owner's host, pid and
    start time. A lock whose owner is a dead process of this host is stale and taken over; one held by another host
    can't be checked from here, so the error says how to remove it.
    """

    _held: list["WorkdirLock"] = []  # this process's held locks, for :meth:`release_all`

    def __init__(self, workdir: str | Path):
        self.path = Path(workdir) / "LOCK"
        self.held = False

    def acquire(self) -> "WorkdirLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        owner = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is None or self._stale(holder):
                    self._break()
                    continue
                raise WorkdirBusy(
                    f"{self.path.parent} is in use by another run (pid {holder.get('pid')} on {holder.get('host')}, "
                    f"since {holder.get('started')}); wait for it, stop it, or use another --workdir"
                    + ("" if holder.get("host") == owner["host"] else f" (if that run is gone, delete {self.path})")
                ) from None
            with os.fdopen(fd, "w") as f:
                json.dump(owner, f)
            self.held = True
            WorkdirLock._held.append(self)
            return self
        raise WorkdirBusy(f"could not take the lock {self.path}; delete it if no run uses {self.path.parent}")

    def _holder(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}  # released in between: try again
        except (OSError, ValueError):
            return None  # half-written by a process killed while taking it

    def _stale(self, holder: dict[str, Any]) -> bool:
        if not holder:
            return True
        return holder.get("host") == socket.gethostname() and not _process_alive(int(holder.get("pid", -1)))

    def _break(self) -> None:
        # Rename first, so that of two runs breaking the same stale lock only one removes it.
        aside = self.path.with_name(f"LOCK.stale-{os.getpid()}")
        try:
            os.rename(self.path, aside)
            os.unlink(aside)
        except OSError as err:
            if err.errno != errno.ENOENT:
                raise

    def take_over_idle(self, idle_s: float = 600.0) -> dict[str, Any] | None:
        """Breaks a lock held on another host if its run has written nothing for ``idle_s`` seconds (the newest of
        the lock, ``metrics.jsonl`` and the checkpoints), e.g. one left by a Colab runtime that was recycled; returns
        the holder it removed, or None (no lock, one of this host's, which :meth:`acquire` judges by its pid, or a run
        still writing)."""
        holder = self._holder()
        if not holder or holder.get("host") == socket.gethostname():
            return None
        folder = self.path.parent
        written = [p.stat().st_mtime for p in (self.path, folder / "metrics.jsonl", *folder.glob("checkpoints/*"))
                   if p.exists()]  # fmt: skip
        if time.time() - max(written, default=0.0) < idle_s:
            return None
        self._break()
        return holder

    def release(self) -> None:
        if self.held:
            self.held = False
            WorkdirLock._held.remove(self)
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass

    @classmethod
    def release_all(cls) -> None:
        """Releases every lock this process holds (for an exit that skips the ``finally`` blocks, ``os._exit``)."""
        for lock in list(cls._held):
            lock.release()

    def __enter__(self) -> "WorkdirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


class MetricsLog:
    """``metrics.jsonl``: one JSON object per line, written by process 0 only."""

    def __init__(self, path: str | Path, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
                f.flush()

    def records(self) -> list[dict[str, Any]]:
        """The entries written so far (a line cut short by a kill is skipped)."""
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out

    def truncate(self, step: int, drop_epoch_end: bool = False) -> int:
        """Keeps the entries up to ``step`` (and, with ``drop_epoch_end``, drops the evaluation entries AT ``step``,
        whose epoch is to be validated again); rewrites the file atomically. Returns how many entries were dropped."""
        if not self.enabled or not self.path.exists():
            return 0
        records = self.records()

        def keep(r: dict[str, Any]) -> bool:
            if r.get("step", 0) > step:
                return False
            return not (drop_epoch_end and r.get("step") == step and r.get("split") != "train")

        kept = [r for r in records if keep(r)]
        write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        return len(records) - len(kept)


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_changes(previous: TrainConfig, current: TrainConfig) -> dict[str, tuple[Any, Any]]:
    """``{dotted field: (previous, current)}`` for every field that differs."""
    a, b = _flatten(to_dict(previous)), _flatten(to_dict(current))
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def refused_changes(previous: TrainConfig, current: TrainConfig, allowed: Iterable[str] = ()) -> str:
    """The fields ``current`` changes that a resumed run must keep (anything outside :data:`RESUMABLE_CHANGES` and
    ``allowed`` prefixes), listed as "field old -> new, ..."; "" if none. Changing ``model.arch`` is refused; the
    model fields that the run's architecture does not read (``ModelConfig.unused_fields``, e.g. ``cnn_*`` for the
    CapsNet) may change."""
    allowed = tuple(allowed)
    unused = set()
    if previous.model.arch == current.model.arch:
        unused = {f"model.{name}" for name in previous.model.unused_fields}
    refused = {
        k: v
        for k, v in config_changes(previous, current).items()
        if k not in RESUMABLE_CHANGES and k not in unused and not k.startswith(allowed)
    }
    return ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in refused.items())


def check_resume(previous: TrainConfig, current: TrainConfig, workdir: Path, allowed: Iterable[str] = ()) -> None:
    """Raises :class:`ConfigError` if ``current`` changes a field that a resumed run must keep
    (:func:`refused_changes`), listing the differences."""
    listed = refused_changes(previous, current, allowed)
    if listed:
        raise ConfigError(
            f"{workdir} holds a run with other settings ({listed}); rerun with its settings to resume "
            f"(see {workdir / 'config.json'}), or start a new run with another --workdir"
        )


# what a capsjax run writes (the lock, then config.json; the rest follow; a folder a user cleared for a fresh start may
# keep only some): a folder holding none of them is not a run of ours
RUN_FILES = ("LOCK", "config.json", "metrics.jsonl", "checkpoints", "tensorboard", DATA, DIVERGED, "results.json")


def check_workdir(workdir: Path) -> None:
    """Refuses to train in ``workdir`` unless it is new, empty, or a capsjax run's: a folder of other files (a
    project, the home folder, a data folder) would get checkpoints and metrics written among its files, and a
    ``config.json`` of its own replaced; a collected results folder (``record.json``, no checkpoints) would get its
    metrics replaced beside its evaluations."""
    if not workdir.exists():
        return
    if not workdir.is_dir():
        raise ConfigError(f"--workdir {workdir} is a file: pass a folder (new, empty, or a capsjax run's)")
    if (workdir / "record.json").exists() and not (workdir / "checkpoints").exists():
        raise ConfigError(
            f"{workdir} is a results folder (its record.json was written by python -m capsjax.results collect): train "
            "in a work directory outside results/, e.g. ~/capsjax-runs/NAME, and collect it from there"
        )
    # (dotfiles and lost+found: a fresh mount, a Finder's .DS_Store, a multi-process marker left by a crash)
    names = sorted(p.name for p in workdir.iterdir() if not p.name.startswith(".") and p.name != "lost+found")
    if not names:
        return
    if not any(name in RUN_FILES or name.startswith("LOCK.") for name in names):  # LOCK.stale-PID: a lock taken over
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        raise ConfigError(
            f"{workdir} holds other files ({shown}) and no capsjax run: train in a new or empty folder, e.g. "
            "~/capsjax-runs/NAME"
        )
    config = workdir / "config.json"
    if config.exists() and not _has_checkpoints(workdir):  # replaced when the run starts: only our own
        try:
            recorded = read_json(config, "it is not a run's", ConfigError)
            if not is_saved_config(recorded):
                raise ConfigError("no model and optim of capsjax's")
            from_dict(TrainConfig, recorded)  # the fields load_config would read
        except ConfigError as error:
            raise ConfigError(
                f"{workdir} holds a config.json that is not a capsjax run's ({error}); train in a new or empty folder"
            ) from None


def apply_resume_rules(
    config: TrainConfig, workdir: Path, data_fingerprint: str | None = None, scored: dict[str, str] | None = None
) -> TrainConfig:
    """Refuses settings that can't continue the run in ``workdir``, and training data other than the run's (by
    ``data_fingerprint``, :meth:`capsjax.data.Datasets.fingerprint`, kept in ``data.json`` with the hashes of the
    validation and test sets, ``scored``, for :func:`capsjax.evaluate.evaluate_workdir`); after a divergence,
    requires new optimizer settings and rolls the run back to the checkpoint from before the blow-up. Writes
    ``config.json``."""
    path, marker, data_file = workdir / "config.json", workdir / DIVERGED, workdir / DATA
    previous = diverged = recorded_data = None
    if path.exists() and (marker.exists() or _has_checkpoints(workdir)):
        previous = load_config(path)
        if marker.exists():
            hint = "it records where the run diverged: restore it, or start a new run with another --workdir"
            diverged = read_json(marker, hint, ConfigError)
        if data_file.exists():
            hint = "restore it, or delete it to resume without checking the data"
            recorded_data = read_json(data_file, hint, ConfigError).get("fingerprint")
    # Every process has read the run's state before process 0 changes it (rolls back, rewrites config.json).
    distributed.barrier("resume_state")
    if None not in (recorded_data, data_fingerprint) and recorded_data != data_fingerprint:
        raise ConfigError(
            f"the training or validation data differ from those the run in {workdir} started with (other files, or "
            f"a source that orders them differently, from --data-dir {config.data_dir or '(default)'}); resume with "
            "its data, or start a new run with another --workdir"
        )
    if previous is not None:
        if diverged is not None:
            # the settings that blew up (a diverged.json written before "optim" was recorded: those of config.json;
            # a crash between rewriting config.json and removing diverged.json leaves the new ones there)
            blown = from_dict(OptimConfig, diverged["optim"]) if "optim" in diverged else previous.optim
            if config.optim == blown:
                raise ConfigError(
                    f"the run in {workdir} diverged at step {diverged['step']} with learning rate "
                    f"{blown.learning_rate:g}; rerun with a lower --learning-rate (it restarts from "
                    + (f"step {diverged['safe_step']})" if diverged["safe_step"] is not None else "scratch)")
                )
            check_resume(previous, config, workdir, allowed=("optim.",))
            _roll_back(workdir, diverged["safe_step"], config)
        else:
            check_resume(previous, config, workdir)
    if jax.process_index() == 0:
        save_config(config, path)
        marker.unlink(missing_ok=True)
        if data_fingerprint is not None:
            record = {"fingerprint": data_fingerprint, **({"scored_sha256": scored} if scored else {})}
            write_atomic(data_file, json.dumps(record) + "\n")
    return config


def _has_checkpoints(workdir: Path) -> bool:
    """Whether ``workdir`` holds a checkpoint folder (``checkpoints/<step>``; not only a save cut short)."""
    folder = workdir / "checkpoints"
    return folder.is_dir() and any(p.name.isdigit() for p in folder.iterdir())


def _roll_back(workdir: Path, step: int | None, config: TrainConfig) -> None:
    """Drops the checkpoints and metrics after ``step`` (None: all of them). Every process opens the checkpoints and
    deletes: Orbax deletes on process 0 only, but waits on a barrier in each process for each step."""
    checkpoints = Checkpoints(workdir, config.keep_checkpoints)
    dropped = checkpoints.delete_after(step)
    checkpoints.close()
    if jax.process_index() == 0:
        MetricsLog(workdir / "metrics.jsonl").truncate(step or 0)
        print(f"restarting from {'step ' + str(step) if step is not None else 'scratch'} with the new optimizer "
              f"settings (dropped checkpoints {dropped})", flush=True)  # fmt: skip
    distributed.barrier("rollback")
