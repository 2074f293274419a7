"""``lowbit bench speed``: training step time and memory of each precision (and positional
encoding) against the first one, measured in one run.

Every configuration is the same recipe with ``precision=P posenc=E`` swapped in, trained for
``--warmup + --steps`` optimizer steps by a Lightning Trainer (no validation, no logging). The
step time is the median over steps of forward + backward + optimizer; the whole sweep repeats
``--rounds`` times, in turn, and each configuration reports the median of its round medians,
so a slow spell on a shared machine hits every configuration alike. Memory: the bytes one
forward saves for backward (counted with ``saved_tensors_hooks``; exact on any device) and, on
CUDA, the peak allocated memory of a training step.

With ``trainer.devices=N`` (``trainer.strategy=ddp|fsdp``) Lightning starts the other N-1 processes
by running the same command again; every rank trains every configuration in the same order and
rank 0 times its steps (which wait for the collectives) and prints the table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch

from lowbit.bench._report import device_name, markdown_table
from lowbit.distributed import world

__all__ = ["SpeedResult", "StepTimer", "main", "measure"]


@dataclass
class SpeedResult:
    """Measurements of one configuration; ``step_ms`` holds one median per round."""

    precision: str
    posenc: str
    step_ms: list[float] = field(default_factory=list)
    saved_mb: float = 0.0
    peak_mb: float | None = None
    quantized: str = ""

    @property
    def median_ms(self) -> float:
        return statistics.median(self.step_ms)


def _saved_bytes(task, batch, precision) -> int:
    """Bytes of the tensors one training forward saves for backward (parameters excluded)."""
    params = {p.data_ptr() for p in task.parameters()}
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        if t.data_ptr() not in params:
            total += t.numel() * t.element_size()
        return t

    x, y = batch
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), precision.forward_context():
        task._loss(task(x), y)
    return total


class StepTimer(L.Callback):
    """Wall time of each training step after the first ``warmup`` steps."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.times: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()
        if trainer.global_step > self.warmup:
            self.times.append(time.perf_counter() - self._start)


def measure(overrides: list[str], steps: int, warmup: int) -> tuple[list[float], float, float | None, str]:
    """Train one configuration ``warmup + steps`` steps: (step seconds, saved MB, peak MB, precision description)."""
    from lowbit.config import compose
    from lowbit.run import build

    built = build(compose(overrides).cfg)
    timer = StepTimer(warmup)
    kwargs = {k: v for k, v in built.trainer_kwargs.items() if k not in ("val_check_interval", "limit_val_batches")}
    kwargs.update(max_steps=warmup + steps, enable_progress_bar=False, enable_model_summary=False)
    trainer = L.Trainer(
        **kwargs,
        plugins=[built.precision],
        callbacks=[timer],
        logger=False,
        enable_checkpointing=False,
        limit_val_batches=0,
        max_epochs=-1,
        use_distributed_sampler=not getattr(built.data, "shards_by_rank", False),  # as train: each rank its slice
    )
    cuda = trainer.strategy.root_device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.fit(built.task, datamodule=built.data)
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    batch = next(iter(built.data.train_dataloader()))
    batch = [t.to(built.task.device) for t in batch]
    saved = _saved_bytes(built.task, batch, built.precision) / 2**20
    return timer.times, saved, peak, getattr(built.precision, "description", "")


def run(
    recipe: str, precisions: list[str], posencs: list[str], steps: int, warmup: int, rounds: int, extra: list[str]
) -> list[SpeedResult]:
    """Measure every (precision, posenc) pair ``rounds`` times, in turn."""
    results = {(p, e): SpeedResult(p, e) for p in precisions for e in posencs}
    for r in range(rounds):
        for (p, e), res in results.items():
            overrides = [f"recipe={recipe}", f"precision={p}", f"posenc={e}", "logger=csv", *extra]
            times, res.saved_mb, res.peak_mb, res.quantized = measure(overrides, steps, warmup)
            res.step_ms.append(1e3 * statistics.median(times))
            if world()[0] == 0:
                print(
                    f"round {r + 1}/{rounds} precision={p} posenc={e}: {res.step_ms[-1]:.1f} ms/step", file=sys.stderr
                )
    return list(results.values())


def table(results: list[SpeedResult]) -> str:
    """Markdown: step time and memory, each with its ratio to the first configuration."""
    base = results[0]
    header = [
        "precision",
        "posenc",
        "step ms (median)",
        f"× {base.precision}/{base.posenc}",
        "saved for backward MB",
        "×",
    ]
    cuda = base.peak_mb is not None
    if cuda:
        header += ["peak MB", "×"]
    rows = []
    for r in results:
        row = [
            r.precision,
            r.posenc,
            f"{r.median_ms:.1f}",
            f"{r.median_ms / base.median_ms:.2f}",
            f"{r.saved_mb:.1f}",
            f"{r.saved_mb / base.saved_mb:.2f}",
        ]
        if cuda:
            row += [f"{r.peak_mb:.0f}", f"{r.peak_mb / base.peak_mb:.2f}"]
        rows.append(row)
    return markdown_table(header, rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lowbit bench speed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="bf16_llm", help="the recipe every configuration starts from")
    parser.add_argument(
        "--precisions", default="bf16,fp8,mxfp8,mxfp4,nvfp4", help="comma-separated; the first is the baseline"
    )
    parser.add_argument("--posencs", default="rope", help="comma-separated positional encodings")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per configuration and round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--rounds", type=int, default=3, help="times the whole sweep repeats")
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown table here")
    parser.add_argument("overrides", nargs="*", help="config overrides for every configuration (model.dim=256 ...)")
    args = parser.parse_args(argv)
    results = run(
        args.recipe,
        args.precisions.split(","),
        args.posencs.split(","),
        args.steps,
        args.warmup,
        args.rounds,
        args.overrides,
    )
    if world()[0] != 0:  # trainer.devices=N: Lightning ran this command again for each other rank
        return 0
    command = "lowbit bench speed " + " ".join(argv if argv is not None else sys.argv[3:])
    text = f"`{command.strip()}` — {dt.date.today()}, {device_name()}\n\n{table(results)}\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0
