"""QAT vs PTQ vs torchao's QAT: one BF16 checkpoint made low-bit every way, each evaluated as exported.

    lowbit bench qat [--recipe bf16_llm] [--steps 600] [--finetune 200] [--rows ...] [--out DIR] [overrides]

1. Pretrain the recipe in BF16 for ``--steps`` (the checkpoint every row starts from).
2. PTQ rows (``lowbit quantize``): RTN INT8 W8A8, RTN INT4 W4A8 (min-max and MSE ranges), AdaRound
   INT4 W4A8 on ``--calibration`` training sequences.
3. Fine-tuning rows, ``--finetune`` steps each from that checkpoint (``init_from``), the same data,
   optimizer and schedule: BF16 (the reference of the fine-tuned rows), lowbit QAT INT8, INT4 (LSQ),
   fixed point 8/4-bit (QFX), NVFP4, and torchao's own QAT (``QATConfig`` with
   ``Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(32))``:
   prepare, the same fine-tuning loop, convert), on the same layers (the head stays high precision).
4. Every lowbit row is exported (``lowbit export``: packed codes + scales in safetensors) and loaded
   back; the table's loss is the exported model's, evaluated in FP32 on the whole validation split.

Columns: val loss (and accuracy for classifiers); gap to the BF16 reference (the pretrained model for
PTQ rows, the BF16 fine-tune for fine-tuned rows); the share of PTQ RTN INT4's gap a W4A8 QAT row
recovers (1 - gap / PTQ gap); exported bytes vs the same model's parameters in BF16 (and the quantized
layers' bytes vs the same layers in BF16; the layers kept high precision are stored in FP32); inference ms per
validation batch on this machine (median of 20), and the median ratio to the BF16 model's forward under BF16
autocast, the two timed alternately (the exported model runs as evaluated: FP32 outside its integer GEMMs).
Outputs ``qat.md`` (the table) and ``qat.png`` (fine-tuning curves) under ``--out``; every run keeps
its folder there, and a finished one is read back when the bench runs again.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lowbit.bench._report import markdown_table, train_once, write_report
from lowbit.errors import LowbitError

__all__ = ["ROWS", "Row", "main"]


@dataclass(frozen=True)
class Row:
    """One way to a low-bit model: ``kind`` ``pretrained``, ``ptq``, ``finetune`` or ``torchao``."""

    name: str
    kind: str
    what: str
    overrides: tuple[str, ...] = ()  # the precision (and options) of a PTQ or fine-tuning row
    method: str = "rtn"  # PTQ
    ranges: str = "minmax"  # PTQ
    w4a8: bool = False  # counts toward "share of the PTQ INT4 gap recovered"


ROWS = {
    r.name: r
    for r in (
        Row("bf16", "pretrained", "BF16 checkpoint (the PTQ rows' reference)"),
        Row("ptq_int8", "ptq", "PTQ RTN W8A8 (INT8 per channel, INT8 per token)", ("precision=qat_int8",)),
        Row("ptq_int4", "ptq", "PTQ RTN W4A8 g32 (min-max ranges)", ("precision=qat_int4",), w4a8=True),
        Row("ptq_int4_mse", "ptq", "PTQ RTN W4A8 g32 (MSE ranges)", ("precision=qat_int4",), ranges="mse", w4a8=True),
        Row(
            "ptq_adaround",
            "ptq",
            "PTQ AdaRound W4A8 g32 (MSE ranges)",
            ("precision=qat_int4",),
            method="adaround",
            ranges="mse",
            w4a8=True,
        ),
        Row("bf16_ft", "finetune", "BF16 fine-tune (the fine-tuned rows' reference)", ("precision=bf16",)),
        Row("qat_int8", "finetune", "QAT W8A8 (min-max)", ("precision=qat_int8",)),
        Row("qat_int4", "finetune", "QAT W4A8 g32, learned step sizes (LSQ)", ("precision=qat_int4",), w4a8=True),
        Row("qat_fixed8", "finetune", "QAT fixed point 8-bit, learned binary point (QFX)", ("precision=qat_fixed",)),
        Row(
            "qat_fixed4",
            "finetune",
            "QAT fixed point 4-bit, learned binary point (QFX)",
            ("precision=qat_fixed", "precision.bits=4"),
        ),
        Row("qat_nvfp4", "finetune", "QAT NVFP4 weights (FP4 inference)", ("precision=qat_nvfp4",)),
        Row("torchao_int4", "torchao", "torchao QAT 8da4w (W4A8 g32), same fine-tuning", w4a8=True),
    )
}


@dataclass
class Outcome:
    row: Row
    metrics: dict[str, float]
    reference: str
    bytes: int | None = None
    bf16_bytes: int | None = None
    layer_ratio: float | None = None  # the quantized layers' exported bytes vs the same layers in BF16
    ms: float | None = None
    ms_ratio: float | None = None  # vs the BF16 model under BF16 autocast, measured alternately
    curve: dict[int, float] = field(default_factory=dict)


# ---- evaluation --------------------------------------------------------------------------------------


def _validate(task: Any, data: Any, limit: Any) -> dict[str, float]:
    """Validation metrics of ``task`` on ``data`` in FP32 (no autocast), the whole split unless ``limit``."""
    import lightning as L

    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        limit_val_batches=limit,
    )
    metrics = trainer.validate(task, datamodule=data, verbose=False)[0]
    return {k: float(v) for k, v in metrics.items()}


def _inference_ms(
    model: torch.nn.Module, reference: torch.nn.Module, batch: torch.Tensor, autocast: bool = False, repeats: int = 20
) -> tuple[float, float]:
    """(median ms of one forward of ``model`` over ``batch``, median ratio to the BF16 ``reference``'s forward
    under BF16 autocast), the two alternating call by call after two warm-ups of each, so that the load
    of the machine, which drifts over seconds, weighs on both sides of every ratio alike. ``autocast``:
    ``model`` under BF16 autocast too (the BF16 row)."""
    model.eval(), reference.eval()
    times, ratios = [], []
    with torch.inference_mode():
        for i in range(repeats + 2):
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                model(batch)
            mid = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                reference(batch)
            end = time.perf_counter()
            if i >= 2:
                times.append(1e3 * (mid - start))
                ratios.append((mid - start) / (end - mid))
    return statistics.median(times), statistics.median(ratios)


def _timing(model: torch.nn.Module, reference: torch.nn.Module, batch: torch.Tensor) -> dict[str, float]:
    ms, ratio = _inference_ms(model, reference, batch)
    return {"ms": ms, "ms_ratio": ratio}


def _bf16_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters stored in BF16 (tied parameters once)."""
    return 2 * sum(p.numel() for p in model.parameters())


