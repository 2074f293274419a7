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
Training memory, as the paper measures it: the peak of one training step (forward and backward) beyond the
weights, i.e. activations, gradients and temporaries: ``torch.cuda.max_memory_allocated`` on CUDA, and on CPU
the same peak counted by PyTorch's ``MemTracker`` (a dispatch mode that follows every tensor's storage), beside
the bytes autograd saves for backward. FPDM runs its no-grad iterations without storing anything, so its
memory is set by the m gradient iterations of S-JFB: the memory table gives every m, and DiT at the trained
depth and at deeper trunks up to the paper's 28 blocks (same width; memory needs no training).

With ``--low-precision nvfp4`` (the default) a third model, FPDM under that precision plugin, trains alike and
samples under it; the convergence table says how its fixed-point solves converge against FPDM's own (solver
iterations to a relative residual of 1e-2 per DDIM step, warm-started, and the residual reached).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lowbit.bench._report import device_name, finished_val_loss, markdown_table, train_once
from lowbit.config import compose
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
    Variant("FPDM under low precision, constant", "fpdm_lowp"),
)
DEEPER_DIT = (12, 28)  # the memory table's deeper DiT trunks besides the trained one: 28 is DiT-XL, the paper's
# the convergence table's solves; tol 1e-2: BF16 blocks (on CPUs with fast BF16) floor the relative residual near 2^-8
CONVERGENCE = {"steps": 10, "tol": 1e-2, "max_iter": 50, "samples": 100}


@dataclass
class Trained:
    """A trained model of the bench: its task, data, precision, and the numbers measured on it."""

    name: str  # dit, fpdm, fpdm_lowp
    label: str  # as the tables show it: dit, fpdm, fpdm nvfp4
    run_dir: Path
    task: Any
    data: Any
    precision: Any
    params: int = 0
    memory_bytes: int = 0  # peak of a training step beyond the weights (module docstring)
    saved_bytes: int = 0  # what autograd saves for backward in that step
    train_seconds: float | None = None  # wall-clock of its training, when this invocation trained it
    val_loss: float = float("nan")
    fid: dict[int, dict[str, Any]] = field(default_factory=dict)  # budget -> variant -> {fid, steps, evals, iters}
    convergence: dict[str, float] = field(default_factory=dict)  # the convergence table's row (fixed-point models)


@contextmanager
def _worst_case(model: Any, grad_iters: int | None = None) -> Iterator[None]:
    """S-JFB of a fixed-point model fixed at the most no-grad iterations it draws and ``grad_iters`` gradient
    iterations (default: the most it draws): a measurement that does not depend on the draw."""
    deq = getattr(model, "fixed_point_layer", None)
    if deq is None:
        yield
        return
    saved = deq.nograd_iters_range, deq.grad_iters_range
    m = saved[1][1] if grad_iters is None else grad_iters
    deq.nograd_iters_range, deq.grad_iters_range = (saved[0][1], saved[0][1]), (m, m)
    try:
        yield
    finally:
        deq.nograd_iters_range, deq.grad_iters_range = saved


def training_memory(
    task: Any, batch: tuple[torch.Tensor, torch.Tensor], grad_iters: int | None = None
) -> dict[str, int]:
    """``{"peak": bytes, "saved": bytes}`` of one training step, as the module docstring says; a fixed-point model
    with ``grad_iters`` gradient iterations (default: the most S-JFB draws, the worst case)."""
    model = task.model.train()
    x0, y = (v.to(task.device) for v in batch)
    gen = torch.Generator().manual_seed(0)
    t = torch.randint(0, task.timesteps, (x0.shape[0],), generator=gen).to(x0.device)
    noise = torch.randn(x0.shape, generator=gen).to(x0.device, x0.dtype)
    saved = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        saved += tensor.numel() * tensor.element_size()
        return tensor

    def step() -> None:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = task._noise_loss(x0, y, t, noise)
        loss.backward()

    try:
        with _worst_case(model, grad_iters):
            if x0.device.type == "cuda":
                torch.cuda.synchronize()
                before = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                step()
                torch.cuda.synchronize()
                peak = torch.cuda.max_memory_allocated() - before
            else:
                from torch.distributed._tools.mem_tracker import MemTracker

                tracker = MemTracker()
                tracker.track_external(model)  # the weights are known, so they are not counted as new memory
                with tracker:
                    step()
                counts = tracker.get_tracker_snapshot("peak")[x0.device]
                peak = sum(n for kind, n in counts.items() if str(kind) not in _WEIGHTS)
    finally:
        model.zero_grad(set_to_none=True)
    return {"peak": int(peak), "saved": int(saved)}


