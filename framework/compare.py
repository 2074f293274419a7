"""``lowbit compare RUN...`` and ``lowbit plot RUN...``: finished runs side by side against a BF16
baseline, as a markdown table and PNG loss and gap curves.

A RUN is a lowbit run directory (``runs/<name>/<time>``) or a W&B run directory
(``wandb/offline-run-*``). The baseline is ``--baseline`` when given, else a BF16 run among the
RUNs (of the same experiment as the first quantized RUN when there is one), else the finished
BF16 run of the first run's experiment that ``lowbit.experiment.find_baseline`` finds beside it. Gaps are relative: (loss - baseline) /
baseline. The table and plots also serve ``lowbit bench quality``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from lowbit.errors import LowbitError
from lowbit.experiment import Run, baseline_roots, find_baseline, load_run

__all__ = [
    "choose_baseline",
    "compare_main",
    "ema",
    "format_gap",
    "main",
    "legend_labels",
    "markdown_table",
    "plot_curves",
    "plot_main",
    "runs_table",
]

MISSING = "–"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table; cells are written with ``str``."""
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines)


def format_gap(value: float | None, baseline: float | None) -> str:
    """The relative gap in percent with its sign, two decimals: ``+1.23%``; ``–`` when unknown."""
    if value is None or baseline is None or baseline == 0:
        return MISSING
    return f"{100 * (value - baseline) / baseline:+.2f}%"


def ema(values: Sequence[float], smoothing: float) -> list[float]:
    """Exponential moving average with the start-up bias removed (as TensorBoard and W&B smooth):
    ``m_t = s m_{t-1} + (1 - s) x_t``, shown as ``m_t / (1 - s^t)``."""
    out, m = [], 0.0
    for t, x in enumerate(values, start=1):
        m = smoothing * m + (1 - smoothing) * x
        out.append(m / (1 - smoothing**t))
    return out


def runs_table(runs: Sequence[Run], baseline: Run | None) -> str:
    """One row per run: precision, seed, steps run, final val loss, its gap to ``baseline``,
    median throughput and the worst quantization health over the run (``–`` where not logged)."""
    base_loss = baseline.final_val_loss if baseline is not None else None
    rows = []
    for run in runs:
        loss = run.final_val_loss
        speed = run.throughput
        health = run.health
        rows.append(
            [
                f"`{run.path}`" + (" (baseline)" if run is baseline else ""),
                run.precision,
                MISSING if run.seed is None else run.seed,
                run.steps,
                run.fingerprint,
                MISSING if loss is None else f"{loss:.4f}",
                format_gap(loss, base_loss),
                MISSING if speed is None else f"{speed[0]:,.0f} {speed[1]}/s",
                f"{health['underflow_max']:.2%}" if "underflow_max" in health else MISSING,
                f"{health['saturation_max']:.2%}" if "saturation_max" in health else MISSING,
                f"{health['snr_db_min']:.1f}" if "snr_db_min" in health else MISSING,
            ]
        )
    header = ["run", "precision", "seed", "steps", "experiment", "val loss", "gap to baseline", "throughput"]
    return markdown_table([*header, "underflow max", "saturation max", "SNR min (dB)"], rows)


def plot_curves(
    curves: Mapping[str, Mapping[int, float]],
    path: Path,
    baseline: str | None = None,
    *,
    panels: Sequence[str] = ("loss", "gap"),
    points: Mapping[str, Mapping[int, float]] | None = None,
    smoothing: float = 0.9,
    ylabel: str = "train loss",
) -> Path:
    """A PNG of loss curves by label (EMA-smoothed, log scale; ``points``, e.g. validation
    losses, as dots in the same colour) and/or of each curve's gap to ``baseline`` in percent at
    the steps both logged. ``panels``: ``loss``, ``gap`` or both, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [p for p in panels if p != "gap" or baseline is not None]
    if not panels:
        raise ValueError("plot_curves needs a panel: 'loss', or 'gap' with a baseline")
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    colors = {label: f"C{i % 10}" for i, label in enumerate(curves)}  # one colour per run in every panel
    smooth = {}
    for label, curve in curves.items():
        steps = sorted(curve)
        smooth[label] = dict(zip(steps, ema([curve[s] for s in steps], smoothing)))
    for ax, panel in zip(axes[0], panels):
        if panel == "loss":
            for label, curve in smooth.items():
                ax.plot(list(curve), list(curve.values()), label=label, lw=1.2, color=colors[label])
                dots = (points or {}).get(label) or {}
                if dots:
                    ax.plot(list(dots), list(dots.values()), "o", ms=3, color=colors[label])
            ax.set(xlabel="step", ylabel=f"{ylabel} (EMA)", title=ylabel, yscale="log")
        else:
            base = smooth[baseline]
            for label, curve in smooth.items():
                if label == baseline:
                    continue
                steps = sorted(set(curve) & set(base))
                gaps = [100 * (curve[s] - base[s]) / base[s] for s in steps]
                ax.plot(steps, gaps, label=label, lw=1.2, color=colors[label])
            ax.axhline(0, color="k", lw=0.6)
            ax.set(xlabel="step", ylabel=f"gap to {baseline} (%)", title=f"relative {ylabel} gap (EMA)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def choose_baseline(runs: Sequence[Run], baseline: Path | None = None) -> Run | None:
    """``baseline`` when given; else a BF16 run among ``runs``, one of the same experiment (and
    then seed) as the first quantized run preferred, the first given on a tie; else the finished
    BF16 run of the first run's experiment found beside it (``find_baseline``); else None."""
    if baseline is not None:
        for run in runs:
            if run.path.resolve() == Path(baseline).resolve():
                return run
        return load_run(Path(baseline))
    bf16 = [run for run in runs if run.precision == "bf16"]
    if bf16:  # max() keeps the first of equals: the order given breaks ties
        ref = next((run for run in runs if run.precision != "bf16"), runs[0])
        return max(bf16, key=lambda run: (run.fingerprint == ref.fingerprint, run.seed == ref.seed))
    if not runs:
        return None
    found = find_baseline(runs[0].cfg, baseline_roots(runs[0].path), exclude=runs[0].path)
    return load_run(found) if found is not None else None


