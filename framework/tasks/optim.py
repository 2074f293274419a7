"""Optimizers and learning-rate schedules shared by every task.

AdamW from torch (fused where the device allows) or 8-bit AdamW from bitsandbytes; decoupled
weight decay on matrices only (biases, norms and 1-D parameters are not decayed). The schedule is
linear warmup then cosine decay to ``min_lr_ratio · lr`` (as in GPT-3 and nanoGPT).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from lowbit.errors import LowbitError

__all__ = ["OPTIMIZERS", "build_optimizer", "warmup_cosine"]

OPTIMIZERS = ("adamw", "adamw8bit", "sgd")


def _param_groups(params: Iterable[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for _, p in params:
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(
    named_params: Iterable[tuple[str, nn.Parameter]],
    name: str = "adamw",
    lr: float = 1e-3,
    weight_decay: float = 0.1,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
) -> torch.optim.Optimizer:
    """Build an optimizer by name; ``adamw8bit`` needs bitsandbytes with a backend for the device."""
    groups = _param_groups(named_params, weight_decay)
    betas = tuple(betas)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)
    if name == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except Exception as err:  # bitsandbytes raises several kinds when no backend fits
            raise LowbitError(f"optimizer 'adamw8bit' needs bitsandbytes, which failed to import: {err}") from err
        return bnb.optim.AdamW8bit(groups, lr=lr, betas=betas, eps=eps)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=betas[0])
    raise LowbitError(f"unknown optimizer '{name}'; valid: {', '.join(OPTIMIZERS)}")


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.1) -> float:
    """LR multiplier at ``step``: (step+1)/warmup during warmup, then cosine from 1 to ``min_lr_ratio``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
