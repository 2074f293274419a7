"""Run directories: one run per directory, continued only by ``resume=``, held by one live process.

A directory holds a run once it has ``config.yaml``, ``checkpoints/`` or ``csv/``. A new run
refuses such a directory (``check_run_dir``); ``resume=DIR`` continues in it. ``RunLock`` writes
``.lock`` (PID, host, start time) for the life of the run: a second live run on the same directory
is refused with one line naming the holder; a lock whose process is gone is taken over with a notice.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shlex
import socket
from pathlib import Path

from lowbit.errors import LowbitError

__all__ = [
    "RUN_FILES",
    "RunLock",
    "check_run_dir",
    "checkpoint_and_run",
    "launched_worker",
    "pid_alive",
    "resume_command",
    "run_dir_of",
]

RUN_FILES = ("config.yaml", "checkpoints", "csv")
"""What makes a directory hold a run (Hydra's own ``.hydra/`` and ``train.log`` do not)."""


def is_sharded(path: str | Path) -> bool:
    """Whether ``path`` is a sharded checkpoint: a folder ``torch.distributed.checkpoint`` wrote
    (FSDP2 under ``trainer.strategy=fsdp``; one shard file per process, ``.metadata`` and ``meta.pt``)."""
    path = Path(path)
    return path.is_dir() and (path / ".metadata").is_file()


def checkpoint_target(source: str | Path) -> Path:
    """The checkpoint a ``resume=``/``init_from=`` value names: a run directory's ``checkpoints/last.ckpt``,
    else the path itself (a checkpoint file, or a sharded checkpoint folder)."""
    path = Path(source).expanduser()
    return path / "checkpoints" / "last.ckpt" if path.is_dir() and not is_sharded(path) else path


def run_dir_of(resume: str) -> Path | None:
    """The run directory a ``resume=`` target belongs to: the directory itself, or the run whose
    ``checkpoints/`` holds the file; None for a checkpoint file kept anywhere else."""
    path = Path(resume).expanduser()
    if path.is_dir() and not is_sharded(path):
        return path
    if path.parent.name == "checkpoints" and (path.parent.parent / "config.yaml").is_file():
        return path.parent.parent
    return None


def launched_worker() -> bool:
    """Whether a distributed launcher started this process beside rank 0 (Lightning's DDP subprocesses set
    ``LOCAL_RANK``; torchrun ``RANK``; multi-node ``NODE_RANK``; ``srun`` ``SLURM_PROCID``): it trains in rank
    0's run directory, which rank 0 checks, locks and writes."""
    names = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID")
    return any(int(os.environ.get(name, "0") or 0) > 0 for name in names)


def checkpoint_and_run(source: str | Path, why: str) -> tuple[Path, Path]:
    """(checkpoint file, run directory) of a checkpoint in a run's ``checkpoints/`` or of a run directory
    (its ``checkpoints/last.ckpt``), or one LowbitError; ``why`` says what the run's config.yaml is for."""
    path = Path(source).expanduser()
    ckpt = checkpoint_target(path)
    if not ckpt.is_file() and not is_sharded(ckpt):
        raise LowbitError(
            f"no checkpoint at {ckpt}; give a .ckpt file in a run's checkpoints/ or a run directory with checkpoints/last.ckpt"
        )
    run_dir = run_dir_of(str(path))
    if run_dir is None or not (run_dir / "config.yaml").is_file():
        raise LowbitError(
            f"{source} belongs to no run directory with a config.yaml (RUN/checkpoints/*.ckpt beside RUN/config.yaml); "
            f"{why}"
        )
    return ckpt, run_dir


def check_run_dir(run_dir: Path, resume: str | None) -> None:
    """A run never writes into a directory holding another run: only ``resume=`` that run continues there."""
    if resume and (source := run_dir_of(resume)) is not None and source.resolve() == run_dir.resolve():
        return
    held = [name for name in RUN_FILES if (run_dir / name).exists()]
    if held:
        raise LowbitError(
            f"{run_dir} already holds a run ({', '.join(held)}); continue it with resume={shlex.quote(str(run_dir))}, "
            "or choose another hydra.run.dir"
        )


def resume_command(composed, run_dir: Path) -> str:
    """The shell command that continues this run in place (quoted for a POSIX shell)."""
    keep = [o for o in composed.overrides if not o.startswith(("resume=", "hydra.run.dir=", "hydra.output_subdir="))]
    return shlex.join(["train", *keep, f"resume={run_dir}"])


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host; True where that cannot be told (not POSIX, another
    user's process), so nothing of a possibly live process is taken or removed."""
    if os.name != "posix":
        return True  # os.kill(pid, 0) is no probe on Windows
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


class RunLock:
    """``<run_dir>/.lock`` while a run writes there (a context manager)."""

    def __init__(self, run_dir: Path, notice=print) -> None:
        self.path = Path(run_dir) / ".lock"
        self.notice = notice

    def __enter__(self) -> RunLock:
        mine = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": _dt.datetime.now().isoformat(timespec="seconds"),
        }
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(mine, f)
            return self

    def _take_over_if_stale(self) -> None:
        try:
            holder = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            holder = {}
        pid, host = holder.get("pid"), holder.get("host")
        live = isinstance(pid, int) and (host != socket.gethostname() or pid_alive(pid))
        if live:
            raise LowbitError(
                f"{self.path.parent} is in use by PID {pid} on {host} (since {holder.get('started', '?')}); "
                f"wait for it to finish, or delete {self.path} if that process is gone"
            )
        self.notice(f"notice: taking over the stale lock of {self.path.parent} (PID {pid} on {host} is gone)")
        self.path.unlink(missing_ok=True)

    def __exit__(self, *exc) -> None:
        self.path.unlink(missing_ok=True)
