"""``lowbit bench extrapolation``: train short, test long — the same small GPT under each positional
encoding, trained at context L and evaluated at L, 2L, 4L, 8L on the same validation bytes.

What the papers report, and so what a run should show: ALiBi (and KERPLE) keep their perplexity
flat or improving past L, sinusoidal blows up, RoPE degrades and T5's bias degrades slowly (Press
et al. 2022, fig. 1; Chi et al. 2022, table 3); YaRN set for the evaluation length, without
fine-tuning, recovers much of RoPE's loss (Peng et al. 2023, sec. 3.3, Dynamic YaRN). Learned
absolute embeddings have no vectors past L: they are linearly interpolated to the evaluation length
(as timm's ``resample_abs_pos_embed``), which stretches positions rather than extrapolating. PaTH's
logits depend on the tokens between query and key (accumulated Householder products), not on a position
index, and it extrapolates past L better than RoPE (Yang et al. 2025). Small CPU runs are noisy;
read orderings, not third decimals.

Cost: the defaults (L = 128, 1000 steps of 16×128 bytes, 10 encodings = 9 trainings, since
``rope_yarn`` evaluates ``rope``'s model) take about 45-55 min on 2 idle CPU cores (about 0.25 s
per step, more for PaTH, and a few seconds per evaluation length); ``--steps`` and
``--encodings`` scale it linearly.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lowbit.bench._report import device_name, markdown_table, train_once

__all__ = [
    "ENCODINGS",
    "Encoding",
    "eval_windows",
    "evaluate",
    "load_task",
    "main",
    "mean_loss",
    "run",
    "segments",
    "yarn_note",
]

EVAL_TOKENS = 16384  # tokens per evaluation forward (batch = EVAL_TOKENS // length)


@dataclass(frozen=True)
class Encoding:
    """A row of the table: the posenc trained, and the posenc options it is evaluated with at each length."""

    name: str
    train: str  # the posenc config the model is trained with (posenc=NAME)
    description: str  # what the encoding does past the training length (or grid)
    yarn: bool = False  # evaluate with YaRN scaling s = eval length / L (per axis on grids)
    train_options: tuple[str, ...] = ()  # extra overrides for its training (posenc.KEY=VALUE)

    def eval_options(self, train_len: int, eval_len: int) -> dict[str, Any]:
        """posenc options to set on the trained config for evaluation at ``eval_len`` (a length, or a grid side)."""
        if not self.yarn:
            return {}
        return {"scaling": "yarn", "scale": eval_len / train_len, "original_max_len": train_len}


ENCODINGS = {
    e.name: e
    for e in (
        Encoding("none", "none", "NoPE: no positions at all; nothing depends on length"),
        Encoding("learned", "learned", "learned table, linearly interpolated to the eval length (cannot extrapolate)"),
        Encoding("sinusoidal", "sinusoidal", "fixed sin/cos; positions past L never seen"),
        Encoding("rope", "rope", "RoPE; angles past L never seen"),
        Encoding("rope_yarn", "rope", "the rope model evaluated with YaRN, s = eval length / L", yarn=True),
        Encoding("alibi", "alibi", "fixed linear distance bias"),
        Encoding("kerple", "kerple", "learned log kernel of the distance"),
        Encoding("t5", "t5", "learned bucketed bias; long offsets share the last bucket"),
        Encoding("fourier", "fourier", "MLP of Fourier features of n/L; n/L ≥ 1 never seen"),
        Encoding("path", "path", "PaTH: Householder products of the tokens between; no position index"),
    )
}


@dataclass
class Outcome:
    """One encoding's evaluation: loss (nats/byte) per evaluation length, and its training run."""

    encoding: Encoding
    run_dir: Path
    run_val_loss: float  # the run's own final val/loss (its ByteWindows at L)
    loss: dict[int, float] = field(default_factory=dict)

    def ppl(self, length: int) -> float:
        return math.exp(self.loss[length])

    def bpb(self, length: int) -> float:
        return self.loss[length] / math.log(2)


# ---- evaluation ----------------------------------------------------------------------------------


