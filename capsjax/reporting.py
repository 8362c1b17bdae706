"""What a training run shows while it runs: a progress bar or plain log lines, and TensorBoard event files.

Only process 0 reports. TensorBoard files are written with ``tensorboardX`` (pure Python over ``protobuf``, which
Orbax already needs; no TensorFlow), into ``<workdir>/tensorboard/``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


class Console:
    """tqdm on a terminal or in a Jupyter kernel; without one (a pipe, ``nohup``, a scheduler's log), a plain line per
    logged window: step, epoch, loss, images per second and the time left."""

    def __init__(self, enabled: bool, total_steps: int, initial_step: int, steps_per_epoch: int):
        self.total, self.steps_per_epoch = total_steps, steps_per_epoch
        self.active = jax.process_index() == 0
        self.bar = None
        interactive = sys.stderr.isatty() or "ipykernel" in sys.modules
        if enabled and interactive and self.active:
            try:  # a widget in notebooks that have ipywidgets, text otherwise
                import ipywidgets  # noqa: F401
                from tqdm.auto import tqdm
            except ImportError:
                from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True, smoothing=0.1)

    def step(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def window(self, step: int, mean: dict[str, float]) -> None:
        """Reports the mean metrics of the steps up to ``step``."""
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{mean['loss']:.4f}", img_s=f"{mean['images_per_s']:.0f}", refresh=False)
            return
        rate = mean.get("steps_per_s", 0.0)
        eta = _duration((self.total - step) / rate) if rate > 0 else "?"
        self.write(
            f"step {step}/{self.total} (epoch {step / self.steps_per_epoch:.2f}): loss {mean['loss']:.4f}, "
            f"{mean['images_per_s']:.0f} img/s, ETA {eta}"
        )

    def write(self, message: str) -> None:
        if not self.active:
            return
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class TensorBoard:
    """Scalars of every ``metrics.jsonl`` record (tagged ``<split>/<name>``) and images, in ``<workdir>/tensorboard``.

    A resumed run starts a new event file with ``purge_step`` at the restored step, so TensorBoard drops what the
    interrupted run had logged after it (as ``metrics.jsonl`` does).
    """

    def __init__(self, workdir: Path, enabled: bool, purge_step: int | None):
        self.writer = None
        if enabled and jax.process_index() == 0:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(str(Path(workdir) / "tensorboard"), purge_step=purge_step or None)

    def record(self, record: dict[str, Any]) -> None:
        if self.writer is None:
            return
        split, step = record.get("split", "train"), int(record["step"])
        for name, value in record.items():
            if name not in ("split", "step") and isinstance(value, (int, float)):
                self.writer.add_scalar(f"{split}/{name}", float(value), step)

    def images(self, tag: str, images: np.ndarray, step: int) -> None:
        """``images`` [N, H, W, C] in [0, 1]: one grid, the N images side by side."""
        if self.writer is None:
            return
        self.writer.add_image(tag, np.concatenate(list(np.clip(images, 0, 1)), axis=1), step, dataformats="HWC")

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class Window:
    """The step metrics dispatched since the last report, fetched together (one device-to-host copy per window)."""

    def __init__(self, batch_size: int):
        self.batch_size = batch_size
        self.pending: list[dict[str, jax.Array]] = []
        self.started = time.perf_counter()

    def add(self, metrics: dict[str, jax.Array]) -> None:
        self.pending.append(metrics)

    def take(self) -> list[dict[str, float]]:
        """The window's metrics as floats, oldest first; starts a new window."""
        fetched = [{k: float(v) for k, v in m.items()} for m in jax.device_get(self.pending)]
        self.pending = []
        return fetched

    def rates(self, steps: int) -> dict[str, float]:
        now = time.perf_counter()
        elapsed, self.started = now - self.started, now
        rate = steps / elapsed if elapsed > 0 else 0.0
        return {"images_per_s": rate * self.batch_size, "steps_per_s": rate}
