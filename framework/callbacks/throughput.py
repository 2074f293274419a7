"""Throughput (tokens, images or samples per second) and peak memory: Lightning's ``ThroughputMonitor``.

Lightning measures (its ``Throughput`` over a window of optimizer steps, validation time excluded,
CUDA synchronised); lowbit names the rate in the task's unit and logs it through the task, so it
reaches every logger, the CSV and ``trainer.callback_metrics`` at each optimizer step.
"""

from __future__ import annotations

import resource
import sys
from typing import Any

import torch
from lightning.pytorch.callbacks import ThroughputMonitor
from lightning.pytorch.trainer.states import RunningStage

__all__ = ["Throughput", "UNITS", "peak_memory_mb"]

UNITS = ("tokens", "images", "samples")


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated on ``device``, or the process's peak resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**20 if sys.platform == "darwin" else 2**10)


def _first(batch: Any) -> torch.Tensor:
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def batch_size(batch: Any) -> int:
    """Samples in a batch: the first input's leading dimension."""
    return int(_first(batch).shape[0])


def batch_tokens(batch: Any) -> int:
    """Tokens in a batch of token ids: the first input's element count (B · T)."""
    return int(_first(batch).numel())


class Throughput(ThroughputMonitor):
    """Logs ``perf/{unit}_per_s`` and ``perf/peak_mem_mb`` (and ``perf/mfu`` when the task sets
    ``flops_per_batch``) after every optimizer step, once ``window_size`` steps are timed.

    ``unit=None`` takes the task's ``throughput_unit`` (``samples`` if it has none): ``tokens`` counts the
    first input's elements (Lightning's ``length_fn``), ``images`` and ``samples`` its batch size. The rate is
    over the last ``window_size`` batches, across ranks (Lightning's ``samples_per_sec``/``items_per_sec``).
    """

    def __init__(self, unit: str | None = None, window_size: int = 10) -> None:
        if unit is not None and unit not in UNITS:
            raise ValueError(f"unit must be one of {', '.join(UNITS)}, got {unit!r}")
        super().__init__(batch_size_fn=batch_size, length_fn=batch_tokens, window_size=window_size)
        self.unit = unit

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.unit is None:
            self.unit = getattr(pl_module, "throughput_unit", "samples")
            if self.unit not in UNITS:
                raise ValueError(
                    f"{type(pl_module).__name__}.throughput_unit must be one of {', '.join(UNITS)}, got {self.unit!r}"
                )
        super().setup(trainer, pl_module, stage)

    def _compute(self, trainer, iter_num: int | None = None) -> None:
        """Lightning logs here every metric of its window under the stage's name; lowbit logs the rate in
        its unit, training only (validation batches count towards excluding validation time, nothing more)."""
        stage = trainer.state.stage
        if stage != RunningStage.TRAINING:
            return
        metrics = self._throughputs[stage].compute()
        world = "" if trainer.world_size > 1 else "device/"  # all ranks together
        rate = metrics.get(f"{world}items_per_sec" if self.unit == "tokens" else f"{world}samples_per_sec")
        module = trainer.lightning_module
        if rate is not None:
            module.log(f"perf/{self.unit}_per_s", float(rate))
        if "device/mfu" in metrics:
            module.log("perf/mfu", float(metrics["device/mfu"]))
        module.log("perf/peak_mem_mb", peak_memory_mb(module.device))
