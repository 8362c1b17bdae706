"""Test set-up: four simulated CPU devices and strict NumPy semantics, fixed before JAX starts its backend; the real
MNIST folder as a fixture.

The device count is JAX's ``jax_num_cpu_devices`` option, set through its environment variable so that the CLIs the
tests start as subprocesses see the same four devices.
"""

import os
import zlib
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

os.environ.setdefault("JAX_NUM_CPU_DEVICES", "4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# A compilation cache shared by the test processes and the CLIs they start: most of a subprocess test's time is XLA
# compiling the same small programs again (a kill-and-resume test went from 247 s to 81 s with it, starting empty).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(ROOT / ".pytest_cache" / "jax-compilation-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
# XLA's CPU backend without LLVM optimisation for the tests' own programs: they are small and most run a few times, so
# compiling is most of their time (a sharded-step test: 34 s -> 13 s, the fast group 9 min -> 5.6 min on 2 cores). The
# tests that train on real data, and the benchmark scripts, run in subprocesses with it back on (``optimized_env``).
UNOPTIMIZED = "--xla_backend_optimization_level=0"
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {UNOPTIMIZED}".strip()

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", int(os.environ["JAX_NUM_CPU_DEVICES"]))
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")

MNIST_DIR = Path(os.environ.get("CAPSJAX_MNIST_DIR", ROOT.parent / "shared" / "data" / "mnist"))


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    """The real MNIST IDX folder (``../shared/data/mnist`` beside the checkout, or ``$CAPSJAX_MNIST_DIR``)."""
    if not any(MNIST_DIR.glob("train-images-idx3-ubyte*")):
        pytest.skip(f"MNIST IDX files not found in {MNIST_DIR} (set CAPSJAX_MNIST_DIR)")
    return MNIST_DIR


@pytest.fixture
def optimized_env() -> dict[str, str]:
    """This process's environment for a subprocess that should run XLA's optimised CPU code (real training)."""
    env = dict(os.environ)
    flags = env.get("XLA_FLAGS", "").replace(UNOPTIMIZED, "").strip()
    if flags:
        env["XLA_FLAGS"] = flags
    else:
        env.pop("XLA_FLAGS", None)
    return env


@pytest.fixture(autouse=True)
def _order_independent_rng(request):
    """A test module's ``RNG`` restarts from a seed of the test's own id, so each test draws the same inputs whatever
    ran before it (pytest-xdist workers run the tests in another order than one process does)."""
    module = request.module
    if isinstance(getattr(module, "RNG", None), np.random.Generator):
        module.RNG = np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))
