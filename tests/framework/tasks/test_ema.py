"""EMA of the weights (timm's ModelEmaV3): the update formula with and without warm-up, bit for bit the
hand-rolled EMA it replaced, swapping in and out, and old checkpoints."""

import pytest
import torch
from timm.utils import ModelEmaV3
from torch import nn

from lowbit.errors import LowbitError
from lowbit.tasks.ema import EMA, ema_decay


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.LayerNorm(7), nn.Linear(7, 3))


def test_update_formula_with_and_without_warmup():
    model = nn.Linear(2, 1, bias=False)
    model.weight.data = torch.tensor([[1.0, 2.0]])
    ema = EMA(model, decay=0.9, warmup=False)
    assert isinstance(ema, ModelEmaV3)
    model.weight.data = torch.tensor([[3.0, 0.0]])
    assert ema.update(model) == 0.9
    torch.testing.assert_close(ema.module.weight, torch.tensor([[0.9 * 1 + 0.1 * 3, 0.9 * 2 + 0.1 * 0]]))
    model.weight.data = torch.tensor([[0.0, 0.0]])
    ema.update(model)
    torch.testing.assert_close(ema.module.weight, 0.9 * torch.tensor([[1.2, 1.8]]))

    assert [ema_decay(0.999, n) for n in (0, 1, 10, 10_000)] == [1 / 10, 2 / 11, 11 / 20, 0.999]
    assert [EMA(model, 0.999).get_decay(n) for n in (0, 1, 10, 10_000)] == [1 / 10, 2 / 11, 11 / 20, 0.999]
    warm = EMA(nn.Linear(2, 1, bias=False), decay=0.999)
    shadow, values = warm.module.weight.clone(), [torch.full((1, 2), float(v)) for v in (4.0, -2.0, 1.0)]
    for n, v in enumerate(values):
        d = min(0.999, (1 + n) / (10 + n))
        shadow = d * shadow + (1 - d) * v
        assert warm.update(_with_weight(v)) == d
    torch.testing.assert_close(warm.module.weight, shadow)
    assert int(warm.updates) == 3


def _with_weight(value: torch.Tensor) -> nn.Linear:
    layer = nn.Linear(2, 1, bias=False)
    layer.weight.data = value.clone()
    return layer


@pytest.mark.parametrize("warmup", (True, False))
def test_the_timm_backed_ema_equals_the_hand_rolled_update_bit_for_bit(warmup):
    """The EMA lowbit had before timm's (float32 buffers, ``shadow.lerp_(θ, 1 − d)`` with the warm-up rule),
    replayed beside the ModelEmaV3-backed one over 40 optimizer-like steps: every average equal, exactly."""
    model = _mlp()
    model[1].bias.requires_grad_(False)  # a frozen parameter is not averaged (nor swapped)
    ema = EMA(model, decay=0.95, warmup=warmup)
    old = {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}
    gen = torch.Generator().manual_seed(1)
    for n in range(40):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=gen))  # a training step
        d = min(0.95, (1 + n) / (10 + n)) if warmup else 0.95
        for name, p in model.named_parameters():
            if name in old:
                old[name].lerp_(p.detach().float(), 1 - d)
        assert ema.update(model) == d
        for name, shadow in old.items():
            assert torch.equal(getattr(ema.module, name.replace(".", "__")), shadow), (n, name)
    assert [n for n, _ in ema.module.named_parameters()] == [
        "0__weight",
        "0__bias",
        "1__weight",
        "2__weight",
        "2__bias",
    ]
    assert not any(p.requires_grad for p in ema.module.parameters())  # never trained, never in an optimizer


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
    assert set(ema.state_dict()) == {"updates", "module.weight", "module.bias"}
    with pytest.raises(LowbitError, match="task.ema_decay must be in \\[0, 1\\), got 1.0"):
        EMA(model, decay=1.0)
    with pytest.raises(LowbitError, match="Identity has no trainable parameters"):
        EMA(nn.Identity())


def test_a_checkpoint_of_the_hand_rolled_ema_loads():
    """Before ModelEmaV3 the averages were buffers ``<name with __>`` beside ``updates``."""
    model = _mlp()
    ema = EMA(model)
    old_state = {"updates": torch.tensor(7)}
    old_state.update({n.replace(".", "__"): torch.full_like(p, 0.25) for n, p in model.named_parameters()})
    ema.load_state_dict(old_state)
    assert int(ema.updates) == 7
    assert all(torch.equal(p, torch.full_like(p, 0.25)) for p in ema.module.parameters())
