"""Quantization health: per-layer, per-operand statistics of every QuantLinear and QATLinear,
and a stop on non-finite losses that says which layers looked worst.

``QuantHealth`` turns on recording in every ``QuantLinear`` (the six operands of its three GEMMs)
and ``QATLinear`` (its fake-quantized ``fprop.x`` and ``fprop.w``) for one training step every
``every_n_steps``; each quantized operand then reports amax, block-scale range, underflow and
saturation (clipped) fractions and SNR (dB) (``lowbit.quant.operand_health``,
``lowbit.quant.qat.FakeQuant.stats``); a process's first record is computed eagerly, the later ones
in compiled kernels (the same numbers; on CPU both sum the error in the same C kernel), so the first step
does not wait for their compilation. Every record goes to ``<run_dir>/health.csv`` (long format:
one row per step, layer and operand); scalar summaries (``health/snr_db_min``,
``health/underflow_max``, ``health/saturation_max``, and the same per operand kind) go to every
logger; W&B also gets a table of the worst layers and histograms.

QAT quantizers with learned or fixed state add one scalar per layer and operand to every logger,
``qat/scale_mean/<layer>.<operand>`` (LSQ and static scales) and ``qat/frac_bits/<layer>.<operand>``
(QFX's binary point in use, round(F)), so their convergence is a curve per layer. Per layer, not
summarized: an average over layers hides the one whose scale runs away, and the volume is bounded
by the health cadence and by the operands that have such state (min/max operands have none).

``StopOnNonFinite`` checks the loss and the gradients before every optimizer step. When either
is not finite it re-runs the step's forward with health recording on, and stops the run with
one line naming the step and the layers whose quantization looked worst. The optimizer step
that would have written NaNs into the weights never runs, so every checkpoint holds finite
weights; the last one is named in the message.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import lightning as L
import torch

from lowbit.errors import LowbitError
from lowbit.quant import QuantLinear
from lowbit.quant.qat import QATLinear

__all__ = ["HEALTH_FIELDS", "QAT_FIELDS", "QuantHealth", "StopOnNonFinite", "health_layers", "worst_layers"]

HEALTH_FIELDS = ("amax", "scale_min", "scale_max", "underflow", "saturation", "snr_db")
QAT_FIELDS = ("scale_mean", "frac_bits")  # a QAT quantizer's learned state, where it has one


def health_layers(module: torch.nn.Module) -> dict[str, QuantLinear | QATLinear]:
    """The layers that record health (QuantLinear, QATLinear), by fully-qualified name."""
    return {name: m for name, m in module.named_modules() if isinstance(m, (QuantLinear, QATLinear))}


def _records(module: torch.nn.Module) -> list[tuple[str, str, dict[str, float]]]:
    """(layer, operand, stats) for every operand recorded since recording was turned on."""
    return [(name, op, stats) for name, layer in health_layers(module).items() for op, stats in layer.health.items()]


def _set_recording(module: torch.nn.Module, on: bool, compiled: bool = True) -> None:
    """Turn recording on or off in every health layer; ``compiled``: QuantLinear's statistics in
    compiled kernels (``lowbit.quant.operand_health``) rather than eagerly."""
    for layer in health_layers(module).values():
        layer.record_health = on
        if isinstance(layer, QuantLinear):
            layer.health_compiled = compiled
        if on:
            layer.health = {}


def _badness(stats: dict[str, float]) -> tuple[float, float]:
    """Sort key, worst first: non-finite amax, then the lowest SNR."""
    finite = math.isfinite(stats["amax"]) and math.isfinite(stats["snr_db"]) or stats["snr_db"] == math.inf
    return (0.0 if not finite else 1.0, stats["snr_db"] if math.isfinite(stats["snr_db"]) else -math.inf)


def worst_layers(records: Iterable[tuple[str, str, dict[str, float]]], k: int = 3) -> list[str]:
    """The ``k`` worst (layer.operand: stats) descriptions: non-finite amax first, then lowest SNR."""
    ranked = sorted(records, key=lambda r: _badness(r[2]))[:k]
    return [
        f"{name}.{op} (amax {s['amax']:.3g}, SNR {s['snr_db']:.1f} dB, underflow {s['underflow']:.1%}, "
        f"saturation {s['saturation']:.1%})"
        for name, op, s in ranked
    ]


class QuantHealth(L.Callback):
    """Record and log quantization health every ``every_n_steps`` training steps (see module doc)."""

    def __init__(self, every_n_steps: int = 50, path: str | Path | None = None, top_k: int = 10) -> None:
        if every_n_steps < 1:
            raise LowbitError(f"health.every_n_steps must be a positive integer, got {every_n_steps}")
        self.every_n_steps, self.top_k = every_n_steps, top_k
        self.path = None if path is None else Path(path)
        self._recording = False
        self._records = 0  # health steps recorded by this process

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._recording = trainer.global_step % self.every_n_steps == 0 and bool(health_layers(pl_module))
        if self._recording:
            # the first record eagerly: compiling its kernels (~10 graphs, 5 s with warm caches) would
            # delay the first step by more than the record takes; from the second on, compiled (2x faster)
            _set_recording(pl_module, True, compiled=self._records > 0)
            self._records += 1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self._recording:
            return
        _set_recording(pl_module, False)
        records = _records(pl_module)
        step = trainer.global_step - 1  # the step whose forward and backward were recorded
        self._write_csv(step, records)
        summary = {**self.summary(records), **self.qat_state(records)}
        # straight to the loggers: logged through the module, Lightning repeats a callback's value every step
        for lg in trainer.loggers:
            lg.log_metrics(summary, step=step)
        self._log_wandb(trainer, step, records)

    @staticmethod
    def summary(records: list[tuple[str, str, dict[str, float]]]) -> dict[str, float]:
        """Worst values over all layers, overall and per operand kind (``fprop.x``, ``wgrad.dy``, ...)."""
        out: dict[str, float] = {}
        groups: dict[str, list[dict[str, float]]] = {"": [s for _, _, s in records]}
        for _, op, stats in records:
            groups.setdefault(f"{op}/", []).append(stats)
        for prefix, stats in groups.items():
            if not stats:
                continue
            snrs = [s["snr_db"] for s in stats if not math.isnan(s["snr_db"])]
            out[f"health/{prefix}snr_db_min"] = min(snrs) if snrs else math.nan
            out[f"health/{prefix}underflow_max"] = max(s["underflow"] for s in stats)
            out[f"health/{prefix}saturation_max"] = max(s["saturation"] for s in stats)
        return out

    @staticmethod
    def qat_state(records: list[tuple[str, str, dict[str, float]]]) -> dict[str, float]:
        """The QAT quantizers' learned state per layer and operand: ``qat/scale_mean/<layer>.<operand>``
        (LSQ, static), ``qat/frac_bits/<layer>.<operand>`` (QFX)."""
        return {
            f"qat/{key}/{name}.{op}": stats[key] for name, op, stats in records for key in QAT_FIELDS if key in stats
        }

    def _write_csv(self, step: int, records: list[tuple[str, str, dict[str, float]]]) -> None:
        if self.path is None:
            return
        new = not self.path.exists()
        with open(self.path, "a", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(("step", "layer", "operand", *HEALTH_FIELDS))
            for name, op, stats in records:
                writer.writerow((step, name, op, *(f"{stats[k]:.6g}" for k in HEALTH_FIELDS)))

    def _log_wandb(self, trainer, step: int, records: list[tuple[str, str, dict[str, float]]]) -> None:
        from lightning.pytorch.loggers import WandbLogger

        for lg in trainer.loggers:
            if not isinstance(lg, WandbLogger):
                continue
            import wandb

            ranked = sorted(records, key=lambda r: _badness(r[2]))[: self.top_k]
            table = wandb.Table(columns=["layer", "operand", *HEALTH_FIELDS])
            for name, op, stats in ranked:
                table.add_data(name, op, *(stats[k] for k in HEALTH_FIELDS))
            snrs = [s["snr_db"] for _, _, s in records if math.isfinite(s["snr_db"])]
            payload: dict[str, Any] = {"health/worst_layers": table, "trainer/global_step": step}
            if snrs:
                payload["health/snr_db_hist"] = wandb.Histogram(snrs)
            payload["health/underflow_hist"] = wandb.Histogram([s["underflow"] for _, _, s in records])
            lg.experiment.log(payload)  # W&B's own step moves on; the x axis is trainer/global_step, as Lightning logs


class StopOnNonFinite(L.Callback):
    """Stop before an optimizer step whose loss or gradients are not finite (see module doc)."""

    def __init__(self, checkpoint: str | Path | None = None) -> None:
        self.checkpoint = None if checkpoint is None else Path(checkpoint)
        self._batch: Any = None
        self._batch_idx = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._batch, self._batch_idx = batch, batch_idx

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        loss = trainer.callback_metrics.get("train/loss")
        finite_loss = loss is None or bool(torch.isfinite(loss))
        finite_grads = not grads or bool(torch.isfinite(torch.nn.utils.get_total_norm(grads)))
        if finite_loss and finite_grads:
            return
        what = "loss" if not finite_loss else "gradients"
        worst = self._diagnose(trainer, pl_module)
        where = f"; worst quantized operands: {'; '.join(worst)}" if worst else ""
        saved = self.checkpoint if self.checkpoint is not None and self.checkpoint.is_file() else None
        resume = f"; last checkpoint (finite weights): {saved}" if saved else ""
        raise LowbitError(f"non-finite {what} at step {trainer.global_step}{where}{resume}")

    def _diagnose(self, trainer, pl_module) -> list[str]:
        """Re-run this step's forward with health recording on; the worst operands, described."""
        if not health_layers(pl_module) or self._batch is None:
            return []
        _set_recording(pl_module, True, compiled=False)  # one record: nothing worth compiling
        try:
            with torch.no_grad(), trainer.precision_plugin.forward_context():
                pl_module.training_step(self._batch, self._batch_idx)
        finally:
            _set_recording(pl_module, False)
        return worst_layers(_records(pl_module))
