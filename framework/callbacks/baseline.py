"""Loss against the BF16 baseline: when a finished BF16 run of the same logger group sits beside
this run, log its training loss at the same steps and the relative gap, so W&B (and the CSV)
show the quantized run's loss next to its baseline on one panel.

A baseline is a run directory under the same runs root (``runs/<recipe>/<time>``, two levels up
from this run's directory) whose ``config.yaml`` has the same ``logger.group`` (the recipe name
when unset), ``precision.name: bf16``, and a ``csv/metrics.csv``; the most recent one wins.
"""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import yaml

__all__ = ["BaselineLoss", "find_baseline"]


def _group(cfg: dict, recipe: str | None) -> str:
    return (cfg.get("logger") or {}).get("group") or recipe or "default"


def find_baseline(run_dir: Path, group: str) -> Path | None:
    """The newest BF16 run directory of ``group`` beside ``run_dir`` (not itself), or None."""
    root = run_dir.resolve().parent.parent
    found = []
    for config in root.glob("*/*/config.yaml"):
        other = config.parent
        if other == run_dir.resolve() or not (other / "csv" / "metrics.csv").is_file():
            continue
        cfg = yaml.safe_load(config.read_text()) or {}
        recipe = other.parent.name
        if (cfg.get("precision") or {}).get("name") == "bf16" and _group(cfg, recipe) == group:
            found.append((config.stat().st_mtime, other))
    return max(found)[1] if found else None


def _train_losses(run_dir: Path) -> dict[int, float]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}


class BaselineLoss(L.Callback):
    """Logs ``compare/bf16_train_loss`` and ``compare/gap_to_bf16`` (relative) at every step the
    baseline logged, and at the end a W&B line chart of both losses; does nothing for a BF16 run
    or when no baseline exists."""

    def __init__(self, run_dir: Path, group: str, precision_name: str) -> None:
        self.baseline_dir = None if precision_name == "bf16" else find_baseline(run_dir, group)
        self.losses = _train_losses(self.baseline_dir) if self.baseline_dir else {}
        self.name = precision_name
        self.mine: dict[int, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step - 1  # the step the task just logged its loss under
        base = self.losses.get(step)
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if base is None or loss is None:
            return
        loss = float(loss)
        self.mine[step] = loss
        pl_module.log_dict({"compare/bf16_train_loss": base, "compare/gap_to_bf16": (loss - base) / base})

    def on_train_end(self, trainer, pl_module) -> None:
        """One W&B panel with both curves over the steps both runs logged."""
        from lightning.pytorch.loggers import WandbLogger

        steps = sorted(self.mine)
        for lg in trainer.loggers:
            if isinstance(lg, WandbLogger) and steps:
                import wandb

                ys = [[self.mine[s] for s in steps], [self.losses[s] for s in steps]]
                chart = wandb.plot.line_series(
                    xs=steps, ys=ys, keys=[self.name, "bf16"], title="train loss vs BF16", xname="step"
                )
                lg.experiment.log({"compare/loss_vs_bf16": chart})
