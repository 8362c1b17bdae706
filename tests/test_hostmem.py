"""capsjax.fast.hostmem: importing capsjax leaves JAX's backend alone; the restart with huge pages and what it changes;
giving freed heap memory back after compiles."""

import os
import subprocess
import sys
import textwrap

import pytest

from capsjax.fast import hostmem

APPLIES = hostmem.huge_pages_env({}) is not None  # Linux, glibc >= 2.35, THP on, no accelerator plugin


def run_python(code: str, env=None, args=()) -> str:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        check=True,
        env=env if env is not None else dict(os.environ),
        timeout=300,
    )
    return result.stdout.strip().splitlines()[-1]


def test_import_does_not_start_the_jax_backend():
    # Settings such as jax.distributed.initialize() must come before the backend starts.
    code = """
        import capsjax, capsjax.cli, capsjax.steps, capsjax.train
        from jax._src import xla_bridge
        print(bool(xla_bridge._backends))
    """
    assert run_python(code) == "False"


def test_huge_pages_env_extends_tunables_and_respects_opt_outs():
    if not APPLIES:
        assert hostmem.huge_pages_env({}) is None
        return
    assert hostmem.huge_pages_env({})["GLIBC_TUNABLES"] == hostmem.TUNABLE
    env = hostmem.huge_pages_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=4"})
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=4:" + hostmem.TUNABLE
    assert hostmem.huge_pages_env({"GLIBC_TUNABLES": hostmem.TUNABLE}) is None  # already set: no restart loop
    assert hostmem.huge_pages_env({"CAPSJAX_HUGE_PAGES": "0"}) is None
    assert hostmem.huge_pages_env({"JAX_PLATFORMS": "cuda"}) is None


@pytest.mark.skipif(not APPLIES, reason="huge pages do not apply on this machine")
def test_reexec_restarts_once_with_the_tunable_and_the_same_arguments():
    code = """
        import os, sys
        from capsjax.fast.hostmem import reexec_with_huge_pages
        reexec_with_huge_pages()
        print(os.environ.get("GLIBC_TUNABLES"), sys.argv[1:])
    """
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "CAPSJAX_HUGE_PAGES")}
    assert run_python(code, env, ("a", "--b")) == f"{hostmem.TUNABLE} ['a', '--b']"
    assert run_python(code, {**env, "CAPSJAX_HUGE_PAGES": "0"}, ("a",)) == "None ['a']"


FAULTS = """
    import ctypes, resource
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
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not APPLIES, reason="huge pages do not apply on this machine")
def test_the_tunable_cuts_page_faults_of_a_large_block():
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    plain = int(run_python(FAULTS, env))
    huge = int(run_python(FAULTS, {**env, "GLIBC_TUNABLES": hostmem.TUNABLE}))
    assert plain > 256 * 2**20 // 4096 // 2  # glibc maps the block afresh each time: one fault per 4 KB page
    assert huge < plain // 20


GLIBC = hostmem._malloc_trim() is not None


@pytest.mark.skipif(not GLIBC, reason="malloc_trim is glibc's")
def test_release_freed_memory_returns_free_heap_pages():
    # 200 MB of heap blocks (below glibc's mmap threshold) freed under a block that stays: glibc keeps those pages
    # until malloc_trim hands them back.
    code = """
        import sys
        from capsjax.fast import hostmem

        def rss_mb():
            return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) / 1024

        blocks = [b"x" * 100_000 for _ in range(2000)]
        keep = b"y" * 100_000
        del blocks
        before = rss_mb()
        assert hostmem.release_freed_memory()
        print(before - rss_mb())
    """
    assert float(run_python(code)) > 150


@pytest.mark.skipif(not GLIBC, reason="malloc_trim is glibc's")
def test_trim_after_compiles_releases_after_each_compilation():
    code = """
        import jax, jax.numpy as jnp
        from capsjax.fast import hostmem

        calls = []
        hostmem.release_freed_memory = lambda: calls.append(1) or True
        hostmem.trim_after_compiles()
        hostmem.trim_after_compiles()  # registers once
        jax.jit(lambda x: x + 1)(jnp.ones(3))
        after_first = len(calls)
        jax.jit(lambda x: x + 1)(jnp.ones(3))  # a new function: one more compilation
        jax.jit(lambda x: x * 2).lower(jnp.ones(4)).compile()
        print(after_first, len(calls))
    """
    first, total = map(int, run_python(code).split())
    assert first >= 1 and total >= first + 2
