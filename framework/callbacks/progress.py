"""Progress as one log line per interval, for output that is not a terminal (a file, a pipe, a
SLURM log): Lightning's bar would write a carriage-return update per step there."""

from __future__ import annotations

import logging
import time

from lightning.pytorch.callbacks.progress import ProgressBar

__all__ = ["LineProgress"]

log = logging.getLogger("lowbit.progress")


def _format(metrics: dict[str, object]) -> str:
    parts = []
    for key, value in metrics.items():
        if key == "v_num":
            continue
        try:
            parts.append(f"{key} {float(value):.4g}")
        except (TypeError, ValueError):
            parts.append(f"{key} {value}")
    return " | ".join(parts)


class LineProgress(ProgressBar):
    """``step 40/600 (7%) | 0:00:12 | loss 2.31 | ...`` every ``every_n_steps`` optimizer steps and
    after the last, then one line per validation with its metrics."""

    def __init__(self, every_n_steps: int = 10) -> None:
        super().__init__()
        self.every_n_steps = max(1, int(every_n_steps))
        self._enabled = True
        self._start = time.monotonic()
        self._last_logged = -1

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_start(self, trainer, pl_module) -> None:
        self._start = time.monotonic()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step, total = trainer.global_step, trainer.max_steps
        if not self._enabled or step == self._last_logged or (step % self.every_n_steps and step != total):
            return
        self._last_logged = step
        elapsed = time.strftime("%H:%M:%S", time.gmtime(time.monotonic() - self._start))
        where = f"step {step}/{total} ({100 * step / total:.0f}%)" if total > 0 else f"step {step}"
        metrics = _format(self.get_metrics(trainer, pl_module))
        log.info(" | ".join(part for part in (where, elapsed, metrics) if part))

    def on_validation_end(self, trainer, pl_module) -> None:
        if not self._enabled or trainer.sanity_checking:
            return
        values = {k: v for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        if values:
            log.info(f"validation at step {trainer.global_step}: {_format(values)}")
