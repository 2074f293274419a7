"""Causal language modelling: next-token cross-entropy, bits per byte and perplexity."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.text import Perplexity

from lowbit.tasks.base import Task
from lowbit.tasks.optim import configure
from lowbit.tasks.schedule import step_scheduler

__all__ = ["CausalLM"]


class CausalLM(Task):
    """Train any ``(B, T) → (B, T, V)`` model on next-token prediction.

    Logged: ``train/loss``, ``train/bpb``, ``lr``; ``val/loss``, ``val/bpb`` (loss / ln 2: tokens are
    bytes) and ``val/ppl`` (torchmetrics ``Perplexity``).
    """

    lowbit_plugin_api = 1
    throughput_unit = "tokens"
    flops_per_batch: int | None = None  # set it for perf/mfu (Lightning's ThroughputMonitor); unknown by default

    def __init__(
        self, model: nn.Module, optimizer: Mapping[str, Any], scheduler: Mapping[str, Any], max_steps: int
    ) -> None:
        super().__init__()
        self.model = model
        self.optimizer_cfg, self.scheduler_cfg, self.max_steps = dict(optimizer), dict(scheduler), max_steps
        self.val_loss = MeanMetric()
        self.val_ppl = Perplexity()

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)

    def _loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch  # (B, T) each
        loss = self._loss(self(x), y)
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)  # the global batch's mean
        self.log("train/bpb", loss / math.log(2), sync_dist=True)
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x).float()
        self.val_loss.update(self._loss(logits, y), weight=y.numel())
        self.val_ppl.update(logits, y)

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute()
        self.log_dict(
            {"val/loss": loss, "val/bpb": loss / math.log(2), "val/ppl": self.val_ppl.compute()},
            prog_bar=True,
            sync_dist=True,  # torchmetrics' values are already global: the same on every rank
        )
        self.val_loss.reset()
        self.val_ppl.reset()

    def configure_optimizers(self):
        return configure(self.model, self.optimizer_cfg, self.scheduler_cfg, self.max_steps)

    def lr_scheduler_step(self, scheduler, metric) -> None:
        step_scheduler(scheduler, self.global_step, metric)  # timm schedulers are stepped by the step count
