"""``lowbit bench speed``: what training with each precision (and positional encoding) costs
against the first one, measured in one run, the way ``train`` runs.

Every configuration is the same recipe with ``precision=P posenc=E`` swapped in and runs, in a
Python process of its own, through ``lowbit.run.train`` itself: the same Trainer, callbacks
(health, checkpoints, throughput, the NaN guard, SR seeding), CSV logger, data loaders and
validation as a ``train`` command, in a run directory that the bench removes. It trains
``--warmup + --steps`` optimizer steps and validates on ``--val-batches`` batches at the last
step and once more as ``train`` ends. Per configuration:

  train ms/step  wall time from one optimizer step's start to the next's, validation excluded
                 (data loading, forward, backward, optimizer, callbacks, logging): the mean over
                 the steps after the warm-up
  val ms/batch   the last validation loop's wall time over its batches (the sanity check and the
                 validation at the last step have compiled what it needs)
  first step s   from the process's start (Python, imports, model, Trainer, sanity-check validation)
                 to the end of the first optimizer step, compilation included (with the compile
                 caches on disk as earlier runs left them)
  peak RSS MB    the process's resident peak (Linux's VmHWM)
  saved MB       the bytes one training forward saves for backward (``saved_tensors_hooks``; exact)

and on CUDA the peak allocated memory. The sweep repeats ``--rounds`` times in turn and each
configuration reports the median of its rounds, so a slow spell on a shared machine hits every
configuration alike. ``--contend N`` keeps N other CPU-bound processes (a one-thread matmul loop
each) running throughout: what a machine shared with other work does to each precision.
``--cold-cache`` compiles every run from empty inductor and Triton caches: the first step on a
fresh machine.

``--profile DIR``: one more round first, under ``torch.profiler`` and not counted in the table: a
Chrome trace of each configuration's timed steps in DIR and the 15 ops with the most self time
printed, so where the time goes is seen, not guessed.

With ``trainer.devices=N`` (``trainer.strategy=ddp|fsdp``) Lightning starts the other N-1 processes
for each configuration's process by running its command again; rank 0 times its steps (which wait
for the collectives).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch

from lowbit.bench._report import device_name, markdown_table
from lowbit.distributed import world
from lowbit.errors import LowbitError

__all__ = ["Measurement", "RunTimer", "SpeedResult", "contention", "main", "measure", "measure_process"]


@dataclass
class Measurement:
    """One configuration's run: seconds per timed step, per validation batch, to the first step."""

    step_s: list[float]
    val_s: float
    first_step_s: float  # from train's start
    first_step_at: float  # the first step's end, seconds since the epoch (time.time())
    saved_mb: float
    peak_rss_mb: float | None  # None where the resident peak cannot be reset (not Linux)
    peak_cuda_mb: float | None  # None off CUDA
    quantized: str


@dataclass
class SpeedResult:
    """Measurements of one configuration; ``step_ms``, ``val_ms``, ``first_s``, ``rss_mb``: one value per round."""

    precision: str
    posenc: str
    step_ms: list[float] = field(default_factory=list)
    val_ms: list[float] = field(default_factory=list)
    rss_mb: list[float] = field(default_factory=list)
    first_s: list[float] = field(default_factory=list)
    saved_mb: float = 0.0
    peak_mb: float | None = None
    quantized: str = ""

    @property
    def median_ms(self) -> float:
        return statistics.median(self.step_ms)

    @property
    def median_val_ms(self) -> float:
        return statistics.median(self.val_ms)

    @property
    def median_first_s(self) -> float:
        return statistics.median(self.first_s)

    @property
    def median_rss_mb(self) -> float | None:
        return statistics.median(self.rss_mb) if self.rss_mb else None


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
    with (
        torch.enable_grad(),
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
        precision.forward_context(),
    ):
        task._loss(task(x), y)
    return total


