"""Several processes, one run: joining a multi-host run, agreeing on the step to stop at, sharing the work directory.

Everything here is a no-op or trivial in a single-process run. :func:`initialize` (the CLIs call it) is the only
function that sets process-wide state; the training loop uses the rest.
"""

from __future__ import annotations

import atexit
import os
import re
import secrets
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import jax
import numpy as np

ENV_ADDRESS, ENV_PROCESSES, ENV_ID = "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"
SHARED_TIMEOUT_S = float(os.environ.get("CAPSJAX_SHARED_TIMEOUT_S", 60))  # for a marker to show on another host


class DistributedError(RuntimeError):
    """A multi-process run that can't go on (bad launch settings, a work directory that is not shared)."""


def settings(address: str | None, num_processes: int | None, process_id: int | None, environ=None):
    """The launch settings from the flags, else from ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and
    ``JAX_PROCESS_ID``; ``None`` where neither gives one (JAX then detects it on Slurm, Cloud TPU, Kubernetes...)."""
    environ = os.environ if environ is None else environ
    address = address or environ.get(ENV_ADDRESS) or None
    try:
        if num_processes is None and environ.get(ENV_PROCESSES):
            num_processes = int(environ[ENV_PROCESSES])
        if process_id is None and environ.get(ENV_ID):
            process_id = int(environ[ENV_ID])
    except ValueError:
        raise DistributedError(f"{ENV_PROCESSES} and {ENV_ID} must be integers") from None
    if num_processes is not None and num_processes < 1:
        raise DistributedError(f"--num-processes must be >= 1, got {num_processes}")
    if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
        raise DistributedError(f"--process-id must be in [0, {num_processes}), got {process_id}")
    if (num_processes is None) != (process_id is None):
        raise DistributedError("give both --num-processes and --process-id (or neither, to auto-detect)")
    if num_processes is not None and address is None:
        raise DistributedError("--num-processes needs --coordinator-address HOST:PORT (the host of process 0)")
    return address, num_processes, process_id


def initialize(
    address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    prog: str = "capsjax",
    verbose: bool = False,
) -> None:
    """Joins a multi-process run through ``jax.distributed.initialize``: explicit settings, or cluster auto-detection
    (Slurm, Cloud TPU, Kubernetes, MPI) where none are given. Cross-process CPU collectives go through gloo.

    Then, unless ``verbose``, the native runtime's log lines are filtered out of stderr, and a process whose peer dies
    prints one line and exits (status 1) instead of the runtime's abort with a stack dump (:class:`PeerWatch`)."""
    address, num_processes, process_id = settings(address, num_processes, process_id)
    if _backend_started():
        raise DistributedError("jax.distributed must be initialized before JAX starts its backend")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(address, num_processes, process_id)
    except (ValueError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DistributedError(
            f"could not join the multi-process run ({first}); outside Slurm, Cloud TPU or Kubernetes pass "
            "--coordinator-address HOST:PORT --num-processes N --process-id I"
        ) from None
    if not verbose:
        _NativeStderr(prog).start()
    PeerWatch(prog).start()


_PEER_FAILURES = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "Gloo", "heartbeat")


def is_peer_failure(err: BaseException) -> bool:
    """Whether a runtime error says a collective lost its connection to another process."""
    return any(marker in str(err) for marker in _PEER_FAILURES)


def peer_failure_message(err: BaseException) -> str:
    detail = "connection reset by peer" if "reset" in str(err) else str(err).strip().splitlines()[0][:120]
    return (f"lost contact with another process of this run ({detail}): it died or its host went down; "
            f"{_RESUME_HINT}")  # fmt: skip


def leave(code: int) -> None:
    """Ends a process of a multi-process run that failed, skipping JAX's shutdown barrier (which a peer that failed
    elsewhere never reaches, so the runtime would abort): the peers see this process stop and end with one line."""
    sys.stdout.flush()
    sys.stderr.flush()
    time.sleep(0.2)  # let the stderr filter pass the last lines on
    os._exit(code)


def _backend_started() -> bool:
    from jax._src import xla_bridge

    return bool(getattr(xla_bridge, "_backends", None))