def _state_bytes(model: torch.nn.Module) -> int:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return len(buffer.getvalue())


def _first_input(data: Any) -> torch.Tensor:
    """The model input of the first validation batch (token ids, or images)."""
    data.setup("validate")
    batch = next(iter(data.val_dataloader()))
    return batch[0] if isinstance(batch, (list, tuple)) else batch


# ---- the rows ----------------------------------------------------------------------------------------


class Bench:
    def __init__(self, recipe: str, steps: int, finetune: int, calibration: int, out: Path, overrides: list[str]):
        self.recipe, self.steps, self.finetune, self.calibration = recipe, steps, finetune, calibration
        self.out, self.overrides = out, overrides
        self.base_dir = out / "bf16-pretrain"

    def compose(self, *extra: str, run_dir: Path | None = None):
        from lowbit.config import compose

        overrides = [f"recipe={self.recipe}", "logger=csv", *self.overrides, *extra]
        if run_dir is not None:
            overrides.append(f"hydra.run.dir={run_dir}")
        return compose(overrides)

    def finetune_overrides(self) -> list[str]:
        """The fine-tuning every fine-tuned row shares: from the checkpoint, a tenth of the recipe's
        learning rate, a short warm-up, ``--finetune`` steps, validation at the end only."""
        lr = float(self.compose().cfg.optimizer.lr) / 10
        return [
            f"init_from={self.base_dir.resolve()}",
            f"trainer.max_steps={self.finetune}",
            f"trainer.val_check_interval={self.finetune}",
            f"optimizer.lr={lr}",
            f"scheduler.warmup_steps={max(1, self.finetune // 10)}",
            f"checkpoint.every_n_steps={self.finetune}",
        ]

    def pretrain(self, echo) -> None:
        overrides = [
            f"recipe={self.recipe}",
            "logger=csv",
            f"trainer.max_steps={self.steps}",
            *self.overrides,
            f"hydra.run.dir={self.base_dir}",
        ]
        train_once(overrides, self.base_dir, "bf16 pretrain", echo)

    def reference_data(self):
        """The data module every row is evaluated on, and the recipe's config."""
        from lowbit.config import plain
        from lowbit.registry import registry

        cfg = self.compose().cfg
        return registry.build("data", plain(cfg.data), seed=int(cfg.seed)), cfg

    def reference_model(self) -> torch.nn.Module:
        """The pretrained BF16 network, every row's speed reference (run under BF16 autocast)."""
        if getattr(self, "_reference", None) is None:
            from lowbit.run import build

            built = build(self.compose().cfg)
            _load_checkpoint(built.task, self.base_dir)
            self._reference = built.task.model
        return self._reference

    def reference_bytes(self) -> int:
        """The BF16 model's parameter bytes, every row's size reference (an exported model's packed layers
        hold buffers, not parameters)."""
        from lowbit.run import build

        return _bf16_bytes(build(self.compose().cfg).task.model)

    def run_row(self, row: Row, echo) -> Outcome:
        from lowbit.run import build

        data, cfg = self.reference_data()
        limit = cfg.trainer.get("limit_val_batches")
        batch = _first_input(data)
        if row.kind == "pretrained":
            built = build(self.compose().cfg)
            _load_checkpoint(built.task, self.base_dir)
            metrics = _validate(built.task, data, limit)
            n = _bf16_bytes(built.task.model)
            ms, ratio = _inference_ms(self.reference_model(), self.reference_model(), batch, autocast=True)
            return Outcome(row, metrics, "", bytes=n, bf16_bytes=n, ms=ms, ms_ratio=ratio)
        if row.kind == "torchao":
            return self.torchao_row(row, data, limit, batch, echo)
        run_dir = self.out / row.name
        if row.kind == "ptq":
            from lowbit.quant.ptq import quantize_checkpoint

            if not (run_dir / "checkpoints" / "last.ckpt").is_file():
                echo(f"[{row.name}] lowbit quantize ({row.method}, {row.ranges} ranges)")
                quantize_checkpoint(
                    self.base_dir,
                    list(row.overrides),
                    method=row.method,
                    ranges=row.ranges,
                    calibration=self.calibration,
                    out=run_dir,
                )
            reference = "bf16"
        else:
            overrides = [f"recipe={self.recipe}", "logger=csv", *self.overrides, *row.overrides]
            overrides += [*self.finetune_overrides(), f"hydra.run.dir={run_dir}"]
            train_once(overrides, run_dir, row.name, echo)
            reference = "bf16_ft"
        curve = _train_curve(run_dir) if row.kind == "finetune" else {}
        if row.name == "bf16_ft":
            built = build(self.compose().cfg)
            _load_checkpoint(built.task, run_dir)
            n = _bf16_bytes(built.task.model)
            metrics = _validate(built.task, data, limit)
            return Outcome(row, metrics, "", bytes=n, bf16_bytes=n, ms=None, curve=curve)
        from lowbit.quant.export import export_checkpoint, load_exported

        export_dir = run_dir / "export"
        if not (export_dir / "manifest.json").is_file():
            export_checkpoint(run_dir, export_dir)
        task = load_exported(export_dir)
        metrics = _validate(task, data, limit)
        size = (export_dir / "model.safetensors").stat().st_size
        manifest = json.loads((export_dir / "manifest.json").read_text())
        return Outcome(
            row,
            metrics,
            reference,
            bytes=size,
            bf16_bytes=self.reference_bytes(),
            layer_ratio=manifest["bytes"]["ratio"],
            **_timing(task.model, self.reference_model(), batch),
            curve=curve,
        )

    def torchao_row(self, row: Row, data: Any, limit: Any, batch: torch.Tensor, echo) -> Outcome:
        """torchao's QAT on the same layers, fine-tuned by the same Lightning loop as ``train`` runs
        (same data stream, optimizer, schedule, clipping and seed), then converted and evaluated."""
        import lightning as L
        from lightning.pytorch.loggers import CSVLogger
        from torch import nn
        from torchao.quantization import Int8DynamicActivationIntxWeightConfig, PerGroup, quantize_
        from torchao.quantization.qat import QATConfig

        from lowbit.config import plain
        from lowbit.run import build

        layers = set(build(self.compose("precision=qat_int4").cfg).precision.report.converted)  # lowbit's QAT layers
        composed = self.compose("precision=bf16", *self.finetune_overrides())
        cfg = composed.cfg
        L.seed_everything(int(cfg.seed), workers=True, verbose=False)
        built = build(cfg)
        base = Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(32))

        def eligible(module: nn.Module, name: str) -> bool:
            return isinstance(module, nn.Linear) and name in layers

        quantize_(built.task, QATConfig(base, step="prepare"), filter_fn=eligible)
        run_dir = self.out / row.name
        shutil.rmtree(run_dir, ignore_errors=True)  # the fine-tune is redone: its log starts empty
        mine = ("enable_progress_bar", "enable_checkpointing", "limit_val_batches", "val_check_interval")
        trainer_cfg = {k: v for k, v in plain(cfg.trainer).items() if k not in mine}
        prepared = sum(type(m).__name__ == "FakeQuantizedLinear" for m in built.task.modules())
        if prepared != len(layers):
            raise LowbitError(f"torchao prepared {prepared} Linear layers, lowbit's QAT converts {len(layers)}")
        echo(f"[{row.name}] torchao QAT prepare ({prepared} layers) -> {self.finetune} steps -> convert")
        start = time.perf_counter()
        trainer = L.Trainer(
            **trainer_cfg,
            plugins=[built.precision],
            logger=CSVLogger(str(run_dir), name="csv", version=""),
            enable_progress_bar=False,
            enable_checkpointing=False,
            check_val_every_n_epoch=None,
            max_epochs=-1,
            limit_val_batches=0,
        )
        trainer.fit(built.task, datamodule=built.data)
        echo(f"[{row.name}] fine-tuned ({time.perf_counter() - start:.0f} s)")
        quantize_(built.task, QATConfig(base, step="convert"), filter_fn=eligible)
        metrics = _validate(built.task, data, limit)
        curve = _read_curve(run_dir / "csv" / "metrics.csv")
        return Outcome(
            row,
            metrics,
            "bf16_ft",
            bytes=_state_bytes(built.task.model),
            bf16_bytes=self.reference_bytes(),
            **_timing(built.task.model, self.reference_model(), batch),
            curve=curve,
        )


