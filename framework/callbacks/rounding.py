"""Stochastic rounding draws as a pure function of the run's seed and step.

QuantLinear draws its stochastic-rounding noise from ``layer.sr_generator`` (torch's global
generator when None). Lightning checkpoints do not hold torch's global generator state, so a
run resumed from a checkpoint would draw different noise than the uninterrupted run. This
callback gives every quantized layer its own generator and reseeds it at the start of every
training step from (seed, step, layer index, rank): a resumed run repeats every later step's draws,
and each process of a distributed run draws its own noise for its own slice of the batch.
"""

from __future__ import annotations

import lightning as L
import torch

from lowbit.quant import quant_layers

__all__ = ["SeedStochasticRounding", "step_seed"]

_MASK = (1 << 63) - 1


def step_seed(seed: int, step: int, layer: int, rank: int = 0) -> int:
    """A 63-bit seed, distinct for every (seed, step, layer, rank) a run can reach (splitmix-style
    mixing); rank 0's are those of a one-process run."""
    z = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + layer * 0x94D049BB133111EB) & _MASK
    z = (z + rank * 0xD1B54A32D192ED03) & _MASK
    z = ((z ^ (z >> 31)) * 0xD6E8FEB86659FD93) & _MASK
    return z ^ (z >> 29)


class SeedStochasticRounding(L.Callback):
    """Reseed each QuantLinear's ``sr_generator`` at every training step (see module doc)."""

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        for index, layer in enumerate(quant_layers(pl_module).values()):
            device = layer.weight.device
            if layer.sr_generator is None or layer.sr_generator.device != device:
                layer.sr_generator = torch.Generator(device=device)
            layer.sr_generator.manual_seed(step_seed(self.seed, trainer.global_step, index, trainer.global_rank))
