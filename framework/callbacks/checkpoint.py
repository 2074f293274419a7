"""Checkpoint on Ctrl-C: an interrupted run leaves a ``last.ckpt`` that ``resume=`` continues."""

from __future__ import annotations

from pathlib import Path

import lightning as L

__all__ = ["SaveOnInterrupt"]


class SaveOnInterrupt(L.Callback):
    """On KeyboardInterrupt, write ``<dirpath>/last.ckpt`` from the last completed optimizer step.

    Lightning's own ``OnExceptionCheckpoint`` deletes its file again at teardown; this one keeps it.
    """

    def __init__(self, dirpath: str | Path) -> None:
        self.path = Path(dirpath) / "last.ckpt"

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, KeyboardInterrupt):
            # Lightning adds one to its logging step counter on restore, because its own checkpoints
            # are written at batch end, before that counter moves; mirror that state here so a
            # resumed run logs its first step under the right number.
            loop = trainer.fit_loop.epoch_loop
            loop._batches_that_stepped -= 1
            try:
                trainer.save_checkpoint(self.path, weights_only=False)  # the full state: optimizer, loops, callbacks
            finally:
                loop._batches_that_stepped += 1
            print(f"\ninterrupted at step {trainer.global_step}; checkpoint: {self.path}")