def _load_checkpoint(task: Any, run_dir: Path) -> None:
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    task.load_state_dict(ckpt["state_dict"])


def _read_curve(path: Path) -> dict[int, float]:
    import csv

    if not path.is_file():
        return {}
    with open(path) as f:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}


def _train_curve(run_dir: Path) -> dict[int, float]:
    return _read_curve(run_dir / "csv" / "metrics.csv")


# ---- report ------------------------------------------------------------------------------------------


def table(outcomes: list[Outcome]) -> str:
    by_name = {o.row.name: o for o in outcomes}
    metric = "val/loss"
    ptq_gap = None
    if "ptq_int4" in by_name and "bf16" in by_name:
        ptq_gap = by_name["ptq_int4"].metrics[metric] - by_name["bf16"].metrics[metric]
    has_acc = any("val/acc" in o.metrics for o in outcomes)
    rows = []
    for o in outcomes:
        loss = o.metrics[metric]
        ref = by_name.get(o.reference)
        gap = (
            "" if ref is None else f"{loss - ref.metrics[metric]:+.4f} ({100 * (loss / ref.metrics[metric] - 1):+.2f}%)"
        )
        recovered = ""
        if o.row.w4a8 and o.row.kind != "ptq" and ptq_gap and ref is not None:
            recovered = f"{100 * (1 - (loss - ref.metrics[metric]) / ptq_gap):.0f}%"
        size = "" if o.bytes is None else f"{o.bytes / 1e6:.2f} MB ({o.bytes / o.bf16_bytes:.2f}x"
        size += "" if o.bytes is None else ")" if o.layer_ratio is None else f"; layers {o.layer_ratio:.3f}x)"
        speed = "" if o.ms is None else f"{o.ms:.1f} ({o.ms_ratio:.2f}x)"
        acc = [f"{100 * o.metrics['val/acc']:.2f}%"] if has_acc else []
        rows.append([f"`{o.row.name}`", o.row.what, f"{loss:.4f}", *acc, gap, recovered, size, speed])
    header = ["row", "what", "val loss", *(["val acc"] if has_acc else []), "gap to BF16 ref", "PTQ INT4 gap recovered"]
    return markdown_table([*header, "exported size (vs BF16)", "inference ms/batch (vs BF16)"], rows)


