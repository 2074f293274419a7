"""Exponential moving average of a model's parameters, kept as buffers beside it.

θ_ema ← d θ_ema + (1 − d) θ after every optimizer step, with d = decay, or with warm-up
d_n = min(decay, (1 + n)/(10 + n)) at update n (TensorFlow's ``ExponentialMovingAverage`` with
``num_updates``), so early averages are not dominated by the random initialisation. Diffusion models
sample from EMA weights (DDPM, Ho et al. 2020 §B; DiT §4, decay 0.9999).

The shadow values are buffers (in checkpoints, untouched by precision converters, which swap Linear
layers only); ``swapped(model)`` puts them into the model for evaluation and restores the training weights.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from lowbit.errors import LowbitError

__all__ = ["EMA", "ema_decay"]


def ema_decay(decay: float, updates: int, warmup: bool = True) -> float:
    """The decay used at update number ``updates`` (0-based): ``decay``, or min(decay, (1 + n)/(10 + n)) with warm-up."""
    return min(decay, (1 + updates) / (10 + updates)) if warmup else decay


def _key(name: str) -> str:
    return name.replace(".", "__")  # buffer names cannot hold dots


class EMA(nn.Module):
    """Shadow copies of ``model``'s trainable parameters (float32), updated by ``update(model)``."""

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = True) -> None:
        super().__init__()
        if not 0 <= decay < 1:
            raise LowbitError(f"task.ema_decay must be in [0, 1), got {decay}")
        self.decay, self.warmup = decay, warmup
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        for name, p in model.named_parameters():
            if p.requires_grad:
                self.register_buffer(_key(name), p.detach().float().clone())

    def _pairs(self, model: nn.Module) -> Iterator[tuple[nn.Parameter, torch.Tensor]]:
        params = dict(model.named_parameters())
        for name in self.names:
            yield params[name], getattr(self, _key(name))

    @torch.no_grad()
    def update(self, model: nn.Module) -> float:
        """θ_ema ← d θ_ema + (1 − d) θ; returns the d used."""
        d = ema_decay(self.decay, int(self.updates), self.warmup)
        for p, shadow in self._pairs(model):
            shadow.lerp_(p.detach().float(), 1 - d)
        self.updates += 1
        return d

    @contextmanager
    def swapped(self, model: nn.Module) -> Iterator[nn.Module]:
        """Inside: ``model`` holds the EMA weights; on exit (exceptions included) its own weights again."""
        saved = []
        with torch.no_grad():
            for p, shadow in self._pairs(model):
                saved.append(p.detach().clone())
                p.copy_(shadow)
        try:
            yield model
        finally:
            with torch.no_grad():
                for (p, _), value in zip(self._pairs(model), saved):
                    p.copy_(value)
