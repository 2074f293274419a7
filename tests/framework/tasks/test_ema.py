"""EMA of the weights: the update formula with and without warm-up, and swapping in and out."""

import pytest
import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.tasks.ema import EMA, ema_decay


def test_update_formula_with_and_without_warmup():
    model = nn.Linear(2, 1, bias=False)
    model.weight.data = torch.tensor([[1.0, 2.0]])
    ema = EMA(model, decay=0.9, warmup=False)
    model.weight.data = torch.tensor([[3.0, 0.0]])
    assert ema.update(model) == 0.9
    torch.testing.assert_close(ema.weight, torch.tensor([[0.9 * 1 + 0.1 * 3, 0.9 * 2 + 0.1 * 0]]))
    model.weight.data = torch.tensor([[0.0, 0.0]])
    ema.update(model)
    torch.testing.assert_close(ema.weight, 0.9 * torch.tensor([[1.2, 1.8]]))

    assert [ema_decay(0.999, n) for n in (0, 1, 10, 10_000)] == [1 / 10, 2 / 11, 11 / 20, 0.999]
    warm = EMA(nn.Linear(2, 1, bias=False), decay=0.999)
    shadow, values = warm.weight.clone(), [torch.full((1, 2), float(v)) for v in (4.0, -2.0, 1.0)]
    for n, v in enumerate(values):
        d = min(0.999, (1 + n) / (10 + n))
        shadow = d * shadow + (1 - d) * v
        warm.update(_with_weight(v))
    torch.testing.assert_close(warm.weight, shadow)
    assert int(warm.updates) == 3


def _with_weight(value: torch.Tensor) -> nn.Linear:
    layer = nn.Linear(2, 1, bias=False)
    layer.weight.data = value.clone()
    return layer


def test_swapped_puts_the_average_in_and_restores_the_weights_even_on_error():
    model = nn.Linear(3, 3)
    ema = EMA(model, decay=0.5, warmup=False)
    trained = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    after = [p.detach().clone() for p in model.parameters()]
    with ema.swapped(model):
        for p, before in zip(model.parameters(), trained):
            torch.testing.assert_close(p, before + 0.5)  # halfway between the start and the update
    with pytest.raises(RuntimeError), ema.swapped(model):
        raise RuntimeError("evaluation failed")
    for p, want in zip(model.parameters(), after):
        assert torch.equal(p, want)
    assert set(dict(ema.named_buffers())) == {"updates", "weight", "bias"}
    with pytest.raises(LowbitError, match="task.ema_decay must be in \\[0, 1\\), got 1.0"):
        EMA(model, decay=1.0)
