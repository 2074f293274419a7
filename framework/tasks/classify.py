"""Image classification: cross-entropy (optionally label-smoothed) and accuracy (torchmetrics)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from lowbit.errors import LowbitError
from lowbit.tasks.base import Task
from lowbit.tasks.optim import configure
from lowbit.tasks.schedule import step_scheduler

__all__ = ["ImageClassifier"]


class ImageClassifier(Task):
    """Train any ``(B, C, H, W) → (B, num_classes)`` model on labelled images.

    Logged: ``train/loss``, ``train/acc`` (this batch), ``lr``; ``val/loss`` and ``val/acc`` over the
    whole validation split. Accuracy is top-1 (``MulticlassAccuracy``, micro average); the loss is
    cross-entropy with ``label_smoothing`` (Szegedy et al. 2016) in training, plain in validation.
    """

    lowbit_plugin_api = 1
    throughput_unit = "images"
    flops_per_batch: int | None = None  # set it for perf/mfu (Lightning's ThroughputMonitor); unknown by default

    def __init__(
        self,
        model: nn.Module,
        optimizer: Mapping[str, Any],
        scheduler: Mapping[str, Any],
        max_steps: int,
        num_classes: int,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        if not 0 <= label_smoothing < 1:
            raise LowbitError(f"task.label_smoothing must be in [0, 1), got {label_smoothing}")
        self.model = model
        self.optimizer_cfg, self.scheduler_cfg, self.max_steps = dict(optimizer), dict(scheduler), max_steps
        self.num_classes, self.label_smoothing = num_classes, label_smoothing
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_loss = MeanMetric()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def _logits(self, images: torch.Tensor) -> torch.Tensor:
        logits = self(images).float()  # (B, K); the loss in float32 whatever the compute dtype
        if logits.shape[-1] != self.num_classes:
            raise LowbitError(
                f"the model gives {logits.shape[-1]} logits per image but task.num_classes is {self.num_classes}; make model.num_classes match the data"
            )
        return logits

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The training loss of logits (B, K) for labels (B,): cross-entropy in float32, label-smoothed."""
        return F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch  # (B, C, H, W), (B,)
        logits = self._logits(images)
        loss = self._loss(logits, labels)
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)  # the global batch's mean
        self.log("train/acc", self.train_acc(logits, labels))
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        images, labels = batch
        logits = self._logits(images)
        self.val_loss.update(F.cross_entropy(logits, labels), weight=labels.numel())
        self.val_acc.update(logits, labels)

    def on_validation_epoch_end(self) -> None:
        self.log_dict(  # torchmetrics' values are already global: the same on every rank
            {"val/loss": self.val_loss.compute(), "val/acc": self.val_acc.compute()}, prog_bar=True, sync_dist=True
        )
        self.val_loss.reset()
        self.val_acc.reset()

    def configure_optimizers(self):
        return configure(self.model, self.optimizer_cfg, self.scheduler_cfg, self.max_steps)

    def lr_scheduler_step(self, scheduler, metric) -> None:
        step_scheduler(scheduler, self.global_step, metric)  # timm schedulers are stepped by the step count
