"""Preemption and Ctrl-C: the run stops at the next step boundary with a ``last.ckpt`` that
``resume=`` continues exactly, and a non-zero exit code a scheduler understands.

SIGTERM (what SLURM and Kubernetes send before killing a job), SIGUSR1 (SLURM's ``--signal``
warning) and a first Ctrl-C (SIGINT) each set a flag; when the optimizer step in flight has
finished, ``last.ckpt`` is written at the same point of the loop as a periodic checkpoint; once
that step has logged (and validated, if due) ``Preempted`` is raised: exit code 128 + the signal (143 for SIGTERM, 138 for SIGUSR1, 130 for
Ctrl-C). A second Ctrl-C stops at once (Python's KeyboardInterrupt), without a new checkpoint.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import lightning as L

from lowbit.errors import LowbitError, Preempted

__all__ = ["Preemption"]

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class Preemption(L.Callback):
    """Turn SIGTERM, SIGUSR1 and a first Ctrl-C into "save ``dirpath/last.ckpt`` after this step, then stop"."""

    def __init__(self, dirpath: str | Path, notice=print) -> None:
        self.path = Path(dirpath) / "last.ckpt"
        self.notice = notice
        self.received: int | None = None
        self._saved_at: int | None = None
        self._previous: dict[int, object] = {}

    def _handler(self, signum: int, frame) -> None:
        # only a flag here: writing to a stream from a signal handler can interrupt a write in progress
        if self.received == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        if self.received is None:
            self.received = signum

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # after Lightning's own SIGTERM handler (set once on_fit_start has run), so this one decides
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for signum in SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handler)

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.received is None or self._saved_at is not None or trainer.fit_loop.epoch_loop._should_accumulate():
            return
        again = " (Ctrl-C again to stop now, without saving)" if self.received == signal.SIGINT else ""
        self.notice(f"{signal.Signals(self.received).name}: saving a checkpoint after this step, then stopping{again}")
        try:
            trainer.save_checkpoint(self.path, weights_only=False)  # where a periodic checkpoint is written
        except LowbitError as err:  # a full disk, say: stop all the same, with the scheduler's exit code
            self.notice(f"error: {err}")
        self._saved_at = trainer.global_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        # stop before the next step: the saved step has logged its metrics (and validated, if due)
        if self._saved_at is not None:
            raise Preempted(self.received, self._saved_at, self.path)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore()