def segments(val: np.ndarray, span: int, count: int) -> np.ndarray:
    """``count`` evenly spaced, non-overlapping segments of ``span + 1`` bytes of ``val``, (count, span + 1) int64."""
    from lowbit.errors import LowbitError

    fit = len(val) // (span + 1)
    if fit < 1:
        raise LowbitError(
            f"the validation split has {len(val)} bytes, fewer than one evaluation segment of {span + 1}; use shorter --train-len or --lengths"
        )
    offsets = np.linspace(0, len(val) - span - 1, num=min(count, fit), dtype=np.int64)
    return np.stack([val[o : o + span + 1] for o in offsets]).astype(np.int64)


def eval_windows(segs: np.ndarray, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut every segment into non-overlapping (x, y) windows of ``length``, each (N, length), y = x shifted by one.

    Every length predicts the same bytes ``segs[:, 1:]``; only the context each byte sees differs.
    """
    span = segs.shape[1] - 1
    if span % length:
        raise ValueError(f"segment span {span} is not a multiple of the window length {length}")
    x = torch.from_numpy(segs[:, :-1]).reshape(-1, length)  # (count·span/length, length)
    y = torch.from_numpy(segs[:, 1:]).reshape(-1, length)
    return x, y


@torch.inference_mode()
def mean_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, precision: Any = None) -> float:
    """Next-byte cross-entropy (nats) averaged over every position of every window; x, y (N, T)."""
    device = next(model.parameters()).device
    batch = max(1, EVAL_TOKENS // x.shape[1])
    total, count = 0.0, 0
    for i in range(0, len(x), batch):
        xb, yb = x[i : i + batch].to(device), y[i : i + batch].to(device)
        with precision.forward_context() if precision is not None else contextlib.nullcontext():
            logits = model(xb)  # (B, T, V)
        total += F.cross_entropy(logits.float().flatten(0, 1), yb.flatten(), reduction="sum").item()
        count += yb.numel()
    return total / count


def load_task(run_dir: Path, posenc: dict[str, Any] | None = None) -> tuple[Any, Any, Any]:
    """(task, precision, data) of a finished run, its ``last.ckpt`` loaded, posenc options changed by ``posenc``."""
    from omegaconf import OmegaConf

    from lowbit.run import build

    cfg = OmegaConf.load(run_dir / "config.yaml")
    for key, value in (posenc or {}).items():
        OmegaConf.update(cfg, f"posenc.{key}", value, force_add=True)
    built = build(cfg)
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    built.task.load_state_dict(checkpoint["state_dict"])  # strict: the eval model is the trained one
    device = "cuda" if getattr(built.precision, "device_type", "cpu") == "cuda" else "cpu"
    return built.task.to(device).eval(), built.precision, built.data


def _val_split(run_dir: Path) -> np.ndarray:
    """The validation split (bytes) of a run's data."""
    from omegaconf import OmegaConf

    from lowbit.config import plain
    from lowbit.registry import registry

    cfg = OmegaConf.load(run_dir / "config.yaml")
    return registry.build("data", plain(cfg.data), seed=int(cfg.seed)).corpus.val


def evaluate(
    encoding: Encoding, run_dir: Path, train_len: int, lengths: Sequence[int], segs: np.ndarray
) -> dict[int, float]:
    """Mean loss of the trained model at every evaluation length, on the windows of ``segs``."""
    losses = {}
    task = precision = None
    for length in lengths:
        if task is None or encoding.yarn:  # YaRN's scale depends on the length: rebuild, reload
            task, precision, _ = load_task(run_dir, encoding.eval_options(train_len, length))
        x, y = eval_windows(segs, length)
        losses[length] = mean_loss(task.model, x, y, precision)
    return losses


# ---- the bench -----------------------------------------------------------------------------------


def run(
    encodings: Sequence[Encoding],
    train_len: int,
    steps: int,
    multipliers: Sequence[int],
    seed: int,
    n_segments: int,
    out: Path,
    base: Sequence[str],
    echo=print,
) -> tuple[list[Outcome], np.ndarray]:
    """Train each distinct posenc once (``out/<posenc>``), then evaluate every encoding at every length.

    A posenc already trained there with the same config is read back, not trained again. Returns
    the outcomes and the validation segments every length was scored on.
    """

    lengths = [m * train_len for m in multipliers]
    trained: dict[str, tuple[Path, float]] = {}
    outcomes, segs = [], None
    for enc in encodings:
        if enc.train not in trained:
            run_dir = out / enc.train
            overrides = [
                "logger=csv",
                "trainer.enable_progress_bar=false",
                "checkpoint.save_best=false",
                f"trainer.val_check_interval={steps}",  # validate once, at the end
                *base,
                f"posenc={enc.train}",
                f"data.seq_len={train_len}",
                f"trainer.max_steps={steps}",
                f"seed={seed}",
                f"hydra.run.dir={run_dir}",
            ]
            trained[enc.train] = (run_dir, train_once(overrides, run_dir, enc.train, echo))
        run_dir, run_val_loss = trained[enc.train]
        if segs is None:  # the same validation bytes for every encoding
            segs = segments(_val_split(run_dir), math.lcm(*multipliers) * train_len, n_segments)
        start = time.perf_counter()
        outcome = Outcome(enc, run_dir, run_val_loss, evaluate(enc, run_dir, train_len, lengths, segs))
        ppl = ", ".join(f"{n}: {outcome.ppl(n):.3f}" for n in lengths)
        echo(f"[{enc.name}] ppl {ppl} ({time.perf_counter() - start:.0f} s)")
        outcomes.append(outcome)
    return outcomes, segs


def _cell(value: float, digits: int) -> str:
    return f"{value:.{digits}f}" if math.isfinite(value) and value < 1e4 else f"{value:.3g}"


def tables(outcomes: Sequence[Outcome], train_len: int, multipliers: Sequence[int]) -> tuple[str, str]:
    """Markdown: perplexity and bits per byte, a row per encoding, a column per evaluation length."""
    header = [f"{m}L = {m * train_len}" for m in multipliers]
    ppl_rows, bpb_rows = [], []
    for o in outcomes:
        name = f"`{o.encoding.name}`"
        ppl_rows.append([name, o.encoding.description, *(_cell(o.ppl(m * train_len), 3) for m in multipliers)])
        bpb_rows.append([name, *(_cell(o.bpb(m * train_len), 4) for m in multipliers)])
    return (
        markdown_table(["encoding", "past the training length", *header], ppl_rows),
        markdown_table(["encoding", *header], bpb_rows),
    )


def plot(outcomes: Sequence[Outcome], train_len: int, multipliers: Sequence[int], path: Path) -> None:
    """Perplexity against evaluation length (log-log), one line per encoding, the training length marked."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = [m * train_len for m in multipliers]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for o in outcomes:
        ax.plot(lengths, [o.ppl(n) for n in lengths], marker="o", lw=1.2, label=o.encoding.name)
    ax.axvline(train_len, color="k", lw=0.6, ls="--")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(lengths, [str(n) for n in lengths])
    ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%.3g"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%.3g"))
    ax.set(xlabel="evaluation length (bytes)", ylabel="validation perplexity", title=f"trained at L = {train_len}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _caption(cfg: Any, steps: int, multipliers: Sequence[int], segs: int) -> str:
    train_len = int(cfg.data.seq_len)
    span = math.lcm(*multipliers) * train_len
    return (
        f"GPT {cfg.model.n_layers}×{cfg.model.dim} ({cfg.model.n_heads} heads), {cfg.data.name} corpus, "
        f"trained {steps} steps × {cfg.data.batch_size}×{train_len} bytes at L = {train_len}, seed {cfg.seed}. "
        f"Every column scores the same {segs}×{span:,} validation bytes ({segs} evenly spaced segments of "
        f"{span:,} bytes), cut into non-overlapping windows of that column's length; the loss is averaged over "
        "all positions of every window (Press et al. 2022's non-overlapping evaluation), so shorter windows "
        "give their early bytes less context. Perplexity = exp(mean loss in nats per byte)."
    )


def yarn_note(run_dir: Path) -> str:
    """How YaRN's ramp splits the rope model's rotary pairs at its training length (Peng et al. 2023, eqs. 17-19).

    Pair i turns r_i = L·ω_i/2π times over L; r_i ≥ β is kept, r_i ≤ α fully interpolated, between ramped.
    """
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(run_dir / "config.yaml")
    pe, train_len = cfg.posenc, int(cfg.data.seq_len)
    rotary = int(cfg.model.dim // cfg.model.n_heads * pe.fraction)
    omega = pe.theta ** (-np.arange(0, rotary, 2) / rotary)  # RoFormer ω_i, (rotary/2,)
    turns = train_len * omega / (2 * math.pi)  # r_i
    alpha, beta = pe.yarn_alpha, pe.yarn_beta
    kept, interpolated = int((turns >= beta).sum()), int((turns <= alpha).sum())
    return (
        f"`rope_yarn`: at L = {train_len} the rope model's {len(turns)} rotary pairs turn at most {turns.max():.1f} "
        f"times over L, so YaRN keeps {kept} (r ≥ β = {beta:g}), fully interpolates {interpolated} (r ≤ α = {alpha:g}) "
        f"and ramps {len(turns) - kept - interpolated}; its attention factor is 0.1·ln(s) + 1 on q and k."
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lowbit bench extrapolation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="bf16_llm", help="the base recipe; each encoding swaps posenc")
    parser.add_argument(
        "--encodings", default=",".join(ENCODINGS), help=f"comma-separated; from: {', '.join(ENCODINGS)}"
    )
    parser.add_argument("--train-len", type=int, default=128, help="training context L in bytes")
    parser.add_argument("--steps", type=int, default=1000, help="training steps per encoding")
    parser.add_argument("--lengths", default="1,2,4,8", help="evaluation lengths as multiples of L")
    parser.add_argument("--segments", type=int, default=64, help="validation segments of lcm(lengths)·L bytes")
    parser.add_argument("--seed", type=int, default=1337, help="seed of every run (weights and data stream)")
    parser.add_argument(
        "--out", type=Path, default=None, help="output folder (default runs/bench/extrapolation/<time>)"
    )
    parser.add_argument("overrides", nargs="*", help="config overrides for every run (model.n_layers=6 ...)")
    args = parser.parse_args(argv)
    from lowbit.errors import LowbitError

    unknown = [e for e in args.encodings.split(",") if e not in ENCODINGS]
    if unknown:
        raise LowbitError(f"unknown extrapolation encoding '{unknown[0]}'; valid: {', '.join(ENCODINGS)}")
    multipliers = [int(m) for m in args.lengths.split(",")]
    if not multipliers or min(multipliers) < 1 or args.train_len < 1 or args.steps < 1 or args.segments < 1:
        raise LowbitError(
            f"--lengths must be positive multiples and --train-len, --steps, --segments ≥ 1; got "
            f"--lengths {args.lengths} --train-len {args.train_len} --steps {args.steps} --segments {args.segments}"
        )
    out = args.out or Path("runs/bench/extrapolation") / dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    outcomes, segs = run(
        [ENCODINGS[e] for e in args.encodings.split(",")],
        args.train_len,
        args.steps,
        multipliers,
        args.seed,
        args.segments,
        out,
        [f"recipe={args.recipe}", *args.overrides],
        echo=lambda m: print(m, file=sys.stderr),
    )
    wall = time.perf_counter() - start

    from omegaconf import OmegaConf

    cfg = OmegaConf.load(outcomes[0].run_dir / "config.yaml")
    ppl_table, bpb_table = tables(outcomes, args.train_len, multipliers)
    notes = "".join(f"\n{yarn_note(o.run_dir)}\n" for o in outcomes if o.encoding.yarn)
    command = "lowbit bench extrapolation " + " ".join(argv if argv is not None else sys.argv[3:])
    text = (
        f"`{command.strip()}` — {dt.date.today()}, {device_name()}, {wall / 60:.1f} min\n\n"
        f"Validation perplexity by evaluation length. {_caption(cfg, args.steps, multipliers, len(segs))}\n\n"
        f"{ppl_table}\n{notes}\nBits per byte:\n\n{bpb_table}\n"
    )
    (out / "extrapolation.md").write_text(text)
    results = {
        "train_len": args.train_len,
        "steps": args.steps,
        "lengths": [m * args.train_len for m in multipliers],
        "encodings": {
            o.encoding.name: {
                "train": o.encoding.train,
                "run_dir": str(o.run_dir),
                "run_val_loss": o.run_val_loss,
                "loss": {str(n): v for n, v in o.loss.items()},
                "ppl": {str(n): o.ppl(n) for n in o.loss},
                "bpb": {str(n): o.bpb(n) for n in o.loss},
            }
            for o in outcomes
        },
    }
    (out / "extrapolation.json").write_text(json.dumps(results, indent=2))
    plot(outcomes, args.train_len, multipliers, out / "extrapolation.png")
    print(text)
    print(
        f"table: {out / 'extrapolation.md'} | plot: {out / 'extrapolation.png'} | numbers: {out / 'extrapolation.json'}"
    )
    return 0
