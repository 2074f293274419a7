"""``lowbit bench quality``: the same small GPT, the same tokens and seed, under each precision
recipe and the NVFP4 ablations; final validation loss and its gap to BF16, and loss curves.

What the papers report, and so what a run should show: FP8 ≈ BF16 (Micikevicius et al. 2022);
NVFP4 with 2-D weights, stochastic rounding and the RHT within about 1-2% of BF16, each
ablation wider (NVIDIA 2025, §4); MXFP4 with SR and RHT close to BF16 and naive MXFP4 (RNE, no
RHT) worse (Tseng et al. 2025); HiF8 about FP16's loss (Luo et al. 2024); INT4 a few points behind FP16
on fine-tuning (Xi et al. 2023). Small CPU runs are noisy: ``--seeds`` repeats every variant with the same
seeds, so a seed fixes the initialisation and the data order for every variant alike, and the gaps are
paired: each variant's relative gap to the baseline per seed, their mean and its 95% Student-t interval;
an ordering is resolved when the interval excludes 0.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

from lowbit.bench._report import train_once, write_report
from lowbit.compare import format_gap, markdown_table, plot_curves
from lowbit.experiment import load_run

__all__ = ["CLAIMS", "VARIANTS", "Claim", "Variant", "main", "orderings", "run", "seeds_to_resolve"]


def _rne_gradients(*extra: str) -> tuple[str, ...]:
    """Round-to-nearest gradients: set the keys of the dy specs (a ``dy={...}`` override would
    merge into the recipe's spec and keep its ``rounding: sr``)."""
    return tuple(f"precision.{gemm}.dy.{key}" for gemm in ("dgrad", "wgrad") for key in ("rounding=rne", *extra))


@dataclass(frozen=True)
class Variant:
    """A named precision configuration: config overrides on top of the base recipe."""

    name: str
    description: str
    overrides: tuple[str, ...]


VARIANTS = {
    v.name: v
    for v in (
        Variant("bf16", "BF16 (FP32 on CPUs without fast BF16)", ("precision=bf16",)),
        Variant("fp8", "FP8 hybrid, current scaling", ("precision=fp8",)),
        Variant(
            "mxfp4_naive",
            "MXFP4 all GEMMs, RNE, no RHT",
            (
                "precision=mxfp4",
                *_rne_gradients("sr_prescale=1.0"),
                "precision.dgrad.rht=0",
                "precision.wgrad.rht=0",
            ),
        ),
        Variant("mxfp4", "MXFP4 all GEMMs, SR + RHT on backward", ("precision=mxfp4",)),
        Variant("nvfp4", "NVFP4 full recipe", ("precision=nvfp4",)),
        Variant("nvfp4_no_rht", "NVFP4 without the wgrad RHT", ("precision=nvfp4", "precision.wgrad.rht=0")),
        Variant(
            "nvfp4_no_sr",
            "NVFP4 with RNE gradients",
            ("precision=nvfp4", *_rne_gradients()),
        ),
        Variant(
            "nvfp4_1d_w",
            "NVFP4 with 1x16 weight blocks",
            ("precision=nvfp4", "precision.fprop.w.preset=nvfp4", "precision.dgrad.w.preset=nvfp4"),
        ),
        Variant(
            "nvfp4_all",
            "NVFP4 in every layer (no BF16 blocks or head)",
            ("precision=nvfp4", "precision.keep=[]", "precision.keep_last_blocks=0.0"),
        ),
        Variant("int4", "INT4: Hadamard + LSQ forward, bit-split gradients with LSS (Xi et al.)", ("precision=int4",)),
        Variant(
            "hif8",
            "HiFloat8 every GEMM input, power-of-two tensor scales (amax → 15, gradients 224)",
            ("precision=hif8",),
        ),
    )
}


@dataclass
class Outcome:
    """Final validation losses (one per seed) and the run directories of a variant."""

    variant: Variant
    val_loss: list[float] = field(default_factory=list)
    run_dirs: list[Path] = field(default_factory=list)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.val_loss)

    @property
    def spread(self) -> float:
        return statistics.stdev(self.val_loss) if len(self.val_loss) > 1 else 0.0