class RunTimer(L.Callback):
    """Times a run as its user sees it: each optimizer step after ``warmup`` from its start to the
    next one's (validation in between taken out), the last validation loop, and the time from its
    creation to the end of the first optimizer step."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.start = time.perf_counter()
        self.first_step_s: float | None = None
        self.first_step_at = 0.0  # time.time() then
        self.step_s: list[float] = []
        self.val_s = 0.0  # per batch, the last validation loop's
        self.trainer: L.Trainer | None = None
        self._marks: list[float] = []  # step starts on a clock that stops during validation
        self._validating = 0.0  # seconds spent validating so far
        self._val_start = 0.0
        self._step = -1

    @staticmethod
    def _now(module) -> float:
        if module.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_fit_start(self, trainer, pl_module) -> None:
        self.trainer = trainer

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        # a step's first batch (gradient accumulation runs several per step)
        if trainer.global_step != self._step:
            self._step = trainer.global_step
            if self._step >= self.warmup:
                self._marks.append(self._now(pl_module) - self._validating)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.first_step_s is None and trainer.global_step >= 1:
            self.first_step_s = self._now(pl_module) - self.start
            self.first_step_at = time.time()

    def on_train_end(self, trainer, pl_module) -> None:
        marks = [*self._marks, self._now(pl_module) - self._validating]
        self.step_s = [b - a for a, b in zip(marks, marks[1:], strict=False)]

    def on_validation_start(self, trainer, pl_module) -> None:
        self._val_start = self._now(pl_module)

    def on_validation_end(self, trainer, pl_module) -> None:
        seconds = self._now(pl_module) - self._val_start
        self._validating += seconds
        batches = sum(trainer.num_sanity_val_batches if trainer.sanity_checking else trainer.num_val_batches)
        if not trainer.sanity_checking and batches:
            self.val_s = seconds / batches


def _reset_peak_rss() -> bool:
    """Reset the process's resident-set peak (Linux's ``clear_refs``); False where it cannot."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError("/proc/self/status has no VmHWM")


def _spin(seed: int) -> None:  # pragma: no cover (runs in the contending processes)
    """A CPU-bound loop on one thread, until terminated: another job on the machine."""
    torch.set_num_threads(1)
    a = torch.randn(256, 256, generator=torch.Generator().manual_seed(seed))
    while True:
        torch.mm(a, a.t()).tanh_()


@contextlib.contextmanager
def contention(processes: int) -> Iterator[None]:
    """``processes`` other CPU-bound processes running while the block runs (none for 0)."""
    spawn = multiprocessing.get_context("spawn")
    workers = [spawn.Process(target=_spin, args=(i,), daemon=True) for i in range(processes)]
    for w in workers:
        w.start()
    try:
        yield
    finally:
        for w in workers:
            w.terminate()
            w.join()


def measure(
    overrides: list[str],
    steps: int,
    warmup: int,
    profile: Path | None = None,
    val_batches: int = 8,
    run_dir: Path | None = None,
) -> Measurement:
    """Run ``train`` on one configuration for ``warmup + steps`` optimizer steps in ``run_dir`` (a
    temporary directory if None; removed afterwards) and time it (see the module doc); with
    ``profile``, also a profiler trace of the timed steps there and their top ops printed."""
    from lowbit.config import compose
    from lowbit.run import train

    total = warmup + steps
    with contextlib.ExitStack() as stack:
        if run_dir is None:
            run_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="lowbit-speed-"))) / "run"
        run = [
            f"trainer.max_steps={total}",
            f"trainer.val_check_interval={total}",  # validation once training is done, and as train ends
            f"trainer.limit_val_batches={val_batches}",
            "trainer.enable_progress_bar=false",
            "trainer.enable_model_summary=false",
            f"hydra.run.dir={run_dir}",
        ]
        composed = compose([*overrides, *run])
        rss = _reset_peak_rss()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        timer = RunTimer(warmup)
        profiler = Profile(warmup, steps, profile) if profile is not None else None
        train(composed, echo=lambda *_: None, callbacks=[timer] + ([profiler] if profiler else []))
        peak_rss = _peak_rss_mb() if rss else None
        cuda = timer.trainer.strategy.root_device.type == "cuda"
        peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
        if profiler is not None and world()[0] == 0:
            print(f"profile of {' '.join(overrides)}: trace {profile}\n{profiler.top}", file=sys.stderr)
        task, trainer = timer.trainer.lightning_module, timer.trainer
        batch = next(iter(trainer.datamodule.train_dataloader()))
        batch = [t.to(task.device) for t in batch]
        task.train()
        saved = _saved_bytes(task, batch, trainer.precision_plugin) / 2**20
        description = getattr(trainer.precision_plugin, "description", "")
    return Measurement(
        timer.step_s, timer.val_s, timer.first_step_s, timer.first_step_at, saved, peak_rss, peak, description
    )


def measure_process(
    overrides: list[str],
    steps: int,
    warmup: int,
    profile: Path | None,
    val_batches: int,
    run_dir: Path,
    cold_cache: bool = False,
) -> Measurement:
    """``measure`` in a Python process of its own, as a ``train`` command runs: nothing another
    configuration compiled or allocated is in it, and ``first_step_s`` counts from the process's
    start (Python, imports, model, compile). ``cold_cache``: inductor and Triton compile into empty
    cache folders (beside ``run_dir``), as on a fresh machine. The process's output passes through."""
    kwargs = {
        "overrides": overrides,
        "steps": steps,
        "warmup": warmup,
        "profile": str(profile) if profile else None,
        "val_batches": val_batches,
        "run_dir": str(run_dir),
    }
    result = run_dir.with_name(run_dir.name + ".json")
    env = dict(os.environ)
    if cold_cache:
        cache = run_dir.with_name(run_dir.name + ".cache")
        env.update(TORCHINDUCTOR_CACHE_DIR=str(cache / "inductor"), TRITON_CACHE_DIR=str(cache / "triton"))
    start = time.time()
    cmd = [sys.executable, "-m", "lowbit.bench._speed_child", json.dumps(kwargs), str(result)]
    code = subprocess.run(cmd, check=False, env=env).returncode
    if code != 0 or not result.exists():
        raise LowbitError(f"bench speed: the run of {' '.join(overrides)} failed (exit {code}); its output is above")
    m = Measurement(**json.loads(result.read_text()))
    m.first_step_s = m.first_step_at - start
    return m


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


