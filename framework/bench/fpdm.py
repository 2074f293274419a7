"""``lowbit bench fpdm``: DiT against a Fixed Point Diffusion Model of the same width, trained on the same
data for the same steps; parameters, training memory, and FID at several sampling budgets, in one run.

What the paper reports, and so what a run should show (Bai & Melas-Kyriazi 2024, Tables 1-2, Fig. 5): FPDM
has far fewer parameters (one weight-tied block instead of many) and needs less training memory (S-JFB
keeps activations of the m gradient steps only); at equal sampling compute it matches or beats DiT when
compute is small, and solution reuse (warm start) and reallocating iterations across timesteps help.

A sampling budget is the number of transformer-block evaluations one sample trajectory may use. DiT spends
its depth L per DDIM step, so a budget B gives it B/L steps. FPDM spends its pre + post blocks per step plus
fixed-point iterations; it gets the same steps (or twice as many), and the iterations left over are spread
over the timesteps by ``iteration_budget`` (constant, increasing, decreasing), with the solver's tolerance
set to 0 so that exactly the budget is spent (the table's evaluation counts are measured, not assumed).
Training memory: on CPU the bytes autograd saves for backward during one training forward (a
``saved_tensors_hooks`` count: activations only, not weights, gradients or optimizer state); on CUDA
``torch.cuda.max_memory_allocated`` over one training step (forward and backward), minus what was
allocated before it. FPDM is measured at its largest number of gradient steps (the worst case).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lowbit.bench._report import device_name, markdown_table, train_once
from lowbit.models.base import count_parameters

__all__ = ["Variant", "main", "training_memory"]


@dataclass(frozen=True)
class Variant:
    """How one sampler spends a budget: which model, steps per budget (× DiT's), schedule, warm start."""

    name: str
    model: str  # "dit" or "fpdm"
    step_factor: int = 1
    schedule: str = "constant"
    warm_start: bool = True


VARIANTS = (
    Variant("DiT", "dit"),
    Variant("FPDM, constant", "fpdm"),
    Variant("FPDM, increasing", "fpdm", schedule="increasing"),
    Variant("FPDM, decreasing", "fpdm", schedule="decreasing"),
    Variant("FPDM, constant, no warm start", "fpdm", warm_start=False),
    Variant("FPDM, 2× steps, constant", "fpdm", step_factor=2),
)


@dataclass
class Trained:
    """A trained model of the bench: its task, data, precision, and the numbers measured on it."""

    name: str
    run_dir: Path
    task: Any
    data: Any
    precision: Any
    params: int = 0
    memory_bytes: int = 0
    val_loss: float = float("nan")
    fid: dict[int, dict[str, Any]] = field(default_factory=dict)  # budget -> variant -> {fid, steps, evals}


def training_memory(task: Any, batch: tuple[torch.Tensor, torch.Tensor]) -> int:
    """Bytes of one training step as the module docstring says (CPU: saved for backward; CUDA: peak allocated)."""
    model = task.model.train()
    x0, y = (v.to(task.device) for v in batch)
    gen = torch.Generator().manual_seed(0)
    t = torch.randint(0, task.timesteps, (x0.shape[0],), generator=gen).to(x0.device)
    noise = torch.randn(x0.shape, generator=gen).to(x0.device, x0.dtype)
    deq = getattr(model, "fixed_point_layer", None)
    saved_range = deq.grad_iters_range if deq is not None else None
    if deq is not None:  # the worst case: the most gradient steps S-JFB draws
        deq.grad_iters_range = (saved_range[1], saved_range[1])
    try:
        if x0.device.type == "cuda":
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            task._noise_loss(x0, y, t, noise).backward()
            torch.cuda.synchronize()
            used = torch.cuda.max_memory_allocated() - before
        else:
            used = 0

            def pack(tensor: torch.Tensor) -> torch.Tensor:
                nonlocal used
                used += tensor.numel() * tensor.element_size()
                return tensor

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
                task._noise_loss(x0, y, t, noise)
    finally:
        if deq is not None:
            deq.grad_iters_range = saved_range
        model.zero_grad(set_to_none=True)
    return int(used)


def _load(run_dir: Path) -> tuple[Any, Any, Any]:
    """(task, data, precision) of a finished run with its last.ckpt (EMA weights included)."""
    from omegaconf import OmegaConf

    from lowbit.run import build

    built = build(OmegaConf.load(run_dir / "config.yaml"))
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    built.task.load_state_dict(checkpoint["state_dict"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return built.task.to(device).eval(), built.data, built.precision


def train_models(args: argparse.Namespace, out: Path, echo=print) -> dict[str, Trained]:
    """Train DiT and FPDM of the same width with the same data, steps and seed; runs go to ``out/{dit,fpdm}``.

    A model already trained there with the same config is loaded, not trained again."""

    common = [
        f"model.dim={args.dim}",
        f"trainer.max_steps={args.steps}",
        f"trainer.val_check_interval={args.steps}",
        "task.fid_samples=0",  # the bench measures FID itself, at each budget
        "task.samples_per_class=0",
        f"seed={args.seed}",
        "logger=csv",
        "trainer.enable_progress_bar=false",
        *args.overrides,
    ]
    specs = {
        "dit": ["recipe=bf16_dit", f"model.n_layers={args.dit_layers}"],
        "fpdm": ["recipe=fpdm_dit", f"model.n_pre={args.pre}", f"model.n_post={args.post}"],
    }
    trained = {}
    for name, spec in specs.items():
        run_dir = out / name
        overrides = [*spec, *common, f"hydra.run.dir={run_dir}"]
        val_loss = train_once(overrides, run_dir, name, echo)
        task, data, precision = _load(run_dir)
        model = Trained(name, run_dir, task, data, precision, val_loss=val_loss)
        model.params = count_parameters(task.model)
        batch = next(iter(data.train_dataloader()))
        model.memory_bytes = training_memory(task, batch)
        echo(
            f"[{name}] {model.params:,} parameters, val/loss {model.val_loss:.4f}, training memory {model.memory_bytes:,} B"
        )
        trained[name] = model
    return trained


def evaluate(trained: dict[str, Trained], budgets: list[int], fid_samples: int, echo=print) -> None:
    """FID of every variant at every budget, all from the same noise (common random numbers)."""
    dit, fpdm = trained["dit"], trained["fpdm"]
    depth, explicit = dit.task.model.blocks_per_step, fpdm.task.model.explicit_blocks
    deq = fpdm.task.model.fixed_point_layer
    saved_tol, deq.tol = deq.tol, 0.0  # every allowed iteration runs: the budget is spent exactly
    try:
        for budget in budgets:
            for variant in VARIANTS:
                model = dit if variant.model == "dit" else fpdm
                steps = variant.step_factor * (budget // depth)
                options: dict[str, Any] = {"steps": steps}
                if variant.model == "fpdm":
                    iters = budget - steps * explicit
                    if steps < 1 or iters < steps:
                        echo(
                            f"[{variant.name} @ {budget}] skipped: {steps} steps leave {iters} iterations (< 1 per step)"
                        )
                        continue
                    options.update(fp_budget=iters, fp_schedule=variant.schedule, warm_start=variant.warm_start)
                elif steps < 1:
                    echo(f"[{variant.name} @ {budget}] skipped: the budget is below one step ({depth} blocks)")
                    continue
                with model.precision.forward_context():
                    score = model.task.fid(
                        fid_samples, datamodule=model.data, generator=torch.Generator().manual_seed(1234), **options
                    )
                evals = model.task.last_sampling.block_evals  # measured: what the samples really used
                model.fid.setdefault(budget, {})[variant.name] = {"fid": score, "steps": steps, "evals": evals}
                echo(f"[{variant.name} @ {budget}] {steps} steps, {evals} block evaluations: FID {score:.4g}")
    finally:
        deq.tol = saved_tol


def tables(trained: dict[str, Trained], budgets: list[int], args: argparse.Namespace) -> str:
    """Markdown: the models (parameters, memory, loss), then FID per variant and budget."""
    memory_what = "peak allocated, one step" if torch.cuda.is_available() else "saved for backward, one forward"
    rows = []
    for m in trained.values():
        shape = (
            f"{args.dit_layers} blocks"
            if m.name == "dit"
            else f"{args.pre} + 1 weight-tied (×{m.task.model.fixed_point_layer.grad_iters_range[1]} grad steps max) + {args.post}"
        )
        rows.append([m.name, shape, f"{m.params:,}", f"{m.memory_bytes / 2**20:.2f}", f"{m.val_loss:.4f}"])
    head = markdown_table(["model", "blocks", "parameters", f"training memory MiB ({memory_what})", "val loss"], rows)
    dit, fpdm = trained["dit"], trained["fpdm"]
    ratio = f"FPDM/DiT: parameters {fpdm.params / dit.params:.2f}×, training memory {fpdm.memory_bytes / max(dit.memory_bytes, 1):.2f}×."
    fid_rows = []
    for variant in VARIANTS:
        model = trained[variant.model]
        cells = []
        for budget in budgets:
            r = model.fid.get(budget, {}).get(variant.name)
            cells.append("n/a" if r is None else f"{r['fid']:.4g} ({r['steps']} steps)")
        fid_rows.append([variant.name, *cells])
    fid = markdown_table(["sampler", *[f"FID @ {b} blocks" for b in budgets]], fid_rows)
    return f"{head}\n\n{ratio}\n\n{fid}\n"


def plot(trained: dict[str, Trained], budgets: list[int], path: Path) -> None:
    """FID against the sampling budget for every sampler, and parameters / training memory side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bars) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [2, 1]})
    for variant in VARIANTS:
        results = trained[variant.model].fid
        points = [(b, results[b][variant.name]["fid"]) for b in budgets if variant.name in results.get(b, {})]
        if points:
            ax.plot(*zip(*points), marker="o", lw=1.2, label=variant.name, ls="-" if variant.model == "fpdm" else "--")
    ax.set(xlabel="block evaluations per sample", ylabel="FID (lower is better)", title="FID at equal sampling compute")
    ax.set_xscale("log")
    ax.legend(fontsize=8)
    names = list(trained)
    params = [trained[n].params / 1e6 for n in names]
    memory = [trained[n].memory_bytes / 2**20 for n in names]
    xs = range(len(names))
    bars.bar([x - 0.2 for x in xs], params, width=0.4, label="parameters (M)")
    bars.bar([x + 0.2 for x in xs], memory, width=0.4, label="training memory (MiB)")
    bars.set_xticks(list(xs), names)
    bars.set_title("size and training memory")
    bars.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lowbit bench fpdm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2000, help="training steps of each model")
    parser.add_argument("--dim", type=int, default=128, help="width of both models")
    parser.add_argument("--dit-layers", type=int, default=6, help="DiT depth")
    parser.add_argument("--pre", type=int, default=1, help="FPDM explicit blocks before the fixed-point layer")
    parser.add_argument("--post", type=int, default=1, help="FPDM explicit blocks after it")
    parser.add_argument("--budgets", default="60,120,240", help="comma-separated block evaluations per sample")
    parser.add_argument("--fid-samples", type=int, default=1000, help="generated images per FID")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="output folder (default runs/bench/fpdm/<time>)")
    parser.add_argument(
        "overrides", nargs="*", help="config overrides for both runs (precision=nvfp4, posenc=rope ...)"
    )
    args = parser.parse_args(argv)
    from lowbit.errors import LowbitError

    budgets = sorted(int(b) for b in args.budgets.split(","))
    if budgets[0] < args.dit_layers:
        raise LowbitError(f"--budgets must be at least one DiT step ({args.dit_layers} blocks), got {budgets[0]}")
    out = args.out or Path("runs/bench/fpdm") / dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    echo = lambda m: print(m, file=sys.stderr)
    trained = train_models(args, out, echo)
    evaluate(trained, budgets, args.fid_samples, echo)
    command = "lowbit bench fpdm " + " ".join(argv if argv is not None else sys.argv[3:])
    text = f"`{command.strip()}` — {dt.date.today()}, {device_name()}\n\n{tables(trained, budgets, args)}"
    (out / "fpdm.md").write_text(text)
    plot(trained, budgets, out / "fpdm.png")
    results = {
        name: {
            "params": m.params,
            "memory_bytes": m.memory_bytes,
            "val_loss": m.val_loss,
            "fid": {str(b): r for b, r in m.fid.items()},
        }
        for name, m in trained.items()
    }
    (out / "fpdm.json").write_text(json.dumps({"budgets": budgets, "models": results}, indent=1))
    print(text)
    print(f"table: {out / 'fpdm.md'} | plot: {out / 'fpdm.png'}")
    return 0