_WEIGHTS = ("_MemRefType.PARAM", "_MemRefType.BUFFER", "Total")  # MemTracker's categories left out of a step's peak


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
    """Train DiT, FPDM (and FPDM under ``--low-precision``) of the same width with the same data, steps and seed;
    runs go to ``out/{dit,fpdm,fpdm_<precision>}``. A model already trained there with the same config is loaded."""

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
    fpdm = ["recipe=fpdm_dit", f"model.n_pre={args.pre}", f"model.n_post={args.post}"]
    specs = {"dit": ["recipe=bf16_dit", f"model.n_layers={args.dit_layers}"], "fpdm": fpdm}
    if args.low_precision != "none":
        specs["fpdm_lowp"] = [*fpdm, f"precision={args.low_precision}"]
    trained = {}
    for name, spec in specs.items():
        run_dir = out / (f"fpdm_{args.low_precision}" if name == "fpdm_lowp" else name)
        overrides = [*spec, *common, f"hydra.run.dir={run_dir}"]
        finished = finished_val_loss(run_dir, compose(overrides).cfg) is not None
        start = time.perf_counter()
        val_loss = train_once(overrides, run_dir, name, echo)
        task, data, precision = _load(run_dir)
        label = f"fpdm {args.low_precision}" if name == "fpdm_lowp" else name
        model = Trained(name, label, run_dir, task, data, precision, val_loss=val_loss)
        model.train_seconds = None if finished else time.perf_counter() - start
        model.params = count_parameters(task.model)
        echo(f"[{name}] {model.params:,} parameters, val/loss {model.val_loss:.4f}")
        trained[name] = model
    return trained


def memory_rows(trained: dict[str, Trained], args: argparse.Namespace, echo=print) -> list[dict[str, Any]]:
    """Peak training-step memory by shape, all on one batch: DiT at the trained depth and at ``DEEPER_DIT`` (built
    from the trained DiT's config, same width), and each FPDM at every number of gradient iterations. Each trained
    model's ``memory_bytes``/``saved_bytes`` are its worst case among these rows (FPDM: the most gradient iterations)."""
    from omegaconf import OmegaConf

    from lowbit.run import build_task

    dit = trained["dit"]
    batch = next(iter(dit.data.train_dataloader()))
    with dit.precision.forward_context():
        memory = training_memory(dit.task, batch)
    dit.memory_bytes, dit.saved_bytes = memory["peak"], memory["saved"]
    rows = [{"model": "dit", "shape": f"{args.dit_layers} blocks", "params": dit.params, **memory}]
    config = OmegaConf.to_container(OmegaConf.load(dit.run_dir / "config.yaml"), resolve=True)
    for depth in sorted(d for d in DEEPER_DIT if d > args.dit_layers):
        config["model"]["n_layers"] = depth
        task = build_task(config).to(dit.task.device)
        dit.precision.convert_module(task)
        with dit.precision.forward_context():
            memory = training_memory(task, batch)
        rows.append({"model": "dit", "shape": f"{depth} blocks", "params": count_parameters(task.model), **memory})
    for name in ("fpdm", "fpdm_lowp"):
        if name not in trained:
            continue
        model = trained[name]
        lo, hi = model.task.model.fixed_point_layer.grad_iters_range
        for m in range(lo, hi + 1):
            with model.precision.forward_context():
                memory = training_memory(model.task, batch, grad_iters=m)
            shape = f"{args.pre} + 1 weight-tied (m = {m} grad iterations) + {args.post}"
            rows.append({"model": model.label, "shape": shape, "params": model.params, **memory})
        model.memory_bytes, model.saved_bytes = memory["peak"], memory["saved"]  # m = hi: the worst case
    for model in trained.values():
        echo(f"[{model.name}] training step peak {model.memory_bytes:,} B ({model.saved_bytes:,} B saved for backward)")
    return rows


