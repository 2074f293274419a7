"""Learning-rate schedules: timm ``Scheduler``s, stepped once per optimizer step.

A schedule is a ``lowbit.schedulers`` plugin: a class or function ``(optimizer, max_steps, **options)``
returning a ``timm.scheduler.Scheduler``. Built in, all with the same linear warmup (optimizer step
k < W runs at lr · (k + 1)/W, so no step is spent at lr 0):

- ``constant``: lr after the warmup;
- ``cosine``: cosine decay from lr to ``min_lr_ratio`` · lr at ``max_steps`` (GPT-3, nanoGPT);
- ``wsd``: warmup-stable-decay (MiniCPM, Hu et al. 2024; Hägele et al. 2024): lr until the last
  ``decay_fraction`` of the run, then timm's ``WSDLRScheduler`` decay (``1-sqrt`` by default) to
  ``min_lr_ratio`` · lr.

A task steps a timm scheduler with the optimizer-step count (``step_update(global_step)``), which
makes the schedule a pure function of the step: a resumed run continues it exactly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from timm.scheduler import WSDLRScheduler
from timm.scheduler.scheduler import Scheduler

from lowbit.errors import LowbitError

__all__ = [
    "WarmupConstant",
    "WarmupCosine",
    "WarmupStableDecay",
    "build_scheduler",
    "step_scheduler",
    "warmup_cosine",
]


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.1) -> float:
    """LR multiplier at ``step``: (step+1)/warmup during warmup, then cosine from 1 to ``min_lr_ratio``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _check(warmup_steps: int, min_lr_ratio: float = 0.0) -> None:
    if warmup_steps < 0:
        raise LowbitError(f"scheduler.warmup_steps must be >= 0, got {warmup_steps}")
    if not 0 <= min_lr_ratio <= 1:
        raise LowbitError(f"scheduler.min_lr_ratio must be in [0, 1], got {min_lr_ratio}")


class WarmupCosine(Scheduler):
    """Linear warmup, then cosine decay to ``min_lr_ratio`` · lr at ``max_steps`` (held after).

    lr(k) = lr · ``warmup_cosine(k, warmup_steps, max_steps, min_lr_ratio)``. timm's ``CosineLRScheduler``
    differs in the warmup only: it runs step k < W at lr · k/W (step 0 at lr 0), this one at lr · (k + 1)/W.
    """

    lowbit_plugin_api = 1

    def __init__(
        self, optimizer: torch.optim.Optimizer, max_steps: int, warmup_steps: int = 50, min_lr_ratio: float = 0.1
    ) -> None:
        _check(warmup_steps, min_lr_ratio)
        self.max_steps, self.warmup_steps, self.min_lr_ratio = max_steps, warmup_steps, min_lr_ratio
        super().__init__(optimizer, param_group_field="lr", t_in_epochs=False)
        self.update_groups(self._get_lr(0))  # the first step's lr

    def _get_lr(self, t: int) -> list[float]:
        factor = warmup_cosine(t, self.warmup_steps, self.max_steps, self.min_lr_ratio)
        return [v * factor for v in self.base_values]


class WarmupConstant(Scheduler):
    """Linear warmup, then the optimizer's lr for the rest of the run."""

    lowbit_plugin_api = 1

    def __init__(self, optimizer: torch.optim.Optimizer, max_steps: int, warmup_steps: int = 0) -> None:
        _check(warmup_steps)
        self.max_steps, self.warmup_steps = max_steps, warmup_steps
        super().__init__(optimizer, param_group_field="lr", t_in_epochs=False)
        self.update_groups(self._get_lr(0))

    def _get_lr(self, t: int) -> list[float]:
        factor = (t + 1) / self.warmup_steps if t < self.warmup_steps else 1.0
        return [v * factor for v in self.base_values]


class WarmupStableDecay(WSDLRScheduler):
    """timm's ``WSDLRScheduler`` over ``max_steps``: warmup, lr, then the last ``decay_fraction`` of the
    run decaying by ``decay_fn`` (``1-sqrt``, ``linear``, ``cosine``, ``power``, ``exp``) to ``min_lr_ratio`` · lr.

    With D = round(decay_fraction · (max_steps − W)) decay steps starting at step S = max_steps − D:
    lr(k) = lr · (k + 1)/W for k < W; lr for W ≤ k ≤ S; lr_min + (lr − lr_min) · decay((k − S)/D) after
    (``1-sqrt``: 1 − √f, Hägele et al. 2024, eq. 1); lr_min from ``max_steps`` on.
    """

    lowbit_plugin_api = 1

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        max_steps: int,
        warmup_steps: int = 50,
        decay_fraction: float = 0.2,
        min_lr_ratio: float = 0.0,
        decay_fn: str = "1-sqrt",
    ) -> None:
        _check(warmup_steps, min_lr_ratio)
        if not 0 < decay_fraction <= 1:
            raise LowbitError(f"scheduler.decay_fraction must be in (0, 1], got {decay_fraction}")
        if max_steps <= warmup_steps:
            raise LowbitError(
                f"scheduler wsd needs trainer.max_steps > scheduler.warmup_steps, got {max_steps} and {warmup_steps}"
            )
        self.max_steps, self.decay_fraction, self.min_lr_ratio = max_steps, decay_fraction, min_lr_ratio
        after_warmup = max_steps - warmup_steps
        lr = optimizer.param_groups[0].get("initial_lr", optimizer.param_groups[0]["lr"])
        try:
            super().__init__(
                optimizer,
                t_initial=after_warmup,
                decay_t=max(1, round(decay_fraction * after_warmup)),
                lr_min=min_lr_ratio * lr,
                decay_fn=decay_fn,
                warmup_t=warmup_steps,
                t_in_epochs=False,
            )
        except ValueError as err:  # timm's checks (decay_fn, ...), in lowbit's words
            raise LowbitError(f"scheduler wsd: {err}") from err
        self.update_groups(self._get_lr(0))

    def _get_lr(self, t: int) -> list[float]:
        if t < self.warmup_t:  # lowbit's warmup (timm's starts at warmup_lr_init = 0)
            return [v * (t + 1) / self.warmup_t for v in self.base_values]
        return super()._get_lr(t)


def build_scheduler(optimizer: torch.optim.Optimizer, spec: Mapping[str, Any], max_steps: int) -> Any:
    """The ``lowbit.schedulers`` plugin ``spec`` names (``cosine`` when it names none, as configs before schedulers were plugins)."""
    from lowbit.registry import registry

    options = dict(spec)
    options.setdefault("name", "cosine")
    return registry.build("schedulers", options, optimizer=optimizer, max_steps=max_steps)


def step_scheduler(scheduler: Any, global_step: int, metric: Any = None) -> None:
    """Set the lr of optimizer step ``global_step``: timm schedulers by the step count, torch ones by ``step()``."""
    if isinstance(scheduler, Scheduler):
        scheduler.step_update(num_updates=global_step, metric=metric)
    elif metric is None:
        scheduler.step()
    else:
        scheduler.step(metric)
