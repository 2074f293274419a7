"""Optimizers and the warmup-cosine schedule."""

import math

import pytest
import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.tasks.optim import build_optimizer, warmup_cosine


def test_warmup_then_cosine_values():
    assert warmup_cosine(0, 10, 110) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 110) == pytest.approx(1.0)
    assert warmup_cosine(10, 10, 110) == pytest.approx(1.0)
    assert warmup_cosine(60, 10, 110, min_lr_ratio=0.1) == pytest.approx(
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5))
    )
    assert warmup_cosine(110, 10, 110, min_lr_ratio=0.1) == pytest.approx(0.1)
    assert warmup_cosine(500, 10, 110, min_lr_ratio=0.1) == pytest.approx(0.1)


def test_weight_decay_only_on_matrices():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    opt = build_optimizer(model.named_parameters(), "adamw", lr=1e-3, weight_decay=0.1)
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.1 and [p.shape for p in decayed["params"]] == [(4, 4)]
    assert plain["weight_decay"] == 0.0 and len(plain["params"]) == 3


def test_adamw8bit_keeps_8bit_state_and_descends():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(128, 64))
    opt = build_optimizer([("w", w)], "adamw8bit", lr=1e-2, weight_decay=0.0)
    start = (w**2).sum().item()
    for _ in range(20):
        opt.zero_grad()
        (w**2).sum().backward()
        opt.step()
    assert (w**2).sum().item() < 0.9 * start
    assert opt.state[w]["state1"].dtype == torch.uint8


def test_unknown_optimizer():
    with pytest.raises(LowbitError, match="unknown optimizer 'lion'; valid: adamw, adamw8bit, sgd"):
        build_optimizer([], "lion")
