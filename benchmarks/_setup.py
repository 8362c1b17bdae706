"""The set-up the benchmark scripts share: a data mesh, the state and compiled steps of a model, a random batch.

The scripts run as ``python benchmarks/<name>.py``, which puts this folder on ``sys.path``; they import this module
after parsing their flags, so ``--help`` does not wait for JAX.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Any

import jax
import numpy as np

from capsjax.config import ModelConfig, OptimConfig
from capsjax.steps import Steps, default_mesh, init_state, make_steps


def build(
    model_config: ModelConfig = ModelConfig(), *, devices: int | None = None, max_shift: int = 2, seed: int = 0
) -> tuple[Steps, Any]:
    """The compiled steps (default optimizer, random shifts of up to ``max_shift`` pixels) and the initial state of
    ``model_config`` on a ``data`` mesh of the first ``devices`` devices (None: every device)."""
    mesh = default_mesh()
    if devices is not None:
        chosen = jax.devices()[:devices]
        mesh = jax.make_mesh((len(chosen),), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=chosen)
    graphdef, state = init_state(model_config, OptimConfig(), seed=seed, mesh=mesh)
    return make_steps(graphdef, OptimConfig(), max_shift=max_shift, mesh=mesh), state


def random_batch(
    steps: Steps, batch_size: int, model_config: ModelConfig = ModelConfig(), seed: int = 0
) -> tuple[jax.Array, jax.Array]:
    """Random uint8 images ``[batch_size, *image_shape]`` and int32 labels, sharded over ``steps``' mesh."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (batch_size, *model_config.image_shape), dtype=np.uint8)
    labels = rng.integers(0, model_config.num_classes, batch_size).astype(np.int32)
    return jax.device_put(images, steps.data_sharding), jax.device_put(labels, steps.data_sharding)


def median_seconds(fn, *args, repeats: int) -> float:
    """The median wall time of ``repeats`` calls of ``fn(*args)`` (each waited for), after one untimed call that
    compiles it."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


_CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile", "avx_vnni")


def machine() -> dict[str, Any]:
    """What the figures were measured on: the CPU model (``lscpu``'s model name), its vector and bfloat16 flags
    (those of :data:`_CPU_FLAGS` it has), the core count, and JAX's backend and device kind."""
    from capsjax.results import cpu_flags, cpu_model

    flags = cpu_flags()
    return {
        "cpu_model": cpu_model(),
        "cpu_flags": [flag for flag in _CPU_FLAGS if flag in flags],
        "cpu_count": os.cpu_count(),
        "backend": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind,
        "jax": jax.__version__,
    }
