"""``lowbit bench vit-extrapolation``: train at one resolution, test at larger ones — the same small ViT under
each 2-D positional encoding, trained on the procedural shapes (``lowbit.data.shapes``) at S pixels and
evaluated on the same validation pictures rendered at 1×, 1.5×, 2× and 3× S, with the same patch size
(so 1.5-3× the patches per side).

What the papers report, and so what to look for: learned tables resampled to the larger grid
(Dosovitskiy et al. 2021, sec. 3.2; timm's ``resample_abs_pos_embed``) and 2-D RoPE lose accuracy as the
grid grows, and LookHere's directed, distance-penalised heads lose less (Fuller et al. 2024);
YaRN-style rescaling of RoPE set for the evaluation grid, without fine-tuning, moves RoPE's angles back
into the trained range (Peng et al. 2023). The objects cover more patches at higher resolution too, so
every encoding pays something; read orderings, not third decimals (one seed is noisy at this size).

Cost: the defaults (32×32 training images, patch 4, a ViT 4×64 with 4 heads in FP32, 3000 steps of 64
images on one thread, 7 encodings = 6 trainings since ``rope_yarn`` evaluates ``rope``'s model, 2000
validation pictures at 4 sides) take 7-10 min of one CPU core per training and about a minute per
encoding's evaluation: about an hour on an idle machine. ``--steps``, ``--encodings`` and ``--scales``
scale it down, and an interrupted bench reuses the trainings it finished (``out/<posenc>/seed<seed>``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lowbit.bench._report import device_name, markdown_table, train_once
from lowbit.bench.extrapolation import Encoding, load_task
from lowbit.errors import LowbitError

__all__ = [
    "BASE",
    "ENCODINGS",
    "eval_sizes",
    "evaluate",
    "main",
    "predict",
    "run",
    "scores",
    "yarn_note",
]

EVAL_TOKENS = 16384  # patch tokens per evaluation forward (batch = EVAL_TOKENS // patches per image)

BASE = (
    "data=shapes",
    "precision.mode=fp32",  # BF16 autocast runs these small matrices and SDPA slower than FP32 on CPUs
    "model.dim=64",
    "model.n_layers=4",
    "model.n_heads=4",
    "checkpoint.save_best=false",
)
"""Overrides of the base recipe for every training (before the command line's own)."""


ENCODINGS = {
    e.name: e
    for e in (
        Encoding("none", "none", "NoPE: no positions; a bag of patches at any grid"),
        Encoding(
            "learned", "learned", "learned table, bicubic-resampled to the eval grid (timm's resample_abs_pos_embed)"
        ),
        Encoding(
            "sinusoidal",
            "sinusoidal",
            "fixed 2-D sin/cos, MAE's unit table; rows and columns past the grid never seen",
            # the MAE/DiT table (rms 1/√2), not the plugin's default 0.02 (a GPT token embedding's scale): on these
            # patch embeddings (rms ~0.1) a 0.02 table left the marker side at chance (0.503) after 3000 steps
            train_options=("posenc.rms=0.7071",),
        ),
        Encoding("rope", "rope", "2-D axial RoPE; angles past the training grid never seen"),
        Encoding(
            "rope_yarn", "rope", "the rope model evaluated with YaRN per axis, s = eval grid / training grid", yarn=True
        ),
        Encoding("fourier", "fourier", "MLP of Fourier features of (row, col) / grid; coordinates ≥ 1 never seen"),
        Encoding(
            "lookhere",
            "lookhere",
            "LookHere LH-180: N, S, W, E half-plane heads, distance-penalised; defined on any grid",
            train_options=("posenc.directions=4", "posenc.unmasked_heads=0"),  # 4 heads = the 4 directed halves
        ),
    )
}


@dataclass
class Outcome:
    """One encoding at one seed: accuracy and loss per evaluation side, and its training run."""

    encoding: Encoding
    seed: int
    run_dir: Path
    run_val_loss: float  # the run's own final val/loss and val/acc (at its val_image_size)
    run_val_acc: float
    accuracy: dict[int, float] = field(default_factory=dict)  # by evaluation side in pixels
    loss: dict[int, float] = field(default_factory=dict)
    kind: dict[int, float] = field(default_factory=dict)  # the shape kind right (5-way), whatever the side
    side: dict[int, float] = field(default_factory=dict)  # the marker side right (2-way), whatever the kind


# ---- evaluation ----------------------------------------------------------------------------------


def eval_sizes(image_size: int, patch_size: int, scales: Sequence[float]) -> list[int]:
    """Evaluation sides in pixels, ``scale · image_size`` each, every one a whole number of patches."""
    sizes = []
    for scale in scales:
        size = scale * image_size
        if scale <= 0 or size != round(size) or round(size) % patch_size:
            raise LowbitError(
                f"--scales {scale:g} gives {size:g} pixels from the training side {image_size}; every scale must give "
                f"a whole number of {patch_size}-pixel patches (e.g. 1, 1.5, 2, 3 for 32 pixels and patch 4)"
            )
        sizes.append(round(size))
    return sizes


@torch.inference_mode()
def predict(model: torch.nn.Module, images: torch.Tensor, patch_size: int, precision: Any = None) -> torch.Tensor:
    """float32 logits (N, K) of ``model`` on images (N, C, H, W), in batches of about EVAL_TOKENS patches."""
    import contextlib

    device = next(model.parameters()).device
    patches = (images.shape[-2] // patch_size) * (images.shape[-1] // patch_size)
    batch = max(1, EVAL_TOKENS // patches)
    logits = []
    for i in range(0, len(images), batch):
        with precision.forward_context() if precision is not None else contextlib.nullcontext():
            logits.append(model(images[i : i + batch].to(device)).float().cpu())  # (B, K)
    return torch.cat(logits)


def scores(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Top-1 accuracy and mean cross-entropy of logits (N, K) against labels (N,), and, reading a shapes label
    as 2·kind + side (``lowbit.data.shapes``), how often the predicted kind and the predicted side are right."""
    pred = logits.argmax(-1)
    return {
        "accuracy": (pred == labels).double().mean().item(),
        "loss": F.cross_entropy(logits.double(), labels).item(),
        "kind": (pred // 2 == labels // 2).double().mean().item(),
        "side": (pred % 2 == labels % 2).double().mean().item(),
    }


def evaluate(encoding: Encoding, run_dir: Path, sizes: Sequence[int]) -> dict[int, dict[str, float]]:
    """``scores`` of the trained model on the validation pictures rendered at every side in ``sizes``."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(run_dir / "config.yaml")
    patch, train_size = int(cfg.model.patch_size), int(cfg.data.image_size)
    results = {}
    task = precision = data = None
    for size in sizes:
        if task is None or encoding.yarn:  # YaRN's scale depends on the grid: rebuild, reload
            task, precision, data = load_task(run_dir, encoding.eval_options(train_size // patch, size // patch))
        images, labels = data.val_at(size).as_tensors()  # (N, C, size, size), (N,)
        results[size] = scores(predict(task.model, images, patch, precision), labels)
    return results


# ---- the bench -----------------------------------------------------------------------------------


def run(
    encodings: Sequence[Encoding],
    image_size: int,
    steps: int,
    scales: Sequence[float],
    seeds: Sequence[int],
    out: Path,
    base: Sequence[str],
    echo=print,
) -> list[Outcome]:
    """Train each distinct posenc once per seed (``out/<posenc>/seed<seed>``), then evaluate every encoding
    at every side. A posenc already trained there with the same config is read back, not trained again."""
    from omegaconf import OmegaConf

    trained: dict[tuple[str, int], tuple[Path, float, float]] = {}
    outcomes = []
    for seed in seeds:
        for enc in encodings:
            key = (enc.train, seed)
            if key not in trained:
                run_dir = out / enc.train / f"seed{seed}"
                overrides = [
                    "logger=csv",
                    "trainer.enable_progress_bar=false",
                    "trainer.enable_model_summary=false",
                    f"trainer.val_check_interval={steps}",  # validate once, at the end
                    f"checkpoint.every_n_steps={steps}",  # an unfinished run is trained again anyway
                    *base,
                    f"posenc={enc.train}",
                    *enc.train_options,
                    f"data.image_size={image_size}",
                    f"trainer.max_steps={steps}",
                    f"seed={seed}",
                    f"hydra.run.dir={run_dir}",
                ]
                label = f"{enc.train} seed {seed}"
                val_loss = train_once(overrides, run_dir, label, echo)
                trained[key] = (run_dir, val_loss, _final_val_acc(run_dir))
            run_dir, run_val_loss, run_val_acc = trained[key]
            cfg = OmegaConf.load(run_dir / "config.yaml")
            sizes = eval_sizes(int(cfg.data.image_size), int(cfg.model.patch_size), scales)
            start = time.perf_counter()
            results = evaluate(enc, run_dir, sizes)
            outcome = Outcome(enc, seed, run_dir, run_val_loss, run_val_acc)
            for size, score in results.items():
                for metric, value in score.items():  # accuracy, loss, kind, side
                    getattr(outcome, metric)[size] = value
            outcomes.append(outcome)
            cells = ", ".join(f"{n}px: {outcome.accuracy[n]:.3f}" for n in sizes)
            echo(f"[{enc.name} seed {seed}] accuracy {cells} ({time.perf_counter() - start:.0f} s)")
    return outcomes


def _final_val_acc(run_dir: Path) -> float:
    """The last ``val/acc`` in a finished run's ``csv/metrics.csv``."""
    import csv

    with open(run_dir / "csv" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("val/acc")]
    return float(rows[-1]["val/acc"]) if rows else float("nan")


def _mean_sd(values: Sequence[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def tables(outcomes: Sequence[Outcome], image_size: int, patch_size: int, scales: Sequence[float]) -> tuple[str, str]:
    """Markdown, a row per encoding and a column per evaluation side: validation accuracy (mean ± sd over
    seeds), and the kind / side accuracies behind it (means)."""
    sizes = eval_sizes(image_size, patch_size, scales)
    header = [f"{s:g}× = {n} px ({n // patch_size}²)" for s, n in zip(scales, sizes)]
    acc_rows, split_rows = [], []
    for name, group in _by_encoding(outcomes).items():
        acc_rows.append([f"`{name}`", group[0].encoding.description])
        acc_rows[-1] += [_mean_sd([o.accuracy[n] for o in group]) for n in sizes]
        kind = [statistics.mean(o.kind[n] for o in group) for n in sizes]
        side = [statistics.mean(o.side[n] for o in group) for n in sizes]
        split_rows.append([f"`{name}`", *(f"{k:.3f} / {s:.3f}" for k, s in zip(kind, side))])
    return (
        markdown_table(["encoding", "on a larger grid", *header], acc_rows),
        markdown_table(["encoding", *header], split_rows),
    )


def _by_encoding(outcomes: Sequence[Outcome]) -> dict[str, list[Outcome]]:
    groups: dict[str, list[Outcome]] = {}
    for o in outcomes:
        groups.setdefault(o.encoding.name, []).append(o)
    return groups


def plot(outcomes: Sequence[Outcome], image_size: int, sizes: Sequence[int], path: Path) -> None:
    """Accuracy against evaluation side, one line per encoding (mean over seeds), training side and chance marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lowbit.data.shapes import NUM_CLASSES

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, group in _by_encoding(outcomes).items():
        ax.plot(sizes, [statistics.mean(o.accuracy[n] for o in group) for n in sizes], marker="o", lw=1.2, label=name)
    ax.axvline(image_size, color="k", lw=0.6, ls="--")
    ax.axhline(1 / NUM_CLASSES, color="grey", lw=0.6, ls=":", label="chance")
    ax.set_xticks(list(sizes), [str(n) for n in sizes])
    ax.set_ylim(0, 1)
    ax.set(xlabel="evaluation side (pixels)", ylabel="validation accuracy", title=f"ViT trained at {image_size} px")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _caption(cfg: Any, steps: int, seeds: Sequence[int]) -> str:
    m, d = cfg.model, cfg.data
    grid = int(d.image_size) // int(m.patch_size)
    which = f"seed {seeds[0]}" if len(seeds) == 1 else f"mean ± sd over seeds {', '.join(map(str, seeds))}"
    return (
        f"ViT {m.n_layers}×{m.dim} ({m.n_heads} heads, patch {m.patch_size}, {m.pool} pooling), trained {steps} steps × "
        f"{d.batch_size} images of {d.image_size}×{d.image_size} px ({grid}×{grid} patches) from {d.n_train:,} procedural "
        f"shapes pictures, {which}. Every column is top-1 accuracy on the same {d.n_val:,} validation pictures, rendered "
        f"at that side (the same patch size: more patches); chance is 0.1."
    )


def yarn_note(run_dir: Path) -> str:
    """How YaRN's ramp splits the rope model's rotary pairs per axis at its training grid (Peng et al. 2023, eqs. 17-19)."""
    import numpy as np
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(run_dir / "config.yaml")
    pe = cfg.posenc
    side = int(cfg.data.image_size) // int(cfg.model.patch_size)
    axis = int(cfg.model.dim // cfg.model.n_heads * pe.fraction) // 2  # rotary channels per axis
    omega = pe.theta ** (-np.arange(0, axis, 2) / axis)  # (axis/2,) per-axis frequencies
    turns = side * omega / (2 * math.pi)
    kept, interpolated = int((turns >= pe.yarn_beta).sum()), int((turns <= pe.yarn_alpha).sum())
    return (
        f"`rope_yarn`: on the {side}×{side} training grid each axis's {len(turns)} rotary pairs turn at most "
        f"{turns.max():.2f} times, so YaRN keeps {kept} (r ≥ β = {pe.yarn_beta:g}), fully interpolates {interpolated} "
        f"(r ≤ α = {pe.yarn_alpha:g}) and ramps {len(turns) - kept - interpolated}; "
        "its attention factor is 0.1·ln(s) + 1 on q and k."
    )


def _check_encodings(names: Sequence[str]) -> list[Encoding]:
    from lowbit.registry import registry

    unknown = [e for e in names if e not in ENCODINGS]
    if unknown:
        raise LowbitError(f"unknown vit-extrapolation encoding '{unknown[0]}'; valid: {', '.join(ENCODINGS)}")
    installed = registry.names("posenc")
    missing = [e for e in names if ENCODINGS[e].train not in installed]
    if missing:
        raise LowbitError(
            f"vit-extrapolation encoding '{missing[0]}' needs posenc plugin '{ENCODINGS[missing[0]].train}', which is "
            f"not installed (installed: {', '.join(installed)}); leave it out of --encodings"
        )
    return [ENCODINGS[e] for e in names]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lowbit bench vit-extrapolation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="bf16_vit", help="the base recipe; each encoding swaps posenc")
    parser.add_argument(
        "--encodings", default=",".join(ENCODINGS), help=f"comma-separated; from: {', '.join(ENCODINGS)}"
    )
    parser.add_argument("--image-size", type=int, default=32, help="training side in pixels")
    parser.add_argument("--steps", type=int, default=3000, help="training steps per encoding")
    parser.add_argument("--scales", default="1,1.5,2,3", help="evaluation sides as multiples of --image-size")
    parser.add_argument("--seeds", default="1337", help="comma-separated seeds (weights, data, stream); one run each")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1: two stall whenever another process holds a core)"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="output folder (default runs/bench/vit-extrapolation/<time>)"
    )
    parser.add_argument("overrides", nargs="*", help="config overrides for every run (model.n_layers=6 ...)")
    args = parser.parse_args(argv)

    encodings = _check_encodings(args.encodings.split(","))
    try:
        scales = [float(s) for s in args.scales.split(",")]
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError as err:
        raise LowbitError(f"--scales takes numbers and --seeds integers, comma-separated: {err}") from err
    if args.steps < 1 or args.image_size < 1 or args.threads < 1:
        raise LowbitError(
            f"--steps, --image-size and --threads must be >= 1; got --steps {args.steps} "
            f"--image-size {args.image_size} --threads {args.threads}"
        )
    patch = _checked_patch_size([f"recipe={args.recipe}", *BASE, *args.overrides])
    sizes = eval_sizes(args.image_size, patch, scales)  # checked before anything trains
    threads = torch.get_num_threads()
    out = args.out or Path("runs/bench/vit-extrapolation") / dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    try:
        outcomes = run(
            encodings,
            args.image_size,
            args.steps,
            scales,
            seeds,
            out,
            [f"recipe={args.recipe}", *BASE, *args.overrides],
            echo=lambda m: print(m, file=sys.stderr),
        )
    finally:
        torch.set_num_threads(threads)  # called as a library, leave the process as it was
    wall = time.perf_counter() - start

    from omegaconf import OmegaConf

    cfg = OmegaConf.load(outcomes[0].run_dir / "config.yaml")
    acc_table, split_table = tables(outcomes, args.image_size, patch, scales)
    notes = "".join(f"\n{yarn_note(o.run_dir)}\n" for o in outcomes if o.encoding.yarn and o.seed == seeds[0])
    command = "lowbit bench vit-extrapolation " + " ".join(argv if argv is not None else sys.argv[3:])
    text = (
        f"`{command.strip()}` — {dt.date.today()}, {device_name()}, {args.threads} thread"
        f"{'s' if args.threads != 1 else ''}, {wall / 60:.1f} min\n\n"
        f"Validation accuracy by evaluation side. {_caption(cfg, args.steps, seeds)}\n\n"
        f"{acc_table}\n{notes}\nShape kind (5-way) / marker side (2-way) accuracy, read off the same predictions "
        f"(chance 0.2 / 0.5):\n\n{split_table}\n"
    )
    (out / "vit_extrapolation.md").write_text(text)
    results = {
        "image_size": args.image_size,
        "patch_size": patch,
        "steps": args.steps,
        "sizes": sizes,
        "seeds": seeds,
        "encodings": {
            name: {
                "train": group[0].encoding.train,
                "runs": [
                    {
                        "seed": o.seed,
                        "run_dir": str(o.run_dir),
                        "run_val_loss": o.run_val_loss,
                        "run_val_acc": o.run_val_acc,
                        "accuracy": {str(n): v for n, v in o.accuracy.items()},
                        "loss": {str(n): v for n, v in o.loss.items()},
                        "kind": {str(n): v for n, v in o.kind.items()},
                        "side": {str(n): v for n, v in o.side.items()},
                    }
                    for o in group
                ],
            }
            for name, group in _by_encoding(outcomes).items()
        },
    }
    (out / "vit_extrapolation.json").write_text(json.dumps(results, indent=2))
    plot(outcomes, args.image_size, sizes, out / "vit_extrapolation.png")
    print(text)
    print(
        f"table: {out / 'vit_extrapolation.md'} | plot: {out / 'vit_extrapolation.png'} | "
        f"numbers: {out / 'vit_extrapolation.json'}"
    )
    return 0


def _checked_patch_size(overrides: Sequence[str]) -> int:
    """The patch size the runs will use (composed from the same overrides, nothing built); the data must be
    the shapes, which render the validation pictures at any side."""
    from lowbit.config import compose
    from lowbit.registry import registry

    cfg = compose(list(overrides)).cfg
    if cfg.data.name != "shapes":
        raise LowbitError(
            f"vit-extrapolation renders its validation pictures at every side, so it needs data=shapes, got data={cfg.data.name}"
        )
    registry.load("data", "shapes")  # installed and importable, or one line that says why not
    return int(cfg.model.patch_size)
