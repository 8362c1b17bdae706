"""Host memory for XLA on CPU: transparent huge pages for the per-step scratch memory, and giving the compiler's
freed memory back.

XLA's CPU runtime allocates each step's scratch memory (about 0.5 GB for the default CapsNet at batch 100) with
``malloc``; glibc maps a block that large afresh and unmaps it again at every step, so the kernel faults in and zeroes
every 4 KB page of it at every step: on a 2-core machine 130,000 page faults and 0.24 s of kernel CPU time per ~0.95 s
training step (by ``getrusage``). With glibc's ``glibc.malloc.hugetlb=1`` tunable those blocks get transparent huge
pages, 2 MB each: under a thousand faults per step, and the memory is still returned after each step (same peak
memory). On that machine the default train step at batch 100 went from 104-108 to 115-119 img/s and inference from
257-286 to 319-342 img/s (``benchmarks/throughput.py`` with and without the tunable).

glibc reads its tunables only when a process starts, so :func:`reexec_with_huge_pages` starts the program again
with ``GLIBC_TUNABLES`` extended. ``capsjax-train`` / ``train.py``, ``capsjax-eval`` / ``eval.py`` and
``benchmarks/throughput.py`` do that first thing; calling :func:`capsjax.cli.train_main` from Python does not. It
applies only on Linux with glibc 2.35 or newer, transparent huge pages set to ``always`` or ``madvise``, and no GPU or
TPU plugin installed (where the step runs on the accelerator); ``CAPSJAX_HUGE_PAGES=0`` turns it off.

Compiling the train step takes about 300 MB of heap that XLA frees when done, but glibc keeps freed heap memory for
reuse, and the step's scratch block is too large to be carved from it, so a process would hold both.
:func:`trim_after_compiles` hands that memory back to the system after every XLA compilation (``malloc_trim``): the
peak memory of the default train step at batch 100 drops from 930–1010 to about 725 MiB
(``benchmarks/throughput.py --mode train`` with and without ``--no-heap-trim``). The training loop and the
CLIs call it; it is a no-op where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import importlib.util
import os
import platform
import sys
from pathlib import Path

TUNABLE = "glibc.malloc.hugetlb=1"
_THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")
_ACCELERATOR_MODULES = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "libtpu")


def _accelerator_installed(environ) -> bool:
    platforms = environ.get("JAX_PLATFORMS", "")
    if platforms:
        return platforms.split(",")[0].strip() not in ("", "cpu")
    return any(importlib.util.find_spec(name) is not None for name in _ACCELERATOR_MODULES)


def _glibc_version() -> tuple[int, int] | None:
    """(major, minor) of the C library on Linux where it is glibc, else None."""
    libc, version = platform.libc_ver()
    if platform.system() != "Linux" or libc != "glibc":
        return None
    try:
        major, minor = (int(part) for part in version.split(".")[:2])
    except ValueError:
        return None
    return major, minor


def _thp_available() -> bool:
    try:
        mode = _THP_MODE.read_text()
    except OSError:
        return False
    return "[always]" in mode or "[madvise]" in mode


def huge_pages_env(environ=None) -> dict[str, str] | None:
    """The environment to restart with (``GLIBC_TUNABLES`` plus :data:`TUNABLE`), or None where it does not apply or is
    already set."""
    environ = dict(os.environ if environ is None else environ)
    tunables = environ.get("GLIBC_TUNABLES", "")
    if (
        environ.get("CAPSJAX_HUGE_PAGES", "1") == "0"
        or "glibc.malloc.hugetlb" in tunables
        or (_glibc_version() or (0, 0)) < (2, 35)
        or not _thp_available()
        or _accelerator_installed(environ)
    ):
        return None
    environ["GLIBC_TUNABLES"] = f"{tunables}:{TUNABLE}" if tunables else TUNABLE
    return environ


def reexec_with_huge_pages() -> None:
    """Restarts this program (same interpreter, same arguments) with :data:`TUNABLE` set, where it applies; returns
    only where it does not. Call it first thing in a program's entry point, before any work."""
    environ = huge_pages_env()
    if environ is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environ)


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or None where the C library is not glibc."""
    if _glibc_version() is None:
        return None
    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_freed_memory() -> bool:
    """Gives the free pages of the C heap back to the system (``malloc_trim(0)``); True where that ran (glibc)."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_listening = False


def _release_after_compile(event: str, duration_secs: float, **kwargs) -> None:
    del duration_secs, kwargs
    if event == _COMPILE_EVENT:
        release_freed_memory()


def trim_after_compiles() -> None:
    """From now on, calls :func:`release_freed_memory` after every XLA compilation in this process (once registered,
    further calls do nothing)."""
    global _listening
    if _listening or _malloc_trim() is None:
        return
    import jax.monitoring

    jax.monitoring.register_event_duration_secs_listener(_release_after_compile)
    _listening = True
