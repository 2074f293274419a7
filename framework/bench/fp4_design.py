"""``lowbit bench fp4-design``: the FP4 design space of Hu et al., "Elucidating the Design Space of
FP4 training" (arXiv 2509.17791), on the default GPT: E2M1 elements under each block-scale format
(E8M0, E4M3 and UE5M3 with or without a second-level FP32 tensor scale, FP32), block size and
gradient rounding; final validation loss and its paired gap to BF16, and the quantization error of
each design on the operands of a trained BF16 model.

A design point changes only the block scaling and the gradients' rounding of the NVFP4 recipe:
every GEMM operand (x and w in the forward, dy and w in dgrad, dy and x in wgrad) is E2M1 in 1 x B
blocks along the contraction dim (weights too: 1-D blocks, as the paper's microscaling), scales in
the point's format from the block amax (E8M0 by the OCP rule, the others amax / 6 rounded to the
format), dy rounded stochastically (SR) or to nearest (RNE); x and w always RNE. The rest is the
recipe's: the 16-point random Hadamard transform on wgrad, the head and the last 15% of blocks in
high precision. E4M3 with block 16 and SR is the ``nvfp4_1d_w`` variant of ``lowbit bench quality``.

Seeds pair as in ``lowbit bench quality`` (same initialisation and data order for every point): each
point's gap to BF16 per seed, their mean and 95% Student-t interval. Each factor (SR, block size) is
also tested on matched pairs, two points that differ in it alone, seed by seed; points whose mean loss
is more than ``DIVERGED`` above BF16's did not train and stay out of those comparisons and the main
effects (the training table shows them). The quantization error (SNR in
dB, 10 log10 of signal over error energy, summed over the layers the recipe quantizes) is measured
on one training batch of the first seed's trained BF16 model: its activations, weights and output
gradients as the forward and dgrad GEMMs see them, so it is the format's error on real tensors,
apart from training dynamics.
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lowbit.bench import quality
from lowbit.bench._report import write_report
from lowbit.compare import format_gap, markdown_table
from lowbit.errors import LowbitError

__all__ = ["SCALES", "DesignPoint", "check_blocks", "design_points", "main", "quantization_snr"]

SCALES = {
    # name: (scale format, second-level FP32 tensor scale, what)
    "e8m0": ("e8m0", False, "E8M0 (power of two, MX)"),
    "e4m3_ts": ("e4m3", True, "E4M3 under an FP32 tensor scale (NVFP4)"),
    "ue5m3": ("ue5m3", False, "UE5M3"),
    "ue5m3_ts": ("ue5m3", True, "UE5M3 under an FP32 tensor scale"),
    "fp32": ("fp32", False, "FP32"),
}
_OPERANDS = (("fprop", "x"), ("fprop", "w"), ("dgrad", "dy"), ("dgrad", "w"), ("wgrad", "dy"), ("wgrad", "x"))
_SR = {"on": True, "off": False}


@dataclass(frozen=True)
class DesignPoint:
    """One FP4 configuration: the block-scale format, the block size, and SR on the gradients."""

    scale: str
    block: int
    sr: bool

    @property
    def name(self) -> str:
        return f"{self.scale}_b{self.block}_{'sr' if self.sr else 'rne'}"

    def spec(self, operand: str) -> dict[str, Any]:
        """The QuantSpec fields of one GEMM operand (``x``, ``w`` or ``dy``)."""
        scale_format, tensor_scale, _ = SCALES[self.scale]
        rounding = "sr" if self.sr and operand == "dy" else "rne"
        return {
            "element": "e2m1",
            "block": [1, self.block],
            "scale_format": scale_format,
            "scale_rule": "auto",  # E8M0: the OCP rule (floor); the others: amax / 6
            "global_scale": tensor_scale,
            "rounding": rounding,
        }

    def variant(self) -> quality.Variant:
        """The point as a quality-bench variant: the NVFP4 recipe with every operand's spec replaced."""
        overrides = ["precision=nvfp4"]
        for gemm, operand in _OPERANDS:
            spec = self.spec(operand)
            overrides += [f"++precision.{gemm}.{operand}.{key}={_hydra(value)}" for key, value in spec.items()]
        rounding = "SR" if self.sr else "RNE"
        what = f"E2M1 in 1×{self.block} blocks, {SCALES[self.scale][2]} scales, {rounding} gradients"
        return quality.Variant(self.name, what, tuple(overrides))


