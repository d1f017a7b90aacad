"""Training progress: a log line per interval (step, loss, lr, images/s, ETA), TensorBoard scalars and pictures."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import jax
import numpy as np

from ccnet_jax.durations import format_duration


class Progress:
    """Prints on process 0 only; TensorBoard events go to `logdir` if given."""

    def __init__(self, total_steps: int, batch_size: int, first_step: int, logdir: str | Path | None):
        self.total = total_steps
        self.batch_size = batch_size
        self.main = jax.process_index() == 0
        self.mark_step, self.mark_time = first_step, time.perf_counter()
        self.writer = None
        if self.main and logdir is not None:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(str(logdir))

    def restart_clock(self, step: int) -> None:
        """Rates count from here: called after compilation, evaluation and checkpointing, which
        are not training throughput."""
        self.mark_step, self.mark_time = step, time.perf_counter()

    def log(self, step: int, scalars: dict[str, float]) -> None:
        """One line for `step` with rates since the previous call; scalars also to TensorBoard."""
        now = time.perf_counter()
        steps = step - self.mark_step
        rate = steps / (now - self.mark_time) if steps > 0 else 0.0
        self.mark_step, self.mark_time = step, now
        if rate > 0:
            self.scalars(step, {"images_per_second": rate * self.batch_size}, prefix="perf/")
        self.scalars(step, scalars)
        if not self.main:
            return
        eta = (self.total - step) / rate if rate > 0 else float("nan")
        width = len(str(self.total))
        shown = "  ".join(f"{k} {v:.4f}" if k != "lr" else f"lr {v:.2e}" for k, v in scalars.items())
        eta_text = format_duration(eta) if eta == eta else "?"
        speed = f"{rate * self.batch_size:.1f}" if rate > 0 else "?"  # no step timed yet (the first one compiles)
        print(f"step {step:>{width}}/{self.total}  {shown}  {speed} img/s  ETA {eta_text}", flush=True)

    def scalars(self, step: int, scalars: dict[str, float], prefix: str = "train/") -> None:
        if self.writer is not None:
            for key, value in scalars.items():
                self.writer.add_scalar(prefix + key, value, step)
            self.writer.flush()

    def images(self, step: int, pictures: dict[str, np.ndarray]) -> None:
        """uint8 (H, W, 3) pictures to TensorBoard under their names."""
        if self.writer is not None:
            for name, picture in pictures.items():
                self.writer.add_image(name, picture, step, dataformats="HWC")
            self.writer.flush()

    def note(self, text: str) -> None:
        if self.main:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