def plot(outcomes: list[Outcome], path: Path) -> None:
    from lowbit.compare import plot_curves

    curves = {o.row.name: o.curve for o in outcomes if o.curve}
    if "bf16_ft" in curves:
        plot_curves(curves, path, "bf16_ft", panels=("loss", "gap"), smoothing=0.9)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lowbit bench qat", description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="bf16_llm", help="the BF16 recipe to pretrain (bf16_llm, bf16_vit)")
    parser.add_argument("--steps", type=int, default=600, help="BF16 pretraining steps")
    parser.add_argument("--finetune", type=int, default=200, help="fine-tuning steps of every fine-tuned row")
    parser.add_argument("--calibration", type=int, default=128, help="PTQ calibration sequences (images)")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, from: {', '.join(ROWS)}")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default runs/bench/qat/<recipe>)")
    parser.add_argument("overrides", nargs="*", help="config overrides for every run (model.dim=256 ...)")
    args = parser.parse_args(argv)
    names = args.rows.split(",")
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        raise LowbitError(f"unknown qat bench row '{unknown[0]}'; valid: {', '.join(ROWS)}")
    for flag in ("steps", "finetune", "calibration"):
        if getattr(args, flag) < 1:
            raise LowbitError(f"--{flag} must be a positive integer, got {getattr(args, flag)}")
    out = args.out or Path("runs/bench/qat") / args.recipe
    out.mkdir(parents=True, exist_ok=True)
    echo = lambda m: print(m, file=sys.stderr)  # noqa: E731
    bench = Bench(args.recipe, args.steps, args.finetune, args.calibration, out, list(args.overrides))
    bench.pretrain(echo)
    outcomes = []
    for name in names:
        start = time.perf_counter()
        outcomes.append(bench.run_row(ROWS[name], echo))
        echo(f"[{name}] val/loss {outcomes[-1].metrics['val/loss']:.4f} ({time.perf_counter() - start:.0f} s)")
    write_report("qat", argv, table(outcomes), out, lambda path: plot(outcomes, path))
    return 0