def _hydra(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ",".join(map(str, value)) + "]"
    return str(value)


def _csv(text: str, what: str) -> list[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise LowbitError(f"--{what} is empty; give a comma-separated list")
    return items


def design_points(scales: str, blocks: str, sr: str) -> list[DesignPoint]:
    """The grid of ``--scales`` x ``--blocks`` x ``--sr``; anything outside the design space is one clear error."""
    scale_names = _csv(scales, "scales")
    for name in scale_names:
        if name not in SCALES:
            raise LowbitError(
                f"unknown FP4 block-scale format '{name}' in --scales; valid: {', '.join(SCALES)} "
                "(_ts: under a second-level FP32 tensor scale)"
            )
    sizes = []
    for text in _csv(blocks, "blocks"):
        size = int(text) if text.isdigit() else 0
        if size < 2 or size & (size - 1):
            raise LowbitError(f"block size '{text}' in --blocks is not a power of two >= 2; the paper's are 16 and 32")
        sizes.append(size)
    roundings = _csv(sr, "sr")
    for value in roundings:
        if value not in _SR:
            raise LowbitError(f"--sr takes on and off (stochastic or nearest rounding of gradients), got '{value}'")
    return [DesignPoint(s, b, _SR[r]) for s, b, r in itertools.product(scale_names, sizes, roundings)]


def check_blocks(base: list[str], points: list[DesignPoint]) -> dict[str, tuple[int, int]]:
    """{name: (input width, output width)} of the layers the recipe quantizes (NVFP4's choice of
    layers), after checking that every point's block size quantizes all of them: the precision keeps
    a layer whose contraction dims (input width for the forward, output width for dgrad) a block does
    not divide in high precision, which would make points differ in more than their format."""
    layers = quantized_layers(base)
    for block in sorted({p.block for p in points}):
        point = next(p for p in points if p.block == block)
        kept = sorted(set(layers) - set(quantized_layers(base, point)))
        if kept:
            width = next(w for w in layers[kept[0]] if w % block)
            raise LowbitError(
                f"block size {block} does not divide width {width} of layer '{kept[0]}' "
                f"({len(kept)} of the recipe's {len(layers)} quantized layers would stay high precision); "
                "use block sizes that divide every GEMM's input and output width"
            )
    return layers


# ---- quantization error on a trained BF16 model's operands ---------------------------------------


def capture_operands(
    run_dir: Path, quantized: dict[str, tuple[int, int]] | set[str]
) -> dict[str, dict[str, torch.Tensor]]:
    """{layer: {x, w, dy}} of the layers ``quantized`` names, from one training batch of the finished
    run in ``run_dir`` (its last checkpoint): inputs, weights and output gradients, float32."""
    from lowbit.bench.fpdm import _load

    task, data, _ = _load(run_dir)
    task.train()
    captured: dict[str, dict[str, torch.Tensor]] = {}
    handles = []
    for name, module in task.named_modules():
        if name not in quantized:
            continue

        def forward_hook(module, args, output, name=name):
            captured[name] = {"x": args[0].detach().float().flatten(0, -2), "w": module.weight.detach().float()}

        def backward_hook(module, grad_input, grad_output, name=name):
            captured[name]["dy"] = grad_output[0].detach().float().flatten(0, -2)

        handles += [module.register_forward_hook(forward_hook), module.register_full_backward_hook(backward_hook)]
    x, y = (t.to(task.device) for t in next(iter(data.train_dataloader())))
    try:
        task._loss(task(x), y).backward()
    finally:
        for handle in handles:
            handle.remove()
    if not captured:
        raise LowbitError(f"no quantized layer of the design was found in the model of {run_dir}")
    return captured


def quantized_layers(base: list[str], point: DesignPoint | None = None) -> dict[str, tuple[int, int]]:
    """{name: (input width, output width)} of the layers ``point``'s precision converts (the NVFP4
    recipe's own when ``point`` is None); building the model trains nothing."""
    import warnings

    from lowbit.config import compose
    from lowbit.quant.linear import QuantLinear
    from lowbit.run import build

    overrides = point.variant().overrides if point else ("precision=nvfp4",)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # layers kept in high precision: check_blocks says it in one line
        built = build(compose([*base, *overrides]).cfg)
    return {
        name: (module.in_features, module.out_features)
        for name, module in built.task.named_modules()
        if isinstance(module, QuantLinear)
    }


def quantization_snr(
    captured: dict[str, dict[str, torch.Tensor]], point: DesignPoint, seed: int = 0
) -> dict[str, float]:
    """SNR in dB of each operand kind (x, w, dy) under the point's specs, over every captured layer:
    10 log10(sum t^2 / sum (q(t) - t)^2); +inf where quantization is exact."""
    from lowbit.numerics import QuantSpec, fake_quantize

    out = {}
    for operand in ("x", "w", "dy"):
        spec = QuantSpec.from_dict(point.spec(operand))
        signal = error = 0.0
        for i, tensors in enumerate(captured.values()):
            t = tensors[operand]
            q = fake_quantize(t, spec, seed=seed + i, compile=True).float()
            signal += float(t.double().square().sum())
            error += float((q - t).double().square().sum())
        out[operand] = math.inf if error == 0 else 10 * math.log10(signal / error)
    return out


# ---- report ---------------------------------------------------------------------------------------


DIVERGED = 0.25  # a point whose mean loss is this far above BF16's did not train; comparisons leave it out


def _trained(points: list[DesignPoint], gaps: dict[str, list[float]]) -> list[DesignPoint]:
    """The points that trained: mean gap to BF16 at most ``DIVERGED`` (a diverged point's loss says
    nothing about the factors that a working one's does, and would swamp every mean it enters)."""
    return [p for p in points if statistics.fmean(gaps[p.name]) <= DIVERGED]


def _factor_rows(points: list[DesignPoint], gaps: dict[str, list[float]]) -> list[list[str]]:
    """Each factor level's mean gap over the trained points that have it (a main effect): every other
    factor is balanced across the levels when the grid is full and every point trained."""
    rows = []
    points = _trained(points, gaps)
    for factor, levels in (
        ("scale", sorted({p.scale for p in points}, key=list(SCALES).index)),
        ("block", sorted({p.block for p in points})),
        ("gradients", sorted({p.sr for p in points}, reverse=True)),
    ):
        if len(levels) < 2:
            continue
        for level in levels:
            members = [p for p in points if getattr(p, factor if factor != "gradients" else "sr") == level]
            values = [g for p in members for g in gaps[p.name]]
            label = {True: "SR", False: "RNE"}.get(level, level) if factor == "gradients" else level
            rows.append([factor, str(label), f"{100 * statistics.fmean(values):+.2f}%", str(len(members))])
    return rows


_FACTORS = (  # (what, the point's field, the level tested, the other level)
    ("SR against RNE gradients", "sr", True, False),
    ("blocks of 16 against 32", "block", 16, 32),
)


def _pair_rows(points: list[DesignPoint], losses: dict[str, list[float]], gaps: dict[str, list[float]]):
    """Each factor tested on matched pairs: two trained points that differ in that factor alone, on the
    same seed; the relative difference (a_s - b_s) / b_s of every pair and seed, their mean, a 95%
    Student-t interval over them (pairs and seeds taken as independent draws), and how many are below 0."""
    trained = {p.name: p for p in _trained(points, gaps)}
    rows = []
    for what, field_name, level, other in _FACTORS:
        diffs, pairs = [], 0
        for p in trained.values():
            if getattr(p, field_name) != level:
                continue
            match = DesignPoint(**{**p.__dict__, field_name: other})
            if match.name not in trained:
                continue
            pairs += 1
            diffs += [(a - b) / b for a, b in zip(losses[p.name], losses[match.name])]
        interval = quality._interval(diffs, 0.95)
        if interval is None:
            continue
        mean, half = interval
        verdict = "not resolved" if abs(mean) <= half else ("lower loss" if mean < 0 else "higher loss")
        below = sum(d < 0 for d in diffs)
        rows.append([what, str(pairs), f"{100 * mean:+.2f}% ± {100 * half:.2f}%", f"{below} of {len(diffs)}", verdict])
    return rows


def tables(outcomes: list[quality.Outcome], points: list[DesignPoint], snr: dict[str, dict[str, float]]) -> str:
    """The training table (quality's: val loss, gap, paired interval), the main effects, and the
    SNRs; only the SNRs when ``outcomes`` holds the BF16 baseline alone (``--snr-only``)."""
    base, trained = outcomes[0], outcomes[1:]
    parts = []
    if trained:
        gaps = {o.variant.name: [(v - b) / b for v, b in zip(o.val_loss, base.val_loss, strict=True)] for o in trained}
        parts.append(quality.table(outcomes))
        diverged = [p.name for p in points if p not in _trained(points, gaps)]
        left_out = f" (left out, diverged: {', '.join(f'`{n}`' for n in diverged)})" if diverged else ""
        factor_rows = _factor_rows(points, gaps)
        if factor_rows:
            parts.append(
                "Main effects: each level's mean gap to BF16 over the trained points (and seeds) that have it"
                + left_out
                + "\n\n"
                + markdown_table(["factor", "level", "mean gap", "points"], factor_rows)
            )
        losses = {o.variant.name: o.val_loss for o in trained}
        pair_rows = _pair_rows(points, losses, gaps)
        if pair_rows:
            head = ["factor", "matched pairs", "paired difference, 95% CI", "below 0", "reading"]
            parts.append(
                "Each factor on matched pairs (two trained points that differ in it alone, same seed)"
                + left_out
                + "\n\n"
                + markdown_table(head, pair_rows)
            )
        best = min(trained, key=lambda o: o.mean)
        parts.append(f"Lowest mean val loss: `{best.variant.name}` ({format_gap(best.mean, base.mean)} to BF16).")
    rows = [[f"`{p.name}`", *(f"{snr[p.name][k]:.2f}" for k in ("x", "w", "dy"))] for p in points]
    header = ["point", "activations x", "weights w", "gradients dy"]
    if trained:
        header.append("gap to bf16")
        rows = [[*row, format_gap(o.mean, base.mean)] for row, o in zip(rows, trained, strict=True)]
    parts.append(
        "Quantization SNR (dB) on the trained BF16 model's operands (one batch, first seed)\n\n"
        + markdown_table(header, rows)
    )
    return "\n\n".join(parts)


def plot(outcomes: list[quality.Outcome], points: list[DesignPoint], snr: dict[str, dict[str, float]], path: Path):
    """Gap to BF16 per point (mean over seeds, with the paired interval) beside its operands' SNR;
    the SNR alone without trained points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base, trained = outcomes[0], outcomes[1:]
    names = [p.name for p in points]
    ys = range(len(points))
    fig, axes = plt.subplots(
        1, 2 if trained else 1, figsize=(12 if trained else 7, 0.35 * len(points) + 2), squeeze=False
    )
    right = axes[0, -1]
    if trained:
        means, errors = [], []
        for o in trained:
            gap = quality.paired_gap(o, base)
            means.append(100 * (gap[0] if gap else (o.mean - base.mean) / base.mean))
            errors.append(100 * gap[1] if gap else 0.0)
        colors = {name: f"C{i}" for i, name in enumerate(SCALES)}
        left = axes[0, 0]
        diverged = [m > 100 * DIVERGED for m in means]
        # the axis spans the trained points' intervals; a diverged point's bar runs off it, its gap written
        shown = [(m - e, m + e) for m, e, d in zip(means, errors, diverged) if not d] or [(0.0, 100 * DIVERGED)]
        low, high = min(0.0, *(a for a, _ in shown)), max(0.0, *(b for _, b in shown))
        pad = 0.08 * (high - low or 1.0)
        bar_errors = [0.0 if d else e for e, d in zip(errors, diverged)]
        left.barh(ys, means, xerr=bar_errors, color=[colors[p.scale] for p in points])
        for y, m, d in zip(ys, means, diverged):
            if d:
                left.text(high + pad, y, f"diverged: {m:+.0f}% ", ha="right", va="center", fontsize=8)
        left.set_xlim(low - pad, high + pad)
        left.axvline(0, color="k", lw=0.8)
        left.set(xlabel="val loss gap to BF16 (%), mean over seeds with its 95% paired interval")
        right.sharey(left)
    for k, operand in enumerate(("x", "w", "dy")):
        right.plot([snr[n][operand] for n in names], ys, "o", label=operand, color=f"C{k + 4}")
    axes[0, 0].set(yticks=list(ys), yticklabels=names)
    axes[0, 0].invert_yaxis()  # the table's order, top down
    right.set(xlabel="quantization SNR (dB)")
    right.legend()
    fig.suptitle("FP4 design space: E2M1 x block-scale format x block size x gradient rounding", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lowbit bench fp4-design", description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="bf16_llm", help="the base recipe (its precision is replaced)")
    parser.add_argument("--scales", default=",".join(SCALES), help=f"block-scale formats, from: {', '.join(SCALES)}")
    parser.add_argument("--blocks", default="16,32", help="block sizes (powers of two dividing the GEMM widths)")
    parser.add_argument("--sr", default="on,off", help="stochastic rounding of the gradients: on, off or both")
    parser.add_argument("--seeds", default="1", help="comma-separated seeds; every point runs each (paired)")
    parser.add_argument("--val-windows", type=int, default=1024, help="validation windows (text recipes)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default runs/bench/fp4-design/<time>)")
    parser.add_argument(
        "--snr-only", action="store_true", help="train the BF16 baseline only and report each point's quantization SNR"
    )
    parser.add_argument("overrides", nargs="*", help="config overrides for every run (trainer.max_steps=300 ...)")
    args = parser.parse_args(argv)
    from lowbit.config import compose

    points = design_points(args.scales, args.blocks, args.sr)
    seeds = [int(s) for s in _csv(args.seeds, "seeds")]
    base = [f"recipe={args.recipe}", *args.overrides]
    if "val_windows" in compose(base).cfg.data:
        base.insert(1, f"data.val_windows={args.val_windows}")
    layers = check_blocks(base, points)  # before any training: a bad point fails here, nothing created
    out = args.out or Path("runs/bench/fp4-design") / dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    variants = [quality.VARIANTS["bf16"], *(() if args.snr_only else (p.variant() for p in points))]
    outcomes = quality.run(variants, seeds, out, base, echo=lambda m: print(m, file=sys.stderr))
    captured = capture_operands(outcomes[0].run_dirs[0], layers)
    snr = {p.name: quantization_snr(captured, p) for p in points}
    write_report("fp4-design", argv, tables(outcomes, points, snr), out, lambda path: plot(outcomes, points, snr, path))
    return 0