def run(variants: list[Variant], seeds: list[int], out: Path, base: list[str], echo=print) -> list[Outcome]:
    """Train every variant with every seed; runs go to ``out/<variant>-s<seed>``.

    Seed by seed: every variant trains with the first seed before any trains with the second, so a
    bench stopped part-way has whole seeds, each a paired comparison of every variant. A run already
    finished there with the same config is read back, not trained again, so an interrupted bench
    picks up where it stopped (the same command, run again)."""

    outcomes = [Outcome(v) for v in variants]
    for seed in seeds:
        for outcome in outcomes:
            v = outcome.variant
            run_dir = out / f"{v.name}-s{seed}"
            overrides = [
                *base,
                *v.overrides,
                f"seed={seed}",
                "logger=csv",
                "trainer.enable_progress_bar=false",
                f"hydra.run.dir={run_dir}",
            ]
            outcome.val_loss.append(train_once(overrides, run_dir, f"{v.name} seed {seed}", echo))
            outcome.run_dirs.append(run_dir)
    return outcomes


def _t(n: int, confidence: float) -> float:
    """The two-sided ``confidence`` quantile of Student's t with n - 1 degrees of freedom."""
    from scipy.stats import t

    return float(t.ppf(0.5 + confidence / 2, n - 1))


def paired_gap(outcome: Outcome, base: Outcome, confidence: float = 0.95) -> tuple[float, float] | None:
    """(mean, half-width) of the relative gaps (v_s - b_s) / b_s over the seeds both ran, the half-width of a
    ``confidence`` Student-t interval; None with fewer than two seeds. Same seed, same initialisation and
    data order: the seed's own luck cancels in each gap, so the interval is narrower than the spreads suggest."""
    return _interval(_relative_gaps(outcome, base), confidence)


def _relative_gaps(outcome: Outcome, base: Outcome) -> list[float]:
    """(v_s - b_s) / b_s for every seed both ran."""
    return [(v - b) / b for v, b in zip(outcome.val_loss, base.val_loss)]


def _interval(gaps: list[float], confidence: float) -> tuple[float, float] | None:
    """(mean, half-width of the ``confidence`` Student-t interval) of ``gaps``; None with fewer than two."""
    if len(gaps) < 2:
        return None
    return statistics.fmean(gaps), _t(len(gaps), confidence) * statistics.stdev(gaps) / math.sqrt(len(gaps))


def seeds_to_resolve(gaps: list[float], confidence: float = 0.95, most: int = 100) -> int | None:
    """The fewest seeds whose ``confidence`` interval would exclude 0 if the paired gaps kept the mean and
    standard deviation these have (a planning figure, not a promise: both move with more seeds); None
    beyond ``most`` or with a zero mean."""
    mean, sd = statistics.fmean(gaps), statistics.stdev(gaps)
    if sd == 0:
        return len(gaps) if mean else None
    return next((n for n in range(2, most + 1) if _t(n, confidence) * sd / math.sqrt(n) < abs(mean)), None)


@dataclass(frozen=True)
class Claim:
    """A paper's ordering of two variants: ``better`` trains to a lower loss than ``worse``."""

    better: str
    worse: str
    what: str
    source: str


CLAIMS = (
    Claim("nvfp4", "nvfp4_no_rht", "the wgrad RHT helps", "NVIDIA 2025, §4"),
    Claim("nvfp4", "nvfp4_no_sr", "SR on the gradients helps", "NVIDIA 2025, §4"),
    Claim("nvfp4", "nvfp4_1d_w", "16×16 weight blocks beat 1×16", "NVIDIA 2025, §4"),
    Claim("nvfp4", "nvfp4_all", "BF16 head and last blocks help", "NVIDIA 2025, §4"),
    Claim("nvfp4", "mxfp4", "NVFP4 beats MXFP4", "NVIDIA 2025"),
    Claim("mxfp4", "mxfp4_naive", "SR + RHT beat naive MXFP4", "Tseng et al. 2025"),
)


