"""Host allocator settings for XLA's CPU backend.

XLA's CPU runtime allocates each step's scratch memory (about 0.5 GB for the default CapsNet at batch 100) with
``malloc`` from its worker threads. With glibc's defaults a block that large is ``mmap``-ed and unmapped again at
every step, so each step faults in and zeroes every page afresh (on a 2-core machine: 130,000 page faults and 0.24 s
of kernel CPU time per ~0.95 s training step, by ``getrusage``). :func:`tune_malloc_for_xla_cpu` makes glibc keep freed memory for reuse instead:
one malloc arena, no ``mmap`` for large blocks, no trimming of the heap. The page faults are gone, but the heap
fragments: the process holds on to its peak memory and more (the default train step at batch 100 on a 2-core
machine: 105 -> 120 img/s, peak resident memory 1.2 -> 2-3 GB). Hence it is opt-in: ``--tune-malloc`` on
``capsjax-train`` / ``train.py``, ``capsjax-eval`` / ``eval.py`` and ``benchmarks/throughput.py``. Preloading
tcmalloc (``LD_PRELOAD=libtcmalloc_minimal.so.4``, Debian's ``libtcmalloc-minimal4``) has the same effect at a
smaller memory cost.

It must run before JAX creates its CPU client (the first ``jax.devices()`` or computation; importing capsjax does
not), since threads that already allocated keep their arena. It does nothing off glibc (macOS, musl) and when a GPU
or TPU plugin is installed, where the step runs on the accelerator.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import os

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_ACCELERATOR_MODULES = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "libtpu")


def _accelerator_installed() -> bool:
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms:
        return platforms.split(",")[0].strip() not in ("", "cpu")
    return any(importlib.util.find_spec(name) is not None for name in _ACCELERATOR_MODULES)


def tune_malloc_for_xla_cpu() -> bool:
    """Sets glibc's allocator to reuse freed memory (see the module docstring); returns whether it did."""
    if _accelerator_installed():
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1))
    return all(mallopt(param, value) == 1 for param, value in settings)