def all_processes(flag: bool) -> bool:
    """Whether ``flag`` holds on every process (a collective: every process must call it)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.int32(flag))))


def check_same(parts: dict[str, str]) -> None:
    """In a multi-process run, that every process holds the same value of each of ``parts`` (e.g. ``{"settings":
    ..., "data": ...}``) as process 0: otherwise they would train on mismatched examples, or hang in mismatched
    collectives when their step counts differ. A collective: every process must call it (with the same names); every
    process raises the same error, naming the processes and the parts that differ."""
    if jax.process_count() == 1:
        return
    import hashlib

    from jax.experimental import multihost_utils

    mine = np.stack([np.frombuffer(hashlib.sha256(v.encode()).digest()[:16], np.int32) for v in parts.values()])
    everyone = np.asarray(multihost_utils.process_allgather(mine))  # [processes, parts, 4]
    differs = (everyone != everyone[:1]).any(axis=-1)  # [processes, parts]
    if differs.any():
        which = [name for name, bad in zip(parts, differs.any(axis=0)) if bad]
        processes = [int(p) for p in np.flatnonzero(differs.any(axis=1))]
        listed = ", ".join(map(str, processes))
        named = f"processes {listed} differ" if len(processes) > 1 else f"process {listed} differs"
        raise DistributedError(
            f"{named} from process 0 in their {' and '.join(which)}: launch every process with the same command and "
            "the same data files"
        )


def barrier(name: str) -> None:
    """Waits until every process reaches the barrier ``name``."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"capsjax:{name}")


def lock_workdir(lock):
    """Process 0 takes the work directory's lock; every process raises if it could not."""
    error = None
    if jax.process_index() == 0:
        try:
            lock.acquire()
        except Exception as err:  # WorkdirBusy, or an unwritable workdir
            error = err
    if not all_processes(error is None):
        lock.release()
        if error is not None:
            raise error
        from capsjax.workdir import WorkdirBusy

        raise WorkdirBusy(f"{lock.path.parent} is in use by another run (see process 0's message)")
    return lock


def check_shared(workdir: Path, timeout: float | None = None) -> None:
    """In a multi-process run, checks that every process sees the work directory process 0 writes to (checkpoints and
    the lock live there): process 0 writes a marker file that the others must see within ``timeout`` seconds."""
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    token = int(multihost_utils.broadcast_one_to_all(np.int32(secrets.randbits(31))))
    marker = Path(workdir) / f".shared-check-{token}"
    if jax.process_index() == 0:
        marker.write_text(str(token))
    deadline = time.monotonic() + (SHARED_TIMEOUT_S if timeout is None else timeout)

    def listed() -> bool:  # a listing re-reads the folder, where NFS may cache "no such file" for a lookup by name
        try:
            return marker.name in os.listdir(marker.parent)
        except OSError:
            return False

    seen = listed()
    while not seen and time.monotonic() < deadline:
        time.sleep(0.2)
        seen = listed()
    everyone = all_processes(seen)
    if jax.process_index() == 0:
        marker.unlink(missing_ok=True)
    if not everyone:
        raise DistributedError(
            f"the work directory {workdir} is not shared between the processes (process {jax.process_index()} "
            f"{'sees' if seen else 'does not see'} the file process 0 wrote there): put it on a filesystem that "
            "every host mounts"
        )


class StopSignal:
    """When to stop early. One process: ``should_stop()`` (the CLI sets it on SIGTERM / SIGINT). Several processes:
    JAX's preemption sync point, reached at the same step on every process after any of them gets SIGTERM (the CLI
    turns SIGINT into SIGTERM there)."""

    def __init__(self, should_stop: Callable[[], bool] | None = None):
        self.should_stop = should_stop
        self.multi = jax.process_count() > 1
        self.calls = 0  # steps of this launch: the sync point's step ids

    def at_step(self, step: int) -> bool:
        """Called after every training step (``step``: the run's step count, which the processes share)."""
        if self.multi:
            from jax.experimental import multihost_utils

            # JAX's ids must count from this launch's first call, not the run's step: a notice before the first call
            # (while the data load or the compiler runs) puts the sync point at id 1, which a resumed run's step
            # count would have passed already, and the run would never stop.
            self.calls += 1
            return multihost_utils.reached_preemption_sync_point(self.calls)
        return self.now()

    def now(self) -> bool:
        """Between evaluation batches: single-process runs stop at once (multi-process ones at the next step)."""
        return bool(not self.multi and self.should_stop is not None and self.should_stop())


