"""Loss against the BF16 baseline: when a finished BF16 run of the same experiment exists, log
its training loss at the same steps and the relative gap, so W&B (and the CSV) show the quantized
run's loss next to its baseline on one panel.

The baseline is found by ``lowbit.experiment.find_baseline``: a finished BF16 run with the same
fingerprint (model, posenc, data, task, optimizer, schedule, budget) under the given roots, the
same seed preferred, else the newest. A smoke run of another model is never matched.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L

from lowbit.experiment import describe_run, experiment_name, find_baseline, load_run

__all__ = ["BaselineLoss"]


class BaselineLoss(L.Callback):
    """Logs ``compare/bf16_train_loss`` and ``compare/gap_to_bf16`` ((loss - bf16) / bf16) at every
    step the baseline logged a training loss; at the end, with a WandbLogger, a line chart of both
    losses and a table (step, loss, bf16 loss, gap). Does nothing for a BF16 run or without a
    baseline. ``description`` says in one line which baseline is used, or why none."""

    def __init__(self, cfg: dict[str, Any], roots: Sequence[Path], run_dir: Path | None = None) -> None:
        self.name = str((cfg.get("precision") or {}).get("name", "?"))
        self.baseline_dir = None if self.name == "bf16" else find_baseline(cfg, roots, exclude=run_dir)
        self.losses = load_run(self.baseline_dir).train_loss if self.baseline_dir else {}
        self.mine: dict[int, float] = {}
        if self.baseline_dir is not None:
            self.description = f"baseline: {describe_run(self.baseline_dir)}"
        elif self.name == "bf16":
            self.description = f"baseline: none, this bf16 run is the baseline of {experiment_name(cfg)}"
        else:
            where = ", ".join(str(r) for r in roots) or "(no folders)"
            self.description = f"baseline: none, no finished bf16 run of {experiment_name(cfg)} under {where}"

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step - 1  # the step the task just logged its loss under
        base = self.losses.get(step)
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if base is None or loss is None:
            return
        loss = float(loss)
        self.mine[step] = loss
        pl_module.log_dict({"compare/bf16_train_loss": base, "compare/gap_to_bf16": (loss - base) / base})

    def rows(self) -> list[tuple[int, float, float, float]]:
        """(step, loss, bf16 loss, relative gap) at every step both runs logged."""
        return [
            (s, self.mine[s], self.losses[s], (self.mine[s] - self.losses[s]) / self.losses[s])
            for s in sorted(self.mine)
        ]

    def on_train_end(self, trainer, pl_module) -> None:
        """One W&B panel with both curves and a table of the numbers behind it."""
        from lightning.pytorch.loggers import WandbLogger

        rows = self.rows()
        loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if not rows or not loggers:
            return
        import wandb

        steps = [r[0] for r in rows]
        ys = [[r[1] for r in rows], [r[2] for r in rows]]
        table = wandb.Table(columns=["step", "loss", "bf16 loss", "gap"], data=[list(r) for r in rows])
        for lg in loggers:
            chart = wandb.plot.line_series(
                xs=steps, ys=ys, keys=[self.name, "bf16"], title="train loss vs BF16", xname="step"
            )
            lg.experiment.log({"compare/loss_vs_bf16": chart, "compare/vs_bf16": table})
