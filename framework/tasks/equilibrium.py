"""Tasks for models with an equilibrium (DEQ) layer: log its solver stats, add its regulariser.

A model with a DEQ layer exposes ``deq_stats() -> {"deq/iters": ..., "deq/abs_res": ..., "deq/fallbacks": ...}``
(the last forward's solver stats) and ``deq_aux_loss() -> Tensor`` (the Jacobian regulariser, zero when
off). ``log_deq_stats`` logs the stats every training step (W&B and CSV through the task's loggers) and
``deq_aux_loss`` adds the regulariser to the loss. ``note_deq_fallbacks`` counts the training steps whose
solve broke down and says so on the console once per ``FALLBACK_NOTICE_EVERY`` steps. The classifier and LM
tasks here are the plain ones plus that; the diffusion task does the same itself.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch
from torch import nn

from lowbit.tasks.classify import ImageClassifier
from lowbit.tasks.lm import CausalLM

__all__ = [
    "FALLBACK_NOTICE_EVERY",
    "EquilibriumClassifier",
    "EquilibriumLM",
    "FallbackNotice",
    "deq_aux_loss",
    "flush_deq_fallbacks",
    "log_deq_stats",
    "log_val_deq_stats",
    "note_deq_fallbacks",
    "with_deq_terms",
]

FALLBACK_NOTICE_EVERY = 50  # training steps per console notice of DEQ solver fallbacks

log = logging.getLogger("lowbit")


def log_deq_stats(task: L.LightningModule, model: nn.Module, prefix: str = "") -> dict[str, float]:
    """Log the model's last DEQ solver stats (``{prefix}deq/iters``, ...) if it has a DEQ layer; return them."""
    stats_fn = getattr(model, "deq_stats", None)
    stats = stats_fn() if callable(stats_fn) else {}
    if stats:
        task.log_dict({f"{prefix}{k}": float(v) for k, v in stats.items()})
    return stats


def deq_aux_loss(model: nn.Module) -> torch.Tensor | float:
    """The model's DEQ regulariser of its last forward (Jacobian penalty), or 0.0 when it has none."""
    aux = getattr(model, "deq_aux_loss", None)
    return aux() if callable(aux) else 0.0


def with_deq_terms(task: L.LightningModule, model: nn.Module, loss: torch.Tensor) -> torch.Tensor:
    """A training step's ``loss`` plus the model's DEQ regulariser, with the solver stats and
    ``deq/jac_loss`` logged (the loss unchanged for a model without a DEQ layer)."""
    log_deq_stats(task, model)
    aux = deq_aux_loss(model)
    if isinstance(aux, torch.Tensor) and aux.requires_grad:
        task.log("deq/jac_loss", aux.detach().float())
        loss = loss + aux
    return loss


def log_val_deq_stats(task: L.LightningModule, model: nn.Module) -> None:
    """``val/deq_iters`` and ``val/deq_rel_res`` of the last forward, as epoch means over validation batches
    (over every rank's batches in a multi-process run)."""
    stats = getattr(model, "deq_stats", dict)()
    if stats:
        task.log("val/deq_iters", stats["deq/iters"], on_epoch=True, sync_dist=True)
        task.log("val/deq_rel_res", stats["deq/rel_res"], on_epoch=True, sync_dist=True)


class FallbackNotice:
    """Counts training steps whose DEQ solve broke down (``deq/fallbacks`` > 0: the solver handed over to
    damped fixed-point iteration); every ``every`` steps, and at the end, one console line if any did."""

    def __init__(self, every: int = FALLBACK_NOTICE_EVERY) -> None:
        self.every, self.steps, self.fell_back = every, 0, 0

    def update(self, fallbacks: float) -> None:
        self.steps += 1
        self.fell_back += fallbacks > 0
        if self.steps >= self.every:
            self.flush()

    def flush(self) -> None:
        if self.fell_back:
            log.warning(
                f"notice: DEQ solver fell back to damped fixed-point iteration in {self.fell_back} of the last "
                f"{self.steps} steps (deq/fallbacks in the logs)"
            )
        self.steps = self.fell_back = 0


def note_deq_fallbacks(task: L.LightningModule, model: nn.Module) -> None:
    """Count the last training step's solver fallbacks (forward and backward: call it after backward,
    from ``on_train_batch_end``) towards the task's periodic notice; nothing for a model without a DEQ layer."""
    stats = getattr(model, "deq_stats", dict)()
    if stats:
        if not hasattr(task, "_deq_fallback_notice"):
            task._deq_fallback_notice = FallbackNotice()
        task._deq_fallback_notice.update(stats.get("deq/fallbacks", 0.0))


def flush_deq_fallbacks(task: L.LightningModule) -> None:
    """The notice of the steps since the last one (at the end of training)."""
    notice = getattr(task, "_deq_fallback_notice", None)
    if notice is not None:
        notice.flush()


class _EquilibriumMixin:
    """training_step = the task's loss + the DEQ regulariser, with the solver stats logged and fallbacks
    noticed on the console."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return with_deq_terms(self, self.model, super().training_step(batch, batch_idx))

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_end(outputs, batch, batch_idx)
        note_deq_fallbacks(self, self.model)

    def on_train_end(self) -> None:
        super().on_train_end()
        flush_deq_fallbacks(self)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        super().validation_step(batch, batch_idx)
        log_val_deq_stats(self, self.model)


class EquilibriumClassifier(_EquilibriumMixin, ImageClassifier):
    """``ImageClassifier`` for a DEQ model (e.g. ``deq_vit``): also logs ``deq/*`` and adds the regulariser."""


class EquilibriumLM(_EquilibriumMixin, CausalLM):
    """``CausalLM`` for a DEQ model (e.g. ``deq_gpt``): also logs ``deq/*`` and adds the regulariser."""
