"""Throughput (tokens, images or samples per second) and peak memory, logged every training step."""

from __future__ import annotations

import resource
import sys
import time

import lightning as L
import torch

__all__ = ["Throughput", "peak_memory_mb"]


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated on ``device``, or the process's peak resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**20 if sys.platform == "darwin" else 2**10)


UNITS = ("tokens", "images", "samples")


class Throughput(L.Callback):
    """Logs ``perf/{unit}_per_s`` (tokens: the first input's numel; images, samples: its batch size) and ``perf/peak_mem_mb``.

    ``unit=None`` takes the task's ``throughput_unit`` (``samples`` if it has none). The clock runs
    from batch start to batch end: forward, backward and optimizer step.
    """

    def __init__(self, unit: str | None = None) -> None:
        if unit is not None and unit not in UNITS:
            raise ValueError(f"unit must be one of {', '.join(UNITS)}, got {unit!r}")
        self.unit = unit
        self._start = 0.0

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.unit is None:
            self.unit = getattr(pl_module, "throughput_unit", "samples")
            if self.unit not in UNITS:
                raise ValueError(
                    f"{type(pl_module).__name__}.throughput_unit must be one of {', '.join(UNITS)}, got {self.unit!r}"
                )

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        seconds = time.perf_counter() - self._start
        first = batch[0] if isinstance(batch, (tuple, list)) else batch
        count = first.numel() if self.unit == "tokens" else first.shape[0]
        pl_module.log(f"perf/{self.unit}_per_s", count / max(seconds, 1e-9))
        pl_module.log("perf/peak_mem_mb", peak_memory_mb(pl_module.device))