def convergence(trained: dict[str, Trained], echo=print) -> None:
    """Each fixed-point model's solves when sampling ``CONVERGENCE["steps"]`` warm-started DDIM steps with the solver
    stopping at a relative residual of ``tol`` (or ``max_iter``): iterations per step and the residual reached."""
    for model in trained.values():
        deq = getattr(model.task.model, "fixed_point_layer", None)
        if deq is None:
            continue
        saved = deq.tol, deq.max_iter
        deq.tol, deq.max_iter = CONVERGENCE["tol"], CONVERGENCE["max_iter"]
        try:
            labels = torch.arange(CONVERGENCE["samples"]) % model.task.num_classes
            with model.precision.forward_context():
                _, stats = model.task.sample(
                    labels, steps=CONVERGENCE["steps"], warm_start=True, generator=torch.Generator().manual_seed(1234)
                )
        finally:
            deq.tol, deq.max_iter = saved
        iters, res = stats.fp_iters, stats.fp_rel_res
        model.convergence = {
            "iters_mean": sum(iters) / len(iters),
            "iters_first": iters[0],
            "iters_max": max(iters),
            "converged_steps": sum(r <= CONVERGENCE["tol"] for r in res) / len(res),
            "rel_res_max": max(res),
        }
        echo(f"[{model.name}] solves to {CONVERGENCE['tol']:g}: iterations per step {iters}, residuals {res}")


