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

os.environ.setdefault("JAX_NUM_CPU_DEVICES", "4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", int(os.environ["JAX_NUM_CPU_DEVICES"]))
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")

ROOT = Path(__file__).resolve().parents[1]
MNIST_DIR = Path(os.environ.get("CAPSJAX_MNIST_DIR", ROOT.parent / "shared" / "data" / "mnist"))


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    """The real MNIST IDX folder (``../shared/data/mnist`` beside the checkout, or ``$CAPSJAX_MNIST_DIR``)."""
    if not any(MNIST_DIR.glob("train-images-idx3-ubyte*")):
        pytest.skip(f"MNIST IDX files not found in {MNIST_DIR} (set CAPSJAX_MNIST_DIR)")
    return MNIST_DIR


@pytest.fixture(autouse=True)
def _order_independent_rng(request):
    """A test module's ``RNG`` restarts from a seed of the test's own id, so each test draws the same inputs whatever
    ran before it (pytest-xdist workers run the tests in another order than one process does)."""
    module = request.module
    if isinstance(getattr(module, "RNG", None), np.random.Generator):
        module.RNG = np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))