def orderings(outcomes: list[Outcome], claims: tuple[Claim, ...] = CLAIMS, confidence: float = 0.95) -> str | None:
    """Markdown: each paper's ordering whose two variants ran, tested directly on the pair: the paired relative
    difference (better_s - worse_s) / worse_s per seed, its mean and ``confidence`` interval, whether it agrees
    with the paper (resolved when the interval excludes 0), and how many seeds would resolve it at the gaps'
    present mean and spread. None with fewer than two seeds or no claim to test."""
    by_name = {o.variant.name: o for o in outcomes}
    rows = []
    for claim in claims:
        if claim.better not in by_name or claim.worse not in by_name:
            continue
        gaps = _relative_gaps(by_name[claim.better], by_name[claim.worse])
        interval = _interval(gaps, confidence)
        if interval is None:
            return None
        mean, half = interval
        same_way = mean < 0
        if abs(mean) > half:
            verdict = "agrees (resolved)" if same_way else "contradicts (resolved)"
        else:
            verdict = "not resolved, " + ("same way" if same_way else "other way")
        needed = seeds_to_resolve(gaps, confidence)
        rows.append(
            [
                f"`{claim.better}` < `{claim.worse}`",
                f"{claim.what} ({claim.source})",
                f"{100 * mean:+.2f}% ± {100 * half:.2f}%",
                " ".join(f"{100 * g:+.2f}" for g in gaps),
                verdict,
                "–" if abs(mean) > half else (f"~{needed}" if needed else "> 100"),
            ]
        )
    if not rows:
        return None
    head = ["ordering", "the paper's claim", "paired difference, 95% CI", "per seed (%)", "ours", "seeds to resolve"]
    return markdown_table(head, rows)


def table(outcomes: list[Outcome]) -> str:
    """Markdown: mean final val loss (± std over seeds), the relative gap to the first variant, and with several
    seeds the paired gap's 95% interval and whether it resolves the ordering."""
    base = outcomes[0]
    paired = len(base.val_loss) > 1
    rows = []
    for o in outcomes:
        spread = f" ± {o.spread:.4f}" if len(o.val_loss) > 1 else ""
        row = [f"`{o.variant.name}`", o.variant.description, f"{o.mean:.4f}{spread}", format_gap(o.mean, base.mean)]
        if paired:
            gap = paired_gap(o, base) if o is not base else None
            if gap is None:
                row += ["–", "baseline" if o is base else "one seed"]
            else:
                mean, half = gap
                verdict = "not resolved" if abs(mean) <= half else ("worse" if mean > 0 else "better")
                row += [f"{100 * mean:+.2f}% ± {100 * half:.2f}%", verdict]
        rows.append(row)
    head = ["variant", "what", "val loss", f"gap to {base.variant.name}"]
    if paired:
        head += ["paired gap, 95% CI", "ordering"]
    return markdown_table(head, rows)


def plot(outcomes: list[Outcome], path: Path, smoothing: float = 0.95) -> None:
    """Training loss (EMA-smoothed, first seed) of every variant, and each one's gap to the first."""
    curves = {o.variant.name: load_run(o.run_dirs[0]).train_loss for o in outcomes}
    plot_curves(curves, path, outcomes[0].variant.name, panels=("loss", "gap"), smoothing=smoothing)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lowbit bench quality", description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="bf16_llm", help="the base recipe; each variant swaps the precision")
    parser.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"comma-separated, the first is the baseline; from: {', '.join(VARIANTS)}",
    )
    parser.add_argument("--seeds", default="1", help="comma-separated seeds; every variant runs each")
    parser.add_argument(
        "--val-windows",
        type=int,
        default=1024,
        help="validation windows for text recipes (the recipes' 128 is for monitoring; 1024 cuts the val set's noise)",
    )
    parser.add_argument("--out", type=Path, default=None, help="output folder (default runs/bench/quality/<time>)")
    parser.add_argument("overrides", nargs="*", help="config overrides for every run (trainer.max_steps=300 ...)")
    args = parser.parse_args(argv)
    from lowbit.errors import LowbitError

    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        raise LowbitError(f"unknown quality variant '{unknown[0]}'; valid: {', '.join(VARIANTS)}")
    out = args.out or Path("runs/bench/quality") / dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    base = [f"recipe={args.recipe}", *args.overrides]
    from lowbit.config import compose

    if "val_windows" in compose(base).cfg.data:
        base.insert(1, f"data.val_windows={args.val_windows}")
    outcomes = run(
        [VARIANTS[v] for v in args.variants.split(",")],
        seeds,
        out,
        base,
        echo=lambda m: print(m, file=sys.stderr),
    )
    text = table(outcomes)
    pairs = orderings(outcomes)
    if pairs is not None:
        text += "\n\nThe papers' orderings, each tested on its own pair (lower loss first):\n\n" + pairs
    write_report("quality", argv, text, out, lambda path: plot(outcomes, path))
    return 0