def evaluate(trained: dict[str, Trained], budgets: list[int], fid_samples: int, echo=print) -> None:
    """FID of every variant at every budget, all from the same noise (common random numbers)."""
    depth = trained["dit"].task.model.blocks_per_step
    for budget in budgets:
        for variant in VARIANTS:
            model = trained.get(variant.model)
            if model is None:
                continue
            steps = variant.step_factor * (budget // depth)
            options: dict[str, Any] = {"steps": steps}
            if variant.model != "dit":
                iters = budget - steps * model.task.model.explicit_blocks
                if steps < 1 or iters < steps:
                    echo(f"[{variant.name} @ {budget}] skipped: {steps} steps leave {iters} iterations (< 1 per step)")
                    continue
                options.update(fp_budget=iters, fp_schedule=variant.schedule, warm_start=variant.warm_start)
            elif steps < 1:
                echo(f"[{variant.name} @ {budget}] skipped: the budget is below one step ({depth} blocks)")
                continue
            deq = getattr(model.task.model, "fixed_point_layer", None)
            saved_tol = None if deq is None else deq.tol
            if deq is not None:
                deq.tol = 0.0  # every allowed iteration runs: the budget is spent exactly
            try:
                with model.precision.forward_context():
                    score = model.task.fid(
                        fid_samples, datamodule=model.data, generator=torch.Generator().manual_seed(1234), **options
                    )
            finally:
                if deq is not None:
                    deq.tol = saved_tol
            stats = model.task.last_sampling  # measured: what the samples really used
            result = {"fid": score, "steps": steps, "evals": stats.block_evals, "iters": stats.fp_iters}
            model.fid.setdefault(budget, {})[variant.name] = result
            echo(f"[{variant.name} @ {budget}] {steps} steps, {stats.block_evals} block evaluations: FID {score:.4g}")


def tables(trained: dict[str, Trained], budgets: list[int], args: argparse.Namespace, memory: list[dict]) -> str:
    """Markdown: the models, memory by shape, FID per variant and budget, and the fixed-point convergence."""
    how = "peak allocated" if torch.cuda.is_available() else "peak, MemTracker"
    models = markdown_table(
        ["model", "parameters", "val loss", "training wall-clock s"],
        [
            [
                m.label,
                f"{m.params:,}",
                f"{m.val_loss:.4f}",
                "n/a" if m.train_seconds is None else f"{m.train_seconds:.0f}",
            ]
            for m in trained.values()
        ],
    )
    deepest = {r["shape"]: r for r in memory if r["model"] == "dit"}
    dit_shapes = list(deepest)
    mem_rows = []
    for r in memory:
        ratios = [f"{r['peak'] / deepest[shape]['peak']:.2f}×" for shape in dit_shapes]
        mem_rows.append(
            [
                r["model"],
                r["shape"],
                f"{r['params']:,}",
                f"{r['peak'] / 2**20:.2f}",
                f"{r['saved'] / 2**20:.2f}",
                *ratios,
            ]
        )
    mem = markdown_table(
        [
            "model",
            "shape",
            "parameters",
            f"training step MiB ({how})",
            "saved for backward MiB",
            *[f"÷ DiT {shape}" for shape in dit_shapes],
        ],
        mem_rows,
    )
    fid_rows = []
    for variant in VARIANTS:
        model = trained.get(variant.model)
        if model is None:
            continue
        name = variant.name.replace("low precision", args.low_precision)
        cells = []
        for budget in budgets:
            r = model.fid.get(budget, {}).get(variant.name)
            cells.append("n/a" if r is None else f"{r['fid']:.4g} ({r['steps']} steps)")
        fid_rows.append([name, *cells])
    fid = markdown_table(["sampler", *[f"FID @ {b} blocks" for b in budgets]], fid_rows)
    conv_rows = [
        [
            m.label,
            f"{m.convergence['iters_mean']:.1f}",
            str(m.convergence["iters_first"]),
            str(m.convergence["iters_max"]),
            f"{m.convergence['converged_steps']:.0%}",
            f"{m.convergence['rel_res_max']:.2g}",
        ]
        for m in trained.values()
        if m.convergence
    ]
    conv = markdown_table(
        [
            "model",
            "iterations per step (mean)",
            "first step",
            "most",
            f"steps reaching {CONVERGENCE['tol']:g}",
            "largest residual",
        ],
        conv_rows,
    )
    c = CONVERGENCE
    return (
        f"{models}\n\n{mem}\n\n{fid}\n\nFixed-point solves, {c['steps']} warm-started DDIM steps of {c['samples']} "
        f"samples, stopping at relative residual {c['tol']:g} or {c['max_iter']} iterations:\n\n{conv}\n"
    )


def plot(trained: dict[str, Trained], budgets: list[int], memory: list[dict], path: Path) -> None:
    """FID against the sampling budget for every sampler, and training-step memory by shape."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bars) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [3, 2]})
    for variant in VARIANTS:
        model = trained.get(variant.model)
        if model is None:
            continue
        points = [(b, model.fid[b][variant.name]["fid"]) for b in budgets if variant.name in model.fid.get(b, {})]
        if points:
            name = variant.name.replace("low precision", model.label.split()[-1])  # "... under nvfp4, ..."
            ax.plot(*zip(*points), marker="o", lw=1.2, label=name, ls="--" if variant.model == "dit" else "-")
    ax.set(xlabel="block evaluations per sample", ylabel="FID (lower is better)", title="FID at equal sampling compute")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    short = lambda shape: shape.split("(")[1].split(" grad")[0] if "(" in shape else shape  # noqa: E731  "m = 2"
    labels = [f"{r['model'].split()[-1]}\n{short(r['shape'])}" for r in memory]  # dit / fpdm / nvfp4
    bars.bar(range(len(memory)), [r["peak"] / 2**20 for r in memory])
    bars.set_xticks(range(len(memory)), labels, fontsize=7)
    bars.set(ylabel="MiB", title="training-step memory")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def sample_grid(trained: dict[str, Trained], budgets: list[int], path: Path, per_class: int = 3) -> None:
    """``per_class`` samples of every class (one class per column) from each model (FPDM: constant schedule), at
    the smallest budget that gives a DiT two steps and at the largest: one panel per model and budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from torchvision.utils import make_grid

    depth = trained["dit"].task.model.blocks_per_step
    shown = sorted({next((b for b in budgets if b // depth >= 2), budgets[-1]), budgets[-1]})
    fig, axes = plt.subplots(
        len(shown), len(trained), figsize=(3.6 * len(trained), 1.4 * per_class * len(shown)), squeeze=False
    )
    for row, budget in enumerate(shown):
        for ax, model in zip(axes[row], trained.values()):
            task = model.task
            steps = budget // depth
            options: dict[str, Any] = {"steps": steps}
            if model.name != "dit":
                options["fp_budget"] = budget - steps * task.model.explicit_blocks
            labels = torch.arange(task.num_classes).repeat(per_class)  # row r, column c: class c
            with model.precision.forward_context():
                images, _ = task.sample(labels, generator=torch.Generator().manual_seed(1234), **options)
            pixels = task._display(images.float().cpu())  # (N, C, H, W) in [0, 1]
            grid = make_grid(pixels, nrow=task.num_classes, padding=1, pad_value=0.5)  # (3, H', W')
            ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
            ax.set_title(f"{model.label} @ {budget} blocks ({steps} steps)", fontsize=8)
            ax.axis("off")
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
    parser.add_argument(
        "--budgets", default="6,12,18,30,60,120,240", help="comma-separated block evaluations per sample"
    )
    parser.add_argument("--fid-samples", type=int, default=1000, help="generated images per FID")
    parser.add_argument(
        "--low-precision",
        default="nvfp4",
        help="precision plugin of the third model, FPDM trained and sampled under it ('none': no third model)",
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="output folder (default runs/bench/fpdm/<time>)")
    parser.add_argument(
        "overrides", nargs="*", help="config overrides for both runs (precision=nvfp4, posenc=rope ...)"
    )
    args = parser.parse_args(argv)
    from lowbit.errors import LowbitError
    from lowbit.registry import registry

    if args.low_precision != "none" and args.low_precision not in registry.names("precision"):
        raise LowbitError(
            f"--low-precision {args.low_precision!r} is not a precision plugin; valid: none, "
            + ", ".join(registry.names("precision"))
        )
    budgets = sorted(int(b) for b in args.budgets.split(","))
    if budgets[0] < args.dit_layers:
        raise LowbitError(f"--budgets must be at least one DiT step ({args.dit_layers} blocks), got {budgets[0]}")
    out = args.out or Path("runs/bench/fpdm") / dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    echo = lambda m: print(m, file=sys.stderr)
    trained = train_models(args, out, echo)
    memory = memory_rows(trained, args, echo)
    evaluate(trained, budgets, args.fid_samples, echo)
    convergence(trained, echo)
    command = "lowbit bench fpdm " + " ".join(argv if argv is not None else sys.argv[3:])
    text = f"`{command.strip()}` — {dt.date.today()}, {device_name()}\n\n{tables(trained, budgets, args, memory)}"
    (out / "fpdm.md").write_text(text)
    plot(trained, budgets, memory, out / "fpdm.png")
    sample_grid(trained, budgets, out / "fpdm_samples.png")
    results = {
        name: {
            "params": m.params,
            "memory_bytes": m.memory_bytes,
            "saved_bytes": m.saved_bytes,
            "val_loss": m.val_loss,
            "train_seconds": m.train_seconds,
            "fid": {str(b): r for b, r in m.fid.items()},
            "convergence": m.convergence,
        }
        for name, m in trained.items()
    }
    payload = {"budgets": budgets, "models": results, "memory": memory}
    (out / "fpdm.json").write_text(json.dumps(payload, indent=1))
    print(text)
    print(f"table: {out / 'fpdm.md'} | plots: {out / 'fpdm.png'}, {out / 'fpdm_samples.png'}")
    return 0
