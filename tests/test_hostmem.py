"""capsjax.hostmem: importing capsjax leaves JAX's backend alone, and the allocator settings take effect."""

import platform
import subprocess
import sys
import textwrap

import pytest


def run_python(code: str, **env) -> str:
    import os

    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, **env},
        timeout=300,
    )
    return result.stdout.strip().splitlines()[-1]


def test_import_does_not_start_the_jax_backend():
    # Settings such as jax.distributed.initialize() or the allocator's must come before the backend starts.
    code = """
        import capsjax, capsjax.cli, capsjax.steps, capsjax.train
        from jax._src import xla_bridge
        print(bool(xla_bridge._backends))
    """
    assert run_python(code) == "False"


REUSE = """
    import ctypes, resource
    from capsjax.hostmem import tune_malloc_for_xla_cpu
    tuned = tune_malloc_for_xla_cpu() if {tune} else False
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = (ctypes.c_void_p,)
    size = 256 * 2**20
    def touch():
        p = libc.malloc(size)
        ctypes.memset(p, 1, size)
        libc.free(p)
    touch()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    touch()
    print(tuned, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_tuned_allocator_reuses_freed_memory_without_page_faults():
    tuned, faults = run_python(REUSE.format(tune=True)).split()
    assert tuned == "True" and int(faults) < 1000
    tuned, faults = run_python(REUSE.format(tune=False)).split()
    assert tuned == "False" and int(faults) > 256 * 2**20 // 4096 // 2  # glibc's default: mmap, unmap, fault again


def test_tuning_is_skipped_when_an_accelerator_is_the_backend():
    code = "from capsjax.hostmem import tune_malloc_for_xla_cpu; print(tune_malloc_for_xla_cpu())"
    assert run_python(code, JAX_PLATFORMS="cuda") == "False"
