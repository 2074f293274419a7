"""The exceptions that end a run for a reason the user should read: ``LowbitError`` (a one-line
message, exit code 2, no traceback) and ``Preempted`` (a signal, the run saved, exit 128 + signal)."""

import signal
from pathlib import Path

__all__ = ["LowbitError", "Preempted"]


class LowbitError(Exception):
    """A user-facing error: what was wrong, the value, what would be right.

    The CLI prints ``str(err)`` on one line and exits with code 2 (traceback only with
    ``--verbose``). Library code raises it for bad input; bugs stay ordinary exceptions.
    """


class Preempted(Exception):
    """Training stopped on a signal after saving ``checkpoint``; exit with ``exit_code``."""

    def __init__(self, signum: int, step: int, checkpoint: Path) -> None:
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.exit_code = 128 + signum
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; checkpoint: {checkpoint}")
