"""``lowbit bench speed``: training step time and memory of each precision (and positional
encoding) against the first one, measured in one run.

Every configuration is the same recipe with ``precision=P posenc=E`` swapped in, trained for
``--warmup + --steps`` optimizer steps by a Lightning Trainer (no validation, no logging). The
step time is the median over steps of forward + backward + optimizer; the whole sweep repeats
``--rounds`` times, in turn, and each configuration reports the median of its round medians,
so a slow spell on a shared machine hits every configuration alike. Memory: the bytes one
forward saves for backward (counted with ``saved_tensors_hooks``; exact on any device) and, on
CUDA, the peak allocated memory of a training step.

``--profile DIR``: one more round first, under ``torch.profiler`` and not counted in the table: a
Chrome trace of each configuration's timed steps in DIR and the 15 ops with the most self time
printed, so where the time goes is seen, not guessed.

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
import warnings
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


class Profile(L.Callback):
    """``torch.profiler`` over the ``steps`` timed steps after ``warmup``: a Chrome/TensorBoard trace
    at ``trace`` and the ops that took the most time themselves (``top``, a table of ``rows`` rows)."""

    def __init__(self, warmup: int, steps: int, trace: Path, rows: int = 15) -> None:
        from torch.profiler import ProfilerActivity, profile, schedule

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        self.trace, self.rows, self.top = trace, rows, ""
        self.sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        # the last untimed step warms the profiler up (its first recorded step costs more); none without one
        ramp = min(warmup, 1)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Profiler won't be using warmup")
            plan = schedule(wait=warmup - ramp, warmup=ramp, active=steps, repeat=1)
        self.profiler = profile(activities=activities, schedule=plan, on_trace_ready=self._ready)

    def _ready(self, prof) -> None:
        self.trace.parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(self.trace))
        self.top = prof.key_averages().table(sort_by=self.sort, row_limit=self.rows)

    def on_train_start(self, trainer, pl_module) -> None:
        self.profiler.start()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.profiler.step()

    def on_train_end(self, trainer, pl_module) -> None:
        self.profiler.stop()


def measure(
    overrides: list[str], steps: int, warmup: int, profile: Path | None = None
) -> tuple[list[float], float, float | None, str]:
    """Train one configuration ``warmup + steps`` steps: (step seconds, saved MB, peak MB, precision description);
    with ``profile``, also a profiler trace of the timed steps there and their top ops printed."""
    from lowbit.config import compose
    from lowbit.run import build

    built = build(compose(overrides).cfg)
    timer = StepTimer(warmup)
    profiler = Profile(warmup, steps, profile) if profile is not None else None
    kwargs = {k: v for k, v in built.trainer_kwargs.items() if k not in ("val_check_interval", "limit_val_batches")}
    kwargs.update(max_steps=warmup + steps, enable_progress_bar=False, enable_model_summary=False)
    trainer = L.Trainer(
        **kwargs,
        plugins=[built.precision],
        callbacks=[timer] + ([profiler] if profiler else []),
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
    if profiler is not None and world()[0] == 0:
        print(f"profile of {' '.join(overrides)}: trace {profile}\n{profiler.top}", file=sys.stderr)
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    batch = next(iter(built.data.train_dataloader()))
    batch = [t.to(built.task.device) for t in batch]
    saved = _saved_bytes(built.task, batch, built.precision) / 2**20
    return timer.times, saved, peak, getattr(built.precision, "description", "")


def run(
    recipe: str,
    precisions: list[str],
    posencs: list[str],
    steps: int,
    warmup: int,
    rounds: int,
    extra: list[str],
    profile: Path | None = None,
) -> list[SpeedResult]:
    """Measure every (precision, posenc) pair ``rounds`` times, in turn; with ``profile`` (a folder), one
    more round first, profiled and not counted, one trace per pair (``<precision>-<posenc>.json``)."""
    results = {(p, e): SpeedResult(p, e) for p in precisions for e in posencs}
    first = 0 if profile is None else -1  # round -1: profiled, its times (with the profiler's cost) not counted
    for r in range(first, rounds):
        for (p, e), res in results.items():
            overrides = [f"recipe={recipe}", f"precision={p}", f"posenc={e}", "logger=csv", *extra]
            trace = profile / f"{p}-{e}.json" if r < 0 else None
            times, res.saved_mb, res.peak_mb, res.quantized = measure(overrides, steps, warmup, trace)
            if r < 0:
                continue
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
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        metavar="DIR",
        help="profile the timed steps in one more, uncounted round: a Chrome/TensorBoard trace per configuration in DIR "
        "(chrome://tracing, perfetto.dev) and its 15 ops with the most self time printed",
    )
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
        args.profile,
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