def run(
    recipe: str,
    precisions: list[str],
    posencs: list[str],
    steps: int,
    warmup: int,
    rounds: int,
    extra: list[str],
    profile: Path | None = None,
    val_batches: int = 8,
    contend: int = 0,
    cold_cache: bool = False,
) -> list[SpeedResult]:
    """Measure every (precision, posenc) pair ``rounds`` times, in turn; with ``profile`` (a folder), one
    more round first, profiled and not counted, one trace per pair (``<precision>-<posenc>.json``);
    with ``contend``, that many CPU-bound processes running all along; with ``cold_cache``, every run
    compiles from empty caches. Each run is a process of its own."""
    results = {(p, e): SpeedResult(p, e) for p in precisions for e in posencs}
    first = 0 if profile is None else -1  # round -1: profiled, its times (with the profiler's cost) not counted
    root = Path(tempfile.mkdtemp(prefix="lowbit-speed-"))
    try:
        with contention(contend):
            for r in range(first, rounds):
                for (p, e), res in results.items():
                    overrides = [f"recipe={recipe}", f"precision={p}", f"posenc={e}", "logger=csv", *extra]
                    trace = profile / f"{p}-{e}.json" if r < 0 else None
                    run_dir = root / f"round{r + 1}-{p}-{e}"
                    m = measure_process(overrides, steps, warmup, trace, val_batches, run_dir, cold_cache)
                    res.saved_mb, res.peak_mb, res.quantized = m.saved_mb, m.peak_cuda_mb, m.quantized
                    if r < 0:
                        continue
                    res.first_s.append(m.first_step_s)
                    res.step_ms.append(1e3 * statistics.fmean(m.step_s))
                    res.val_ms.append(1e3 * m.val_s)
                    if m.peak_rss_mb is not None:
                        res.rss_mb.append(m.peak_rss_mb)
                    print(
                        f"round {r + 1}/{rounds} precision={p} posenc={e}: {res.step_ms[-1]:.1f} ms/step, "
                        f"validation {res.val_ms[-1]:.1f} ms/batch, first step after {res.first_s[-1]:.1f} s",
                        file=sys.stderr,
                    )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return list(results.values())


def table(results: list[SpeedResult]) -> str:
    """Markdown: one row per configuration, each measure with its ratio to the first configuration's."""
    base = results[0]
    header = ["precision", "posenc", "train ms/step", "×", "val ms/batch", "×", "first step s"]
    rss = base.median_rss_mb is not None
    cuda = base.peak_mb is not None
    header += (["peak RSS MB", "×"] if rss else []) + ["saved for backward MB", "×"]
    header += ["peak CUDA MB", "×"] if cuda else []
    rows = []
    for r in results:
        row = [
            r.precision,
            r.posenc,
            f"{r.median_ms:.1f}",
            f"{r.median_ms / base.median_ms:.2f}",
            f"{r.median_val_ms:.1f}",
            f"{r.median_val_ms / base.median_val_ms:.2f}",
            f"{r.median_first_s:.1f}",
        ]
        if rss:
            row += [f"{r.median_rss_mb:.0f}", f"{r.median_rss_mb / base.median_rss_mb:.2f}"]
        row += [f"{r.saved_mb:.1f}", f"{r.saved_mb / base.saved_mb:.2f}"]
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
    parser.add_argument("--val-batches", type=int, default=8, help="batches per validation")
    parser.add_argument(
        "--contend", type=int, default=0, metavar="N", help="N other CPU-bound processes running throughout"
    )
    parser.add_argument(
        "--cold-cache",
        action="store_true",
        help="compile every run from empty inductor/Triton caches, as on a fresh machine (first step)",
    )
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
    for name in ("steps", "rounds", "val_batches"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    for name in ("warmup", "contend"):
        if getattr(args, name) < 0:
            parser.error(f"--{name} must be 0 or more, got {getattr(args, name)}")
    results = run(
        args.recipe,
        args.precisions.split(","),
        args.posencs.split(","),
        args.steps,
        args.warmup,
        args.rounds,
        args.overrides,
        args.profile,
        args.val_batches,
        args.contend,
        args.cold_cache,
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