def _load(paths: Sequence[Path], baseline: Path | None) -> tuple[list[Run], Run | None]:
    runs = [load_run(p) for p in paths]
    base = choose_baseline(runs, baseline)
    if base is not None and all(base is not run for run in runs):
        runs.insert(0, base)  # the baseline is a row and a curve too
    for run in runs:
        if not run.finished:
            budget = (run.cfg.get("trainer") or {}).get("max_steps")
            print(f"note: {run.path} stopped after {run.steps} of {budget} steps", file=sys.stderr)
        if base is not None and run.fingerprint != base.fingerprint:
            print(
                f"note: {run.path} is another experiment than the baseline "
                f"({run.fingerprint} vs {base.fingerprint}): model, data, optimizer or budget differ",
                file=sys.stderr,
            )
    return runs, base


def legend_labels(runs: Sequence[Run]) -> list[str]:
    """Short legend labels: ``nvfp4, seed 1``, with the shortest path tail that tells runs apart
    when precision and seed do not."""
    labels = [f"{r.precision}, seed {r.seed}" for r in runs]
    for depth in range(1, max(len(r.path.parts) for r in runs) + 1):
        if len(set(labels)) == len(labels):
            break
        tails = ["/".join(r.path.parts[-depth:]) for r in runs]
        labels = [f"{r.precision}, seed {r.seed} ({tail})" for r, tail in zip(runs, tails)]
    return labels


def _plots(runs: Sequence[Run], base: Run | None, out: Path) -> list[Path]:
    labels = dict(zip(map(id, runs), legend_labels(runs)))
    curves = {labels[id(r)]: r.train_loss for r in runs if r.train_loss}
    if not curves:
        raise LowbitError("no run logged a train/loss; nothing to plot")
    val = {labels[id(r)]: r.curves.get("val/loss", {}) for r in runs}
    written = [plot_curves(curves, out / "loss.png", panels=("loss",), points=val)]
    if base is not None and labels[id(base)] in curves and len(curves) > 1:
        written.append(plot_curves(curves, out / "gap.png", labels[id(base)], panels=("gap",)))
    return written


def _parser(prog: str, what: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=what)
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN", help="run directories (lowbit or W&B)")
    parser.add_argument(
        "--baseline",
        type=Path,
        default=None,
        help="the run gaps are relative to (default: a BF16 RUN, of the same experiment as the first "
        "quantized RUN if any; else a finished BF16 run of the first RUN's experiment found beside it)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder for the PNGs (default: runs/compare/<time> under the current folder)",
    )
    return parser


def _out(out: Path | None) -> Path:
    out = out or Path("runs/compare") / dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    return out


def compare_main(argv: Sequence[str] | None = None) -> int:
    """``lowbit compare RUN... [--baseline RUN] [--out DIR]``: print the table, write
    ``compare.md``, ``loss.png`` and ``gap.png`` (with a baseline) into ``--out``."""
    args = _parser("lowbit compare", "Runs side by side: a markdown table and loss/gap PNGs.").parse_args(argv)
    runs, base = _load(args.runs, args.baseline)
    text = runs_table(runs, base)
    out = _out(args.out)
    (out / "compare.md").write_text(text + "\n")
    written = _plots(runs, base, out)
    print(text)
    print(f"\ntable: {out / 'compare.md'} | plots: {', '.join(str(p) for p in written)}")
    return 0


def plot_main(argv: Sequence[str] | None = None) -> int:
    """``lowbit plot RUN... [--baseline RUN] [--out DIR]``: ``loss.png`` and ``gap.png`` only."""
    args = _parser("lowbit plot", "Training-loss and gap-to-baseline curves of runs, as PNGs.").parse_args(argv)
    runs, base = _load(args.runs, args.baseline)
    written = _plots(runs, base, _out(args.out))
    print(f"plots: {', '.join(str(p) for p in written)}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``compare ...`` or ``plot ...`` (the subcommand first)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"compare": compare_main, "plot": plot_main}
    if not argv or argv[0] not in commands:
        got = f" '{argv[0]}'" if argv else ""
        raise LowbitError(f"unknown command{got}; valid: compare, plot")
    return commands[argv[0]](argv[1:])
