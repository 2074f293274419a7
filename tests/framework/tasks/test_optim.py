"""Optimizers by name through timm's factory: the same steps as the optimizers built by hand, weight decay
on matrices only, any timm name, 8-bit AdamW, configs generated for the plugins, clear errors."""

import pytest
import torch
from timm.optim import Adan, Lion, NAdamW
from torch import nn

from lowbit.config import compose, plain
from lowbit.errors import LowbitError
from lowbit.registry import registry
from lowbit.tasks.optim import build_optimizer


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Embedding(11, 8), nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 4, bias=False))


def _steps(optimizer: torch.optim.Optimizer, model: nn.Module, n: int = 6) -> list[torch.Tensor]:
    """``n`` steps on a fixed quadratic-ish loss; the parameters after them."""
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 11, (16,), generator=gen)
    target = torch.randn(16, 4, generator=gen)
    for _ in range(n):
        optimizer.zero_grad()
        ((model(tokens) - target) ** 2).mean().backward()
        optimizer.step()
    return [p.detach().clone() for p in model.parameters()]


def _hand_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """lowbit's rule before timm's factory: decay parameters with two or more dimensions, nothing else."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def _assert_same_steps(spec: dict, reference) -> None:
    model, twin = _model(), _model()
    got = _steps(build_optimizer(model, spec), model)
    want = _steps(reference(_hand_groups(twin, spec["weight_decay"])), twin)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_adamw_takes_the_steps_of_the_torch_adamw_lowbit_built_before():
    spec = {"name": "adamw", "lr": 3e-3, "weight_decay": 0.1, "betas": [0.9, 0.95], "eps": 1e-8}
    _assert_same_steps(spec, lambda groups: torch.optim.AdamW(groups, lr=3e-3, betas=(0.9, 0.95), eps=1e-8))


def test_lion_and_adan_take_the_steps_of_timms_own_optimizers():
    lion = {"name": "lion", "lr": 3e-4, "weight_decay": 1.0, "betas": [0.9, 0.99]}
    _assert_same_steps(lion, lambda groups: Lion(groups, lr=3e-4, betas=(0.9, 0.99)))
    adan = {"name": "adan", "lr": 3e-3, "weight_decay": 0.02, "betas": [0.98, 0.92, 0.99], "eps": 1e-8}
    _assert_same_steps(adan, lambda groups: Adan(groups, lr=3e-3, betas=(0.98, 0.92, 0.99), eps=1e-8))


def test_any_timm_optimizer_works_by_name_with_the_configs_options():
    spec = {"name": "nadamw", "lr": 1e-3, "weight_decay": 0.1, "betas": [0.9, 0.95], "eps": 1e-8}
    assert "nadamw" not in registry.names("optimizers")  # not a lowbit plugin: straight to timm's factory
    optimizer = build_optimizer(_model(), spec)
    assert isinstance(optimizer, NAdamW) and optimizer.defaults["betas"] == (0.9, 0.95)
    with pytest.raises(LowbitError, match=r"unknown optimizer 'adamv'; installed: adamw, adamw8bit, adan, lion, sgd"):
        build_optimizer(_model(), {"name": "adamv"})
    with pytest.raises(LowbitError, match=r"optimizers 'lion' has no option 'eps'; valid: lr, weight_decay, betas"):
        build_optimizer(_model(), {"name": "lion", "eps": 1e-8})


def test_weight_decay_only_on_matrices():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    groups = build_optimizer(model, {"name": "adamw", "lr": 1e-3, "weight_decay": 0.1}).param_groups
    by_decay = {g["weight_decay"]: [tuple(p.shape) for p in g["params"]] for g in groups}
    assert by_decay == {0.1: [(4, 4)], 0.0: [(4,), (4,), (4,)]}


def test_learned_step_sizes_are_not_decayed():
    from lowbit.quant.qat import FakeQuant, QATLinear

    layer = nn.Linear(64, 8)
    weight_quant = FakeQuant({"element": "int4", "block": [1, 32]}, "lsq", shape=(8, 64))  # scales (8, 2): 2-D
    model = nn.Sequential(
        QATLinear.from_linear(layer, weight_quant, FakeQuant({"element": "int8", "block": "tensor"}, "fixed"))
    )
    groups = build_optimizer(model, {"name": "adamw", "lr": 1e-3, "weight_decay": 0.1}).param_groups
    by_decay = {g["weight_decay"]: [tuple(p.shape) for p in g["params"]] for g in groups}
    assert by_decay == {0.1: [(8, 64)], 0.0: [(8,), (8, 2), ()]}  # bias, step sizes, binary point


@pytest.mark.parametrize("recipe", ["bf16_llm", "bf16_vit", "bf16_dit", "deq_llm", "timm_nvfp4"])
def test_timms_weight_decay_groups_are_lowbits_rule_on_every_model_family(recipe):
    cfg = compose([f"recipe={recipe}", "debug=smoke"]).cfg
    model = registry.build("models", plain(cfg.model), posenc=plain(cfg.posenc))
    groups = build_optimizer(model, {"name": "adamw", "lr": 1e-3, "weight_decay": 0.1}).param_groups
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(len(g["params"]) for g in groups) == len(trainable)
    assert decayed == {id(p) for p in trainable if p.dim() >= 2}


def test_adamw8bit_keeps_8bit_state_and_descends():
    model = nn.Linear(64, 128, bias=False)
    torch.manual_seed(0)
    model.weight.data = torch.randn(128, 64)
    w = model.weight
    w32 = nn.Parameter(w.detach().clone())  # the same descent with 32-bit AdamW states
    opt = build_optimizer(model, {"name": "adamw8bit", "lr": 1e-2, "weight_decay": 0.0})
    assert type(opt).__name__ == "AdamW8bit"
    betas, eps = opt.param_groups[0]["betas"], opt.param_groups[0]["eps"]
    reference = torch.optim.AdamW([w32], lr=1e-2, betas=betas, eps=eps, weight_decay=0.0)
    start = (w**2).sum().item()
    for _ in range(20):
        for optimizer, p in ((opt, w), (reference, w32)):
            optimizer.zero_grad()
            (p**2).sum().backward()
            optimizer.step()
    assert (w**2).sum().item() < 0.9 * start
    assert opt.state[w]["state1"].dtype == torch.uint8
    # 8-bit blockwise states follow the 32-bit AdamW: on this seed Σw² within 1% and the weights a mean 0.006
    # apart after 20 steps, below one step of size lr = 0.01 (elements near 0 oscillate, so no max bound)
    assert (w**2).sum().item() == pytest.approx((w32**2).sum().item(), rel=0.01)
    assert (w - w32).abs().mean().item() < 1e-2


def test_optimizer_plugins_get_configs_from_their_signatures():
    assert plain(compose(["optimizer=lion"]).cfg.optimizer) == {
        "name": "lion",
        "lr": 3e-4,
        "weight_decay": 1.0,
        "betas": [0.9, 0.99],
    }
    assert plain(compose(["optimizer=adan"]).cfg.optimizer)["betas"] == [0.98, 0.92, 0.99]
    # the shipped YAML wins over the generated config, and equals it
    assert plain(compose(["optimizer=adamw"]).cfg.optimizer) == registry.default_config("optimizers", "adamw")
    # a timm name that is no lowbit plugin keeps adamw's options
    assert plain(compose(["optimizer.name=nadamw"]).cfg.optimizer)["name"] == "nadamw"
