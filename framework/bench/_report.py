"""What every bench report shares: the device in words, a markdown table (``lowbit.compare``'s) and
training a config once."""

from __future__ import annotations

import csv
import datetime as dt
import platform
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from omegaconf import DictConfig

from lowbit.compare import markdown_table

__all__ = ["device_name", "finished_val_loss", "markdown_table", "train_once", "write_report"]


def device_name() -> str:
    """``NVIDIA H100 80GB HBM3`` on a GPU; ``N CPU cores (machine)`` otherwise."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    import os

    return f"{len(os.sched_getaffinity(0))} CPU cores ({platform.machine()}), no GPU, torch {torch.__version__.split('+')[0]}"


_DISPLAY_ONLY = ("enable_progress_bar", "enable_model_summary")  # trainer keys that change no number


def finished_val_loss(run_dir: Path, cfg: DictConfig) -> float | None:
    """The final ``val/loss`` of a run already trained in ``run_dir`` with exactly the config ``cfg``.

    None when there is no such run: no saved config, a different one (the run is redone rather
    than mixed into a table it does not belong to), or training that stopped before its last step.
    """
    import yaml

    from lowbit.config import to_yaml

    config, metrics = run_dir / "config.yaml", run_dir / "csv" / "metrics.csv"
    if not (config.is_file() and metrics.is_file()):
        return None
    saved, wanted = yaml.safe_load(config.read_text()), yaml.safe_load(to_yaml(cfg))
    for c in (saved, wanted):
        for key in _DISPLAY_ONLY:
            c["trainer"].pop(key, None)
    if saved != wanted:
        return None
    with open(metrics) as f:
        rows = [r for r in csv.DictReader(f) if r.get("val/loss")]
    if not rows or int(rows[-1]["step"]) < cfg.trainer.max_steps - 1:
        return None
    return float(rows[-1]["val/loss"])


def train_once(overrides: Sequence[str], run_dir: Path, label: str, echo=print) -> float:
    """Train the config ``overrides`` compose to (its ``run_dir`` among them) and return its final
    ``val/loss``; a run already finished in ``run_dir`` with the same config is read back instead,
    so an interrupted bench picks up where it stopped."""
    from lowbit.config import compose
    from lowbit.run import train

    composed = compose(list(overrides))
    val_loss = finished_val_loss(run_dir, composed.cfg)
    if val_loss is not None:
        echo(f"[{label}] already trained in {run_dir} with this config: val/loss {val_loss:.4f}")
        return val_loss
    if run_dir.exists():  # the bench's own folder: an unfinished run or another config, trained again
        shutil.rmtree(run_dir)
    echo(f"[{label}] train {' '.join(overrides)}")
    start = time.perf_counter()
    val_loss = train(composed, echo=lambda *_: None).metrics.get("val/loss", float("nan"))
    echo(f"[{label}] val/loss {val_loss:.4f} ({time.perf_counter() - start:.0f} s)")
    return val_loss


def write_report(bench: str, argv: Sequence[str] | None, table: str, out: Path, plot: Callable[[Path], None]) -> None:
    """``<out>/<bench>.md`` (the command, date and machine above ``table``) and ``<out>/<bench>.png`` (``plot``),
    and both printed: what every ``lowbit bench`` writes."""
    command = f"lowbit bench {bench} " + " ".join(argv if argv is not None else sys.argv[3:])
    text = f"`{command.strip()}` — {dt.date.today()}, {device_name()}\n\n{table}\n"
    (out / f"{bench}.md").write_text(text)
    plot(out / f"{bench}.png")
    print(text)
    print(f"table: {out / f'{bench}.md'} | plot: {out / f'{bench}.png'}")
