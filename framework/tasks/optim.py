"""Optimizers by name, through timm's factory (``timm.optim.create_optimizer_v2``).

An optimizer is a ``lowbit.optimizers`` plugin: a function ``(model, **options) -> Optimizer``
(``adamw``, ``adamw8bit``, ``lion``, ``adan``, ``sgd`` here; a third party registers its own), or
any other name timm's registry knows (``nadamw``, ``lamb``, ``adopt``, ...), built by timm with the
config's options. Decoupled weight decay goes to matrices only: timm's ``param_groups_weight_decay``
leaves biases, norm gains and every other 1-D parameter undecayed (``param_groups``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from lowbit.errors import LowbitError

__all__ = [
    "adamw",
    "adamw8bit",
    "adan",
    "build_optimizer",
    "configure",
    "create",
    "lion",
    "param_groups",
    "sgd",
    "timm_optimizers",
]


def timm_optimizers() -> list[str]:
    """Every optimizer name timm's factory builds (``timm.optim.list_optimizers()``)."""
    from timm.optim import list_optimizers

    return list_optimizers()


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """timm's weight-decay rule (``param_groups_weight_decay``: none on 1-D parameters, biases and the names in
    ``model.no_weight_decay()``; also none on QAT quantizers' parameters, ``FakeQuant.no_weight_decay()``), as two groups, decayed first, also when ``weight_decay`` is 0: the order lowbit's
    optimizers always had, which shows in the last bit (gradient clipping sums the norms in optimizer order)."""
    from timm.optim import param_groups_weight_decay

    from lowbit.quant.qat import FakeQuant

    no_decay_names = set(getattr(model, "no_weight_decay", set)())
    for prefix, module in model.named_modules():  # QAT step sizes, zero points and binary points
        if isinstance(module, FakeQuant):
            no_decay_names |= {f"{prefix}.{name}" for name in module.no_weight_decay()}
    split = param_groups_weight_decay(model, 1.0, no_weight_decay_list=no_decay_names)  # 1.0: only to split
    decay = [p for g in split if g["weight_decay"] > 0 for p in g["params"]]
    rest = [p for g in split if g["weight_decay"] == 0 for p in g["params"]]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def create(model: nn.Module, name: str, weight_decay: float = 0.0, **options: Any) -> torch.optim.Optimizer:
    """``timm.optim.create_optimizer_v2(model, name, ...)`` over ``param_groups(model, weight_decay)``; lists as tuples."""
    from timm.optim import create_optimizer_v2

    options = {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}  # betas from YAML
    groups = lambda m: param_groups(m, weight_decay)
    try:
        return create_optimizer_v2(model, name, weight_decay=weight_decay, param_group_fn=groups, **options)
    except ImportError as err:  # bnb* optimizers without bitsandbytes (or without a backend for this device)
        raise LowbitError(f"optimizer '{name}' needs a package that failed to import: {err}") from err
    except TypeError as err:  # an option the optimizer's constructor does not take
        raise LowbitError(f"optimizer '{name}' (timm) rejected its options {sorted(options)}: {err}") from err


def adamw(
    model: nn.Module,
    lr: float = 3e-3,
    weight_decay: float = 0.1,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
) -> torch.optim.Optimizer:
    """``torch.optim.AdamW`` (Loshchilov & Hutter 2019); betas (0.9, 0.95) as GPT-3 and nanoGPT."""
    return create(model, "adamw", lr=lr, weight_decay=weight_decay, betas=betas, eps=eps)


def adamw8bit(
    model: nn.Module,
    lr: float = 3e-3,
    weight_decay: float = 0.1,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
) -> torch.optim.Optimizer:
    """bitsandbytes' ``AdamW8bit`` (block-wise quantized states, Dettmers et al. 2022) over timm's parameter
    groups. Built here rather than as timm's ``bnbadamw8bit``, which asserts CUDA: bitsandbytes runs on CPUs too."""
    try:
        import bitsandbytes as bnb
    except Exception as err:  # bitsandbytes raises several kinds when no backend fits
        raise LowbitError(f"optimizer 'adamw8bit' needs bitsandbytes, which failed to import: {err}") from err
    return bnb.optim.AdamW8bit(param_groups(model, weight_decay), lr=lr, betas=tuple(betas), eps=eps)


def lion(
    model: nn.Module, lr: float = 3e-4, weight_decay: float = 1.0, betas: tuple[float, float] = (0.9, 0.99)
) -> torch.optim.Optimizer:
    """timm's ``Lion`` (Chen et al. 2023): sign updates, so lr 3-10x below AdamW's and weight decay as much above."""
    return create(model, "lion", lr=lr, weight_decay=weight_decay, betas=betas)


def adan(
    model: nn.Module,
    lr: float = 3e-3,
    weight_decay: float = 0.02,
    betas: tuple[float, float, float] = (0.98, 0.92, 0.99),
    eps: float = 1e-8,
) -> torch.optim.Optimizer:
    """timm's ``Adan`` (Xie et al. 2022, Nesterov momentum from gradient differences); the paper's betas and decay."""
    return create(model, "adan", lr=lr, weight_decay=weight_decay, betas=betas, eps=eps)


def sgd(
    model: nn.Module, lr: float = 0.1, weight_decay: float = 1e-4, momentum: float = 0.9, nesterov: bool = True
) -> torch.optim.Optimizer:
    """``torch.optim.SGD`` with (Nesterov) momentum, as timm's ``sgd`` and ``momentum``."""
    return create(model, "sgd", lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov)


for _factory in (adamw, adamw8bit, lion, adan, sgd):
    _factory.lowbit_plugin_api = 1


def build_optimizer(model: nn.Module, spec: Mapping[str, Any]) -> torch.optim.Optimizer:
    """The optimizer ``spec`` names (``{name: ..., **options}``): a ``lowbit.optimizers`` plugin, else
    any name timm's factory knows, built with the same options."""
    from lowbit.registry import registry

    options = dict(spec)
    name = str(options.pop("name", "adamw"))
    if name in registry.names("optimizers"):
        return registry.build("optimizers", {"name": name, **options}, model=model)
    if name.lower().split("_")[-1] in timm_optimizers():  # "lookahead_adamw" wraps timm's adamw
        return create(model, name, **options)
    raise LowbitError(
        f"unknown optimizer '{name}'; installed: {', '.join(registry.names('optimizers'))} (lowbit plugins), "
        "or any name of timm.optim.list_optimizers()"
    )


def configure(
    model: nn.Module, optimizer: Mapping[str, Any], scheduler: Mapping[str, Any], max_steps: int
) -> dict[str, Any]:
    """A task's ``configure_optimizers`` answer: the optimizer, and its schedule stepped every optimizer step."""
    from lowbit.tasks.schedule import build_scheduler

    built = build_optimizer(model, optimizer)
    schedule = build_scheduler(built, scheduler, max_steps)
    return {"optimizer": built, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
