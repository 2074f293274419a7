"""``lowbit bench comm``: the bytes each rank sends per training step under FSDP2, per precision,
with the quantized all-gather (``lowbit.quant.gather``) and without it.

Each row is ``train RECIPE trainer.devices=2 trainer.strategy=fsdp`` for a few steps (the same
command a user runs, in a subprocess: Lightning starts the second process), its bytes read from the
``comm/all_gather_mb`` and ``comm/reduce_scatter_mb`` columns the ``CommBytes`` callback logs. Bytes
depend on the model and the precision, not on the machine: two processes on two CPU cores is no
scaling result, the bytes ratio is. The losses of the quantized and the plain all-gather are
compared step by step: the same quantized weight either way, so the same steps.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

from lowbit.bench._report import markdown_table, write_report
from lowbit.errors import LowbitError

__all__ = ["main"]

RECIPES = {"bf16": "bf16_llm", "fp8": "fp8_llm", "mxfp4": "mxfp4_llm", "nvfp4": "nvfp4_llm"}
_PLAIN_ONLY = {"bf16": "FP32 (plain)", "mxfp4": "FP32: W and Wᵀ blocks differ"}  # nothing gathers quantized
_EXACT = {  # rounding that is the same on every rank and run, so two runs' losses can be compared exactly
    "nvfp4": ["precision.dgrad.dy.rounding=rne", "precision.wgrad.dy.rounding=rne"],
    "mxfp4": ["precision.dgrad.dy.rounding=rne", "precision.wgrad.dy.rounding=rne"],
}


def _train(run_dir: Path, args: list[str], echo) -> dict[str, dict[int, float]]:
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore"}
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "MASTER_PORT"):
        env.pop(name, None)
    if run_dir.exists():  # the bench's own folder from an earlier bench: measured again
        shutil.rmtree(run_dir)
    cmd = [str(Path(sys.executable).with_name("train")), *args, f"hydra.run.dir={run_dir}"]
    echo(f"[comm] {' '.join(cmd[1:])}")
    result = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise LowbitError(f"lowbit bench comm: a run failed ({' '.join(args)}): {result.stderr.strip()[-2000:]}")
    columns: dict[str, dict[int, float]] = {}
    with open(run_dir / "csv" / "metrics.csv") as f:
        for row in csv.DictReader(f):
            for name in ("train/loss", "comm/all_gather_mb", "comm/reduce_scatter_mb"):
                if row.get(name):
                    columns.setdefault(name, {})[int(row["step"])] = float(row[name])
    return columns


def _per_step(column: dict[int, float]) -> float:
    """MiB a step, averaged over the steps after the first (the first differs: FSDP2 learns the order of
    its backward all-gathers during it)."""
    later = [v for k, v in sorted(column.items()) if k > 0] or list(column.values())
    return sum(later) / len(later)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lowbit bench comm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--precisions", default="bf16,fp8,nvfp4,mxfp4", help=f"from: {', '.join(RECIPES)}")
    parser.add_argument("--steps", type=int, default=4, help="training steps per run")
    parser.add_argument("--devices", type=int, default=2, help="processes (FSDP2 shards)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/comm"), help="output folder")
    parser.add_argument("overrides", nargs="*", help="config overrides for every run (model.dim=256 ...)")
    args = parser.parse_args(argv)
    names = args.precisions.split(",")
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        raise LowbitError(f"unknown comm bench precision '{unknown[0]}'; valid: {', '.join(RECIPES)}")
    if args.steps < 2 or args.devices < 2:
        raise LowbitError(f"--steps and --devices must be at least 2, got {args.steps} and {args.devices}")
    args.out.mkdir(parents=True, exist_ok=True)
    echo = lambda m: print(m, file=sys.stderr)  # noqa: E731
    common = [
        f"trainer.max_steps={args.steps}",
        f"trainer.val_check_interval={args.steps}",
        f"trainer.devices={args.devices}",
        "trainer.strategy=fsdp",
        "trainer.accelerator=cpu",
        "trainer.limit_val_batches=1",  # validation is not counted; one batch keeps it short
        "trainer.log_every_n_steps=1",
        "logger.wandb=false",
        *args.overrides,
    ]
    rows, baseline = [], None
    for name in names:
        runs = {}
        for quantized in (True, False) if name not in _PLAIN_ONLY else (False,):
            run_dir = (args.out / f"{name}-{'quantized' if quantized else 'plain'}").resolve()
            extra = [] if name in _PLAIN_ONLY else [f"precision.quantized_all_gather={str(quantized).lower()}"]
            runs[quantized] = _train(run_dir, [f"recipe={RECIPES[name]}", *common, *_EXACT.get(name, []), *extra], echo)
        plain = runs[False]
        baseline = baseline if baseline is not None else _per_step(plain["comm/all_gather_mb"])
        for quantized, cols in sorted(runs.items(), reverse=True):
            gathered = _per_step(cols["comm/all_gather_mb"])
            same = "—"
            if quantized:
                diff = max(abs(cols["train/loss"][k] - plain["train/loss"][k]) for k in plain["train/loss"])
                same = "identical" if diff == 0 else f"max diff {diff:.1e}"
            rows.append(
                {
                    "precision": name,
                    "all-gather": "quantized" if quantized else _PLAIN_ONLY.get(name, "FP32 (plain)"),
                    "all-gather MiB/step": f"{gathered:.3f}",
                    f"vs {names[0]}": f"{gathered / baseline:.3f}x",
                    "reduce-scatter MiB/step": f"{_per_step(cols['comm/reduce_scatter_mb']):.3f}",
                    "losses vs plain": same,
                }
            )
    table = markdown_table(list(rows[0]), [list(r.values()) for r in rows])
    write_report("comm", argv, table, args.out, lambda path: _plot(rows, path))
    return 0


def _plot(rows: list[dict[str, str]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.2))
    labels = [f"{r['precision']}\n{r['all-gather'].split()[0]}" for r in rows]
    ax.bar(labels, [float(r["all-gather MiB/step"]) for r in rows], color="tab:blue")
    ax.set_ylabel("all-gather MiB / step / rank")
    ax.set_title("FSDP2 all-gather bytes per rank")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