PEER_TIMEOUT_S = float(os.environ.get("CAPSJAX_PEER_TIMEOUT_S", 30))  # silence after which a peer counts as dead
_RESUME_HINT = "rerun every process with the same command to resume from the last checkpoint"


def _die(prog: str, message: str) -> None:
    os.write(_NativeStderr.real_fd or 2, f"{prog}: error: {message}\n".encode())
    from capsjax.workdir import WorkdirLock

    WorkdirLock.release_all()  # os._exit skips the finally that would: a relaunch on another host would find it locked
    os._exit(1)


class PeerWatch(threading.Thread):
    """Every process bumps a counter in the coordination service's key-value store every second and watches the
    others'. A peer whose counter stops for :data:`PEER_TIMEOUT_S` (it died, or hangs) ends this process with one
    line, well before the runtime's own heartbeat timeout would abort it with a stack dump. A peer that finished
    normally marks itself done first."""

    def __init__(self, prog: str, timeout: float = PEER_TIMEOUT_S):
        super().__init__(daemon=True, name="capsjax-peer-watch")
        from jax._src import distributed as jax_distributed

        self.client = jax_distributed.global_state.client
        self.prog, self.timeout = prog, timeout
        self.me, self.count = jax.process_index(), jax.process_count()
        self.finished = False
        atexit.register(self._done)

    def _done(self) -> None:
        self.finished = True
        try:
            self.client.key_value_set(f"capsjax/done/{self.me}", "1", allow_overwrite=True)
        except Exception:
            pass

    def _get(self, key: str) -> str | None:
        try:
            return self.client.key_value_try_get(key)
        except Exception as err:
            if "NOT_FOUND" in str(err):
                return None
            raise

    def run(self) -> None:
        beat, seen = 0, {}
        while not self.finished:
            beat += 1
            try:
                self.client.key_value_set(f"capsjax/beat/{self.me}", str(beat), allow_overwrite=True)
                now = time.monotonic()
                for peer in range(self.count):
                    if peer == self.me or self._get(f"capsjax/done/{peer}"):
                        continue
                    value = self._get(f"capsjax/beat/{peer}")
                    if peer not in seen or seen[peer][0] != value:
                        seen[peer] = (value, now)
                    elif now - seen[peer][1] > self.timeout:
                        _die(self.prog, f"process {peer} stopped responding ({self.timeout:.0f} s without a "
                                        f"heartbeat); stopping process {self.me} too: {_RESUME_HINT}")  # fmt: skip
            except Exception:
                if self.finished:
                    return
                _die(self.prog, f"lost the coordinator (process 0); stopping process {self.me}: {_RESUME_HINT}")
            time.sleep(1.0)


class _NativeStderr(threading.Thread):
    """Passes stderr through a pipe, dropping the native runtime's log lines (absl/glog ``E1126 ...``, gloo's
    ``[Gloo] ...``, stack dumps); when the runtime says it will abort because a peer died, prints one line and exits
    first."""

    real_fd: int | None = None
    NOISE = re.compile(r"^([EWIF]\d{4} \d\d:\d\d:\d\d|\[Gloo\]|\*\*\* |\s+@ |RPC: |The tasks have crashed|\d+$)")
    FATAL = ("Terminating process because the JAX distributed service", "Polled an error from coordination service")

    def __init__(self, prog: str):
        super().__init__(daemon=True, name="capsjax-stderr")
        self.prog = prog

    def start(self) -> None:
        if _NativeStderr.real_fd is not None:
            return
        sys.stderr.flush()
        read, write = os.pipe()
        _NativeStderr.real_fd = os.dup(2)
        os.dup2(write, 2)
        os.close(write)
        self.pipe = os.fdopen(read, "rb", buffering=0)
        atexit.register(self._drain)
        super().start()

    def run(self) -> None:
        buffer = b""
        while chunk := self.pipe.read(65536):
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                text = line.decode(errors="replace")
                if any(marker in text for marker in self.FATAL):
                    _die(self.prog, f"another process of this run died or lost its connection; stopping process "
                                    f"{jax.process_index()}: {_RESUME_HINT}")  # fmt: skip
                if not self.NOISE.match(text):
                    os.write(_NativeStderr.real_fd, line + b"\n")

    def _drain(self) -> None:
        """At exit: let the thread pass on what is in the pipe. The filter stays in place for JAX's shutdown, which
        runs after this and aborts if a peer failed."""
        sys.stderr.flush()
        time.sleep(0.1)
