"""Exponential moving average of a model's trainable parameters: timm's ``ModelEmaV3``.

θ_ema ← d θ_ema + (1 − d) θ after every optimizer step, with d = decay, or with warm-up
d_n = min(decay, (1 + n)/(10 + n)) at update n (TensorFlow's ``ExponentialMovingAverage`` with
``num_updates``), so early averages are not dominated by the random initialisation. Diffusion models
sample from EMA weights (DDPM, Ho et al. 2020 §B; DiT §4, decay 0.9999).

``ModelEmaV3`` does the update (``torch._foreach_lerp_``); lowbit gives it the warm-up rule above
(``get_decay``) and, instead of a deep copy of the model, float32 copies of the trainable
parameters only: no Linear layers for a precision converter to swap, no buffers to average.
``swapped(model)`` puts the averages into the model for evaluation and restores the training weights.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from timm.utils import ModelEmaV3
from torch import nn

from lowbit.errors import LowbitError

__all__ = ["EMA", "ema_decay"]


def ema_decay(decay: float, updates: int, warmup: bool = True) -> float:
    """The decay used at update number ``updates`` (0-based): ``decay``, or min(decay, (1 + n)/(10 + n)) with warm-up."""
    return min(decay, (1 + updates) / (10 + updates)) if warmup else decay


def _key(name: str) -> str:
    return name.replace(".", "__")  # parameter names cannot hold dots


def _trainable(model: nn.Module, names: list[str]) -> nn.Module:
    """A module holding ``model``'s parameters ``names`` themselves (shared, not copied), in that order."""
    params = dict(model.named_parameters())
    holder = nn.Module()
    for name in names:
        holder.register_parameter(_key(name), params[name])
    return holder


def _reshard(model: nn.Module) -> None:
    """Under FSDP2, register the sharded parameters again: after a forward the root module holds its
    gathered (plain) parameters until the next backward, and the averages swap with the shards."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


class EMA(ModelEmaV3):
    """timm's ``ModelEmaV3`` over ``model``'s trainable parameters (float32 copies in ``self.module``),
    with lowbit's warm-up rule; ``update(model)`` after each optimizer step."""

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = True) -> None:
        if not 0 <= decay < 1:
            raise LowbitError(f"task.ema_decay must be in [0, 1), got {decay}")
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        if not names:
            raise LowbitError(f"{type(model).__name__} has no trainable parameters: nothing to train or average")
        # exclude_buffers: parameters are averaged, the (absent) buffers copied; float32 whatever the model's dtype
        super().__init__(
            _trainable(model, names), decay=decay, dtype=torch.float32, stochastic_rounding=False, exclude_buffers=True
        )
        # never trained; no forward, so its mode means nothing (timm leaves it in eval, which Lightning warns about)
        self.module.requires_grad_(False).train()
        self.names, self.warmup = names, warmup
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))
        self._register_load_state_dict_pre_hook(self._upgrade_state)

    def get_decay(self, step: int | None = None) -> float:
        """The decay of update ``step`` (0-based): ``ema_decay(decay, step, warmup)``; ``decay`` when None."""
        return self.decay if step is None else ema_decay(self.decay, step, self.warmup)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int | None = None) -> float:
        """θ_ema ← d θ_ema + (1 − d) θ with d of update ``step`` (default: the count so far); returns the d used."""
        step = int(self.updates) if step is None else step
        d = self.get_decay(step)
        self.apply_update_no_buffers_(_trainable(model, self.names), d)
        self.updates += 1
        return d

    def _pairs(self, model: nn.Module) -> Iterator[tuple[nn.Parameter, torch.Tensor]]:
        params = dict(model.named_parameters())
        for name in self.names:
            yield params[name], getattr(self.module, _key(name))

    @torch.no_grad()
    def shard_like(self, model: nn.Module) -> None:
        """Under FSDP2: each average becomes a DTensor laid out as its (now sharded) parameter, so the
        update, the swap and the checkpoint work on this rank's shard; a no-op where nothing is sharded."""
        from torch.distributed.tensor import DTensor, distribute_tensor

        params = dict(model.named_parameters())
        for name in self.names:
            p, shadow = params[name], getattr(self.module, _key(name))
            if isinstance(p, DTensor) and not isinstance(shadow, DTensor):
                # every rank holds the same full average (a copy of the same initial weights): take its own rows
                sharded = distribute_tensor(shadow.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
                self.module.register_parameter(_key(name), nn.Parameter(sharded, requires_grad=False))

    @contextmanager
    def swapped(self, model: nn.Module) -> Iterator[nn.Module]:
        """Inside: ``model`` holds the EMA weights; on exit (exceptions included) its own weights again."""
        saved = []
        _reshard(model)
        with torch.no_grad():
            for p, shadow in self._pairs(model):
                saved.append(p.detach().clone())
                p.copy_(shadow)
        try:
            yield model
        finally:
            _reshard(model)
            with torch.no_grad():
                for (p, _), value in zip(self._pairs(model), saved):
                    p.copy_(value)

    def _upgrade_state(self, state_dict, prefix, *args) -> None:
        """Checkpoints from before timm's EMA kept the averages as buffers ``ema.<name>``: now ``ema.module.<name>``."""
        for name in self.names:
            old = prefix + _key(name)
            if old in state_dict:
                state_dict[f"{prefix}module.{_key(name)}"] = state_dict.pop(old)
