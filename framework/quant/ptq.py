"""Post-training quantization: a trained checkpoint into a QAT-config run with stored weight scales.

``lowbit quantize RUN precision=qat_int4`` rebuilds the run's model under an integer QAT preset whose
weight quantizers hold fixed scales (``weight_mode=static``), loads the trained weights, and picks
the scales and the rounding without training:

  rtn       round to nearest (Krishnamoorthi 2018), the scales from ``ranges``:
              minmax  the numerics' own scale: the absmax of each channel or group;
              mse     per block, the clipping ratio alpha in [0.2, 1] (a grid) of the min-max scale
                      whose rounding has the least squared error (the MSE range setting of Nagel et
                      al. 2021, "A White Paper on Neural Network Quantization", per block).
  adaround  Nagel et al. 2020, "Up or Down? Adaptive Rounding for Post-Training Quantization": the
            same scales, then layer by layer in forward order each weight's rounding direction
            (down or up) is learned on calibration inputs, then rounded hard.

AdaRound's inputs are the quantized model's own (earlier layers already rounded, activation
quantizers on: what the layer sees at inference, as the paper's asymmetric reconstruction feeds
it), captured by a hook from ``calibration`` sequences of the training stream; its target is the
float layer on those same inputs, W x, so each layer matches its own float output rather than
also correcting its predecessors' error (which would need a second, float pass per layer).

Every method writes the dequantized weights (code x scale) into the layers and the scales into
``weight_quant``: ``fake_quantize`` with the stored scales gives back exactly those codes (checked
for every layer), so the model evaluates, fine-tunes and exports (``lowbit export``) the same
numbers, and the checkpoint's weights are the quantized ones whatever precision loads them.
Static activation scales (``qat_int8 activations=static``) are each layer's input absmax over the
calibration batches (quantized weights, float inputs). The output is a run directory:
``config.yaml`` (the source's, the precision node replaced) and ``checkpoints/last.ckpt``
(``state_dict`` as Lightning writes it, and ``lowbit_ptq``: method, ranges, calibration, seed, losses).
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.numerics import QuantSpec, block_layout, fake_quantize, get_format, quantize
from lowbit.quant.qat import FakeQuant, QATLinear, QATPrecision, qat_layers
from lowbit.rundir import checkpoint_and_run

__all__ = [
    "ADAROUND_ITERS",
    "PTQ_METHODS",
    "RANGES",
    "Rounded",
    "adaround",
    "block_sq_error",
    "quantize_checkpoint",
    "quantize_main",
    "rectified_sigmoid",
    "weight_ranges",
]

PTQ_METHODS = ("rtn", "adaround")
RANGES = ("minmax", "mse")
ADAROUND_ITERS = 500  # per layer; the paper runs 10k (batch 32 images), a few hundred already beat RTN
ZETA, GAMMA = 1.1, -0.1  # the rectified sigmoid's stretch (Louizos et al. 2018's hard concrete, as AdaRound)


# ---- weight ranges ---------------------------------------------------------------------------------
def block_sq_error(x: torch.Tensor, x_hat: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """The squared error sum(x - x_hat)^2 of each block of ``spec``, shaped as the block scales."""
    layout = block_layout(x.shape, spec.block)
    err = (x.float() - x_hat.float()).pow(2)
    if layout.per_tensor:
        return err.sum().reshape(layout.scale_shape)
    return layout.blocks(layout.block_rows(err)).sum(dim=(1, 3)).reshape(layout.scale_shape)  # (n, r, nb, c) -> (n, nb)


@torch.no_grad()
def weight_ranges(
    weight: torch.Tensor, spec: QuantSpec, ranges: str = "minmax", grid: int = 100, low: float = 0.2
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(decode scales, zero points or None) of a weight, shaped as ``spec``'s blocks lay them out.

    ``minmax``: the numerics' own (absmax / Qmax per block; min/max with a zero point if asymmetric).
    ``mse``: each block's min-max scale times the alpha of ``grid`` values in [low, 1] whose
    fake-quantization has the least squared error in that block (zero points kept), one
    ``fake_quantize`` of the whole weight per alpha; alpha = 1 wins ties, so never worse than min-max.
    """
    if ranges not in RANGES:
        raise LowbitError(f"unknown ranges '{ranges}'; valid: {', '.join(RANGES)}")
    w = weight.detach().float()
    q = quantize(w, spec)
    scales, zero_points = q.scales.float(), q.zero_points
    if ranges == "minmax":
        return scales, zero_points
    best = scales.clone()
    best_err = block_sq_error(w, fake_quantize(w, spec, scales=scales, zero_points=zero_points), spec)
    for alpha in torch.linspace(low, 1.0, grid).tolist():
        candidate = scales * alpha
        err = block_sq_error(w, fake_quantize(w, spec, scales=candidate, zero_points=zero_points), spec)
        better = err < best_err
        best, best_err = torch.where(better, candidate, best), torch.where(better, err, best_err)
    return best, zero_points


def _per_element(t: torch.Tensor, spec: QuantSpec, shape: tuple[int, ...]) -> torch.Tensor:
    """Block scales (or zero points) broadcast to every element of a tensor of ``shape``."""
    layout = block_layout(shape, spec.block)
    n = 1 if layout.per_tensor else layout.n_block_rows
    blocks = (layout.n_block_rows, layout.rows, layout.blocks_per_row, layout.cols)
    return t.float().reshape(n, 1, layout.blocks_per_row, 1).expand(blocks).reshape(shape)


# ---- AdaRound ---------------------------------------------------------------------------------------
def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    """AdaRound's rectified sigmoid h(V) = clamp(sigmoid(V) (zeta - gamma) + gamma, 0, 1): reaches 0 and 1."""
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


@dataclass
class Rounded:
    """AdaRound's result for one layer: the dequantized weight (code - z) * s, its integer codes,
    and the reconstruction error mean ||W x - W~ Q(x)||^2 over the calibration rows, RTN's beside it."""

    weight: torch.Tensor
    codes: torch.Tensor
    error: float
    error_rtn: float
    seconds: float


def adaround(
    weight: torch.Tensor,
    inputs: torch.Tensor,
    spec: QuantSpec,
    scales: torch.Tensor,
    zero_points: torch.Tensor | None = None,
    *,
    input_quant: Callable[[torch.Tensor], torch.Tensor] | None = None,
    iters: int = ADAROUND_ITERS,
    lam: float = 0.01,
    lr: float = 1e-3,
    warmup: float = 0.2,
    beta: tuple[float, float] = (20.0, 2.0),
    batch_rows: int = 1024,
    seed: int = 0,
) -> Rounded:
    """Learn whether each weight of a linear layer (out, in) rounds down or up (AdaRound's relaxation):

        min_V  ||W x - W~ Q(x)||^2 + lam * sum(1 - |2 h(V) - 1|^beta),
        W~ = s * (clamp(floor(W / s) + z + h(V), Qmin, Qmax) - z)

    over ``inputs`` (N, in) (minibatches of ``batch_rows`` rows, Adam), Q the layer's input
    quantizer (None: float inputs). V starts where h(V) is the fractional part of W / s (W~ = W
    inside the range); the regularizer is off for the first ``warmup`` of the iterations, then beta
    anneals linearly from beta[0] to beta[1]. The result rounds hard: up where h(V) >= 0.5.
    """
    start = time.perf_counter()
    element = get_format(spec.element)
    w = weight.detach().float()
    s = _per_element(scales.clamp_min(torch.finfo(torch.float32).tiny), spec, tuple(w.shape))  # (out, in)
    z = 0.0 if zero_points is None else _per_element(zero_points, spec, tuple(w.shape))
    x = inputs.detach().float().reshape(-1, w.shape[1])  # (N, in)
    with torch.no_grad():
        x_q = x if input_quant is None else input_quant(x).float()
        target = x @ w.T  # (N, out): the float layer
    w_floor = torch.floor(w / s)
    frac = w / s - w_floor  # in [0, 1)
    v = nn.Parameter(-torch.log((ZETA - GAMMA) / (frac - GAMMA) - 1))  # h(v) = frac
    optimizer = torch.optim.Adam([v], lr=lr)

    def rounded(h: torch.Tensor) -> torch.Tensor:
        return (torch.clamp(w_floor + z + h, element.qmin, element.qmax) - z) * s

    generator = torch.Generator(device=x.device).manual_seed(seed)
    n, warm = x.shape[0], int(warmup * iters)
    for step in range(iters):
        rows = (
            torch.randint(0, n, (batch_rows,), generator=generator, device=x.device) if n > batch_rows else slice(None)
        )
        h = rectified_sigmoid(v)
        loss = (x_q[rows] @ rounded(h).T - target[rows]).pow(2).sum(1).mean()
        if step >= warm:
            b = beta[1] + (beta[0] - beta[1]) * (1 - (step - warm) / max(iters - warm, 1))
            loss = loss + lam * (1 - (2 * h - 1).abs().pow(b)).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    with torch.no_grad():
        codes = torch.clamp(w_floor + z + (rectified_sigmoid(v) >= 0.5).float(), element.qmin, element.qmax)
        w_q = (codes - z) * s
        w_rtn = fake_quantize(w, spec, scales=scales, zero_points=zero_points)
        error = float((x_q @ w_q.T - target).pow(2).sum(1).mean())
        error_rtn = float((x_q @ w_rtn.T - target).pow(2).sum(1).mean())
    return Rounded(w_q, codes.to(torch.int32), error, error_rtn, time.perf_counter() - start)


# ---- the model: forward order, captured inputs, calibration -----------------------------------------
class _Captured(Exception):
    """Ends a calibration forward once the layer of interest has seen its input."""


@contextlib.contextmanager
def _without(layers: Mapping[str, QATLinear], quantizer: str) -> Iterator[None]:
    """The layers' ``weight_quant`` or ``input_quant`` off for the block (restored even on error)."""
    saved = {name: getattr(layer, quantizer) for name, layer in layers.items()}
    try:
        for layer in layers.values():
            setattr(layer, quantizer, None)
        yield
    finally:
        for name, layer in layers.items():
            setattr(layer, quantizer, saved[name])


@contextlib.contextmanager
def _pre_hooks(layers: Mapping[str, nn.Module], hook: Callable[[str, torch.Tensor], None]) -> Iterator[None]:
    handles = [
        m.register_forward_pre_hook(lambda _m, args, name=name: hook(name, args[0])) for name, m in layers.items()
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _forward_order(layers: Mapping[str, QATLinear], run: Callable[[torch.Tensor], Any], inputs: torch.Tensor):
    """(layer names in the order a forward first calls them, whether each is called exactly once)."""
    calls: dict[str, int] = {}

    def count(name: str, _x: torch.Tensor) -> None:
        calls[name] = calls.get(name, 0) + 1

    with _pre_hooks(layers, count):
        run(inputs)
    return list(calls), all(c == 1 for c in calls.values())


def _capture(layer: QATLinear, run: Callable[[torch.Tensor], Any], batches: Sequence[torch.Tensor], stop: bool):
    """The layer's inputs (rows, in) over the calibration batches, in float32; ``stop``: end each
    forward there (the layer runs once per forward, so nothing after it is needed)."""
    seen: list[torch.Tensor] = []

    def keep(_name: str, x: torch.Tensor) -> None:
        seen.append(x.detach().float().reshape(-1, x.shape[-1]))
        if stop:
            raise _Captured

    with _pre_hooks({"layer": layer}, keep):
        for inputs in batches:
            with contextlib.suppress(_Captured):
                run(inputs)
    return torch.cat(seen)


def _calibrate_static_inputs(layers: Mapping[str, QATLinear], run, batches: Sequence[torch.Tensor]) -> list[str]:
    """Static input scales: each layer's input absmax over the calibration batches, measured with
    quantized weights and float inputs, set as ``FakeQuant._calibrate`` would over those forwards."""
    static = {n: m for n, m in layers.items() if m.input_quant is not None and m.input_quant.mode == "static"}
    if not static:
        return []
    amax = {name: torch.zeros(()) for name in static}

    def observe(name: str, x: torch.Tensor) -> None:
        amax[name] = torch.maximum(amax[name], x.detach().abs().amax().float().cpu())

    with _without(layers, "input_quant"), _pre_hooks(static, observe):
        for inputs in batches:
            run(inputs)
    for name, layer in static.items():
        quant: FakeQuant = layer.input_quant
        device = quant.scale.device
        quant.set_scales(quantize(amax[name].reshape(1).to(device), quant.spec.replace(block="tensor")).scales)
        quant.amax.copy_(amax[name])
    return list(static)


@torch.no_grad()
def _store(name: str, layer: QATLinear, weight_q: torch.Tensor, scales: torch.Tensor, zero_points) -> None:
    """Write the dequantized weight and its scales; the numerics must give back the same values from
    the stored weight and scales (so the same codes: each value is (code - z) * s)."""
    quant: FakeQuant = layer.weight_quant
    layer.weight.copy_(weight_q)
    quant.set_scales(scales, zero_points)
    stored = layer.weight.detach().float()
    again = fake_quantize(stored, quant.spec, scales=quant.scale, zero_points=zero_points)
    if not torch.equal(again, stored):
        worst = float((again - stored).abs().max())
        raise RuntimeError(f"{name}: the stored scales do not reproduce the PTQ codes (max difference {worst:g})")


def _stored_scales(quant: FakeQuant) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A static weight quantizer's (scales, zero points or None), as copies."""
    zero_points = quant.zero_point.detach().clone() if quant.spec.asymmetric else None
    return quant.scale.detach().clone(), zero_points


def _round_weights(
    layers: Mapping[str, QATLinear], run, batches: Sequence[torch.Tensor], method: str, iters: int, seed: int, echo
) -> dict[str, dict[str, float]]:
    """Round every layer's weight with its stored scales: AdaRound in forward order (each layer's inputs
    captured with the layers before it already rounded), round-to-nearest for the rest; returns
    AdaRound's per-layer reconstruction errors."""
    report: dict[str, dict[str, float]] = {}
    order, once = _forward_order(layers, run, batches[0]) if method == "adaround" else ([], True)
    for i, name in enumerate(order):
        layer = layers[name]
        inputs = _capture(layer, run, batches, stop=once)
        scales, zero_points = _stored_scales(layer.weight_quant)
        spec = layer.weight_quant.spec
        result = adaround(
            layer.weight, inputs, spec, scales, zero_points, input_quant=layer.input_quant, iters=iters, seed=seed + i
        )
        _store(name, layer, result.weight, scales, zero_points)
        gain = 100 * (1 - result.error / result.error_rtn) if result.error_rtn > 0 else 0.0
        echo(
            f"  {name}: reconstruction {result.error:.4g} vs RTN {result.error_rtn:.4g} ({gain:.1f}% lower), "
            f"{inputs.shape[0]} rows, {result.seconds:.1f} s"
        )
        report[name] = {"error": result.error, "error_rtn": result.error_rtn, "seconds": result.seconds}
    for name, layer in layers.items():
        if name not in report:  # rtn, or a layer no forward reached
            scales, zero_points = _stored_scales(layer.weight_quant)
            spec = layer.weight_quant.spec
            w_q = fake_quantize(layer.weight.detach().float(), spec, scales=scales, zero_points=zero_points)
            _store(name, layer, w_q, scales, zero_points)
    return report


@torch.no_grad()
def _val_loss(task: nn.Module, batches: Sequence[Any], precision: Any) -> float | None:
    """The task's validation loss over ``batches`` (its ``val_loss`` metric), its metrics reset after."""
    from torchmetrics import Metric

    metric = getattr(task, "val_loss", None)
    if not isinstance(metric, Metric) or not batches:
        return None
    metric.reset()
    with precision.forward_context():
        for i, batch in enumerate(batches):
            task.validation_step(batch, i)
    loss = float(metric.compute())
    for m in task.modules():
        if isinstance(m, Metric):
            m.reset()
    return loss


def _to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    return type(batch)(_to(t, device) for t in batch) if isinstance(batch, (list, tuple)) else batch


def _calibration_inputs(data: Any, count: int, device: torch.device) -> list[torch.Tensor]:
    """The first ``count`` samples' inputs of the training stream (the data seed's), in its batches."""
    if hasattr(data, "prepare_data"):
        data.prepare_data()
    batches, have = [], 0
    for batch in data.train_dataloader():
        inputs = batch[0][: count - have]
        batches.append(inputs.to(device))
        have += inputs.shape[0]
        if have >= count:
            return batches
    return batches


# ---- the presets PTQ fills ---------------------------------------------------------------------------
def _ptq_presets() -> list[str]:
    from lowbit.registry import registry

    names = []
    for name in registry.names("precision"):
        with contextlib.suppress(LowbitError):
            if _fits_ptq(registry.load("precision", name)):
                names.append(name)
    return names


def _fits_ptq(factory: Any) -> bool:
    """A QAT preset whose weight scales can be stored: it takes ``weight_mode`` and ``lsq``."""
    if not (isinstance(factory, type) and issubclass(factory, QATPrecision)):
        return False
    return {"weight_mode", "lsq"} <= set(inspect.signature(factory).parameters)


def _precision_node(overrides: Sequence[str]) -> dict[str, Any]:
    """The QAT preset's config node from ``precision=...`` overrides, with stored weight scales."""
    from lowbit.config import compose, plain
    from lowbit.registry import registry

    for o in overrides:
        if o.lstrip("+~").partition("=")[0].partition(".")[0] != "precision":
            raise LowbitError(
                f"lowbit quantize takes precision overrides only (precision=NAME, precision.KEY=VALUE), got '{o}'"
            )
    name = str(compose(overrides).cfg.precision.name)
    if not _fits_ptq(registry.load("precision", name)):
        raise LowbitError(
            f"precision '{name}' is not an integer QAT preset with stored scales; lowbit quantize fills one of: "
            f"{', '.join(_ptq_presets())} (precision=qat_int4)"
        )
    return plain(compose([*overrides, "precision.weight_mode=static", "precision.lsq=false"]).cfg.precision)


def _check_out(out: Path) -> None:
    from lowbit.rundir import RUN_FILES

    held = [name for name in RUN_FILES if (out / name).exists()]
    if held:
        raise LowbitError(f"{out} already holds a run ({', '.join(held)}); choose another --out")


def _check_options(method: str, ranges: str, calibration: int, iters: int, val_batches: int) -> None:
    if method not in PTQ_METHODS:
        raise LowbitError(f"unknown PTQ method '{method}'; valid: {', '.join(PTQ_METHODS)}")
    if ranges not in RANGES:
        raise LowbitError(f"unknown ranges '{ranges}'; valid: {', '.join(RANGES)}")
    for what, value, low in (("calibration", calibration, 1), ("iters", iters, 0), ("val batches", val_batches, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise LowbitError(f"{what} must be an integer of at least {low}, got {value!r}")


def _versus(loss: float | None, source: float | None) -> str:
    if loss is None:
        return "n/a"
    return f"{loss:.4f}" + (f" ({100 * (loss / source - 1):+.1f}%)" if source else "")


def quantize_checkpoint(
    source: str | Path,
    precision_overrides: Sequence[str],
    method: str = "rtn",
    ranges: str = "minmax",
    calibration: int = 256,
    out: str | Path | None = None,
    seed: int = 0,
    iters: int = ADAROUND_ITERS,
    val_batches: int = 8,
    echo: Callable[[str], Any] = print,
) -> Path:
    """Post-training quantization of a checkpoint (or run directory) into a new run directory.

    ``precision_overrides``: the QAT preset (``["precision=qat_int4", "precision.group_size=64"]``);
    weight scales are stored (``weight_mode=static``, ``lsq=false``). ``method``: ``rtn`` or
    ``adaround`` (``iters`` per layer), ``ranges``: ``minmax`` or ``mse``; ``calibration``: training
    sequences for AdaRound's inputs and static activation scales; ``seed``: AdaRound's minibatches.
    ``out``: default ``<source run dir>-ptq-<method>``. Prints the validation loss on ``val_batches``
    batches (source, RTN, AdaRound). Every input is checked before anything is written.
    """
    from omegaconf import OmegaConf, open_dict

    from lowbit.checkpoint_io import DurableCheckpointIO, verify_checkpoint
    from lowbit.config import to_yaml
    from lowbit.run import build, load_weights

    _check_options(method, ranges, calibration, iters, val_batches)
    ckpt_path, run_dir = checkpoint_and_run(source, "the model is rebuilt from the run's config")
    out = Path(out).expanduser() if out is not None else run_dir.with_name(f"{run_dir.name}-ptq-{method}")
    _check_out(out)
    node = _precision_node(list(precision_overrides))
    cfg = OmegaConf.load(run_dir / "config.yaml")
    with open_dict(cfg):
        cfg.precision = node
        cfg.resume = None
        if "init_from" in cfg:
            cfg.init_from = None  # the weights come from the source checkpoint, here
        cfg.name = f"{cfg.get('name') or run_dir.name}-ptq-{method}"
    built = build(cfg)  # a preset's bad bits or group size is one line here
    task, precision = built.task, built.precision
    if len(inspect.signature(task.forward).parameters) != 1:
        raise LowbitError(
            f"lowbit quantize calibrates tasks whose forward takes the batch's inputs alone (lm, classify); "
            f"task '{cfg.task.get('name', type(task).__name__)}' takes more"
        )
    checkpoint = verify_checkpoint(ckpt_path)
    load_weights(task, checkpoint["state_dict"], f"checkpoint {ckpt_path}", quantizers=False)
    layers = qat_layers(task)

    device = torch.device("cuda" if getattr(precision, "device_type", "cpu") == "cuda" else "cpu")
    task.to(device).eval()

    def run(inputs: torch.Tensor) -> Any:
        with torch.no_grad(), precision.forward_context():
            return task(inputs)

    val = [_to(b, device) for b in islice(built.data.val_dataloader(), val_batches)] if val_batches else []
    with _without(layers, "weight_quant"), _without(layers, "input_quant"):
        loss_source = _val_loss(task, val, precision)

    echo(f"ptq: {method} with {ranges} ranges into {out}; {getattr(precision, 'description', precision)}")
    for layer in layers.values():
        layer.weight_quant.set_scales(*weight_ranges(layer.weight, layer.weight_quant.spec, ranges))
    batches = _calibration_inputs(built.data, calibration, device)
    static = _calibrate_static_inputs(layers, run, batches)
    if static:
        echo(f"static input scales of {len(static)} layers from {calibration} calibration samples")
    loss_rtn = _val_loss(task, val, precision)

    report = _round_weights(layers, run, batches, method, iters, seed, echo)
    loss_final = _val_loss(task, val, precision) if method == "adaround" else loss_rtn
    if loss_source is not None:
        line = f"val loss on {len(val)} batches: source {loss_source:.4f} | rtn {_versus(loss_rtn, loss_source)}"
        echo(line + (f" | adaround {_versus(loss_final, loss_source)}" if method == "adaround" else ""))

    ptq = {
        "method": method,
        "ranges": ranges,
        "calibration": calibration,
        "seed": seed,
        "iters": iters if method == "adaround" else 0,
        "source": str(ckpt_path),
        "val_loss": {"source": loss_source, "rtn": loss_rtn, method: loss_final},
        "layers": report,
    }
    state = {k: v.detach().cpu() for k, v in task.state_dict().items()}
    new = {k: checkpoint[k] for k in ("epoch", "global_step", "pytorch-lightning_version") if k in checkpoint}
    _check_out(out)  # still free: nothing else wrote there meanwhile
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(to_yaml(cfg))
    DurableCheckpointIO(keep_previous=False).save_checkpoint(
        {**new, "state_dict": state, "lowbit_ptq": ptq}, out / "checkpoints" / "last.ckpt"
    )
    echo(f"wrote {out / 'checkpoints' / 'last.ckpt'} (lowbit export {out} writes the low-bit weights)")
    return out


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lowbit quantize",
        description="Post-training quantization of a checkpoint into a run with an integer QAT preset "
        "(stored weight scales): round to nearest with min-max or MSE ranges, or AdaRound.",
    )
    parser.add_argument("source", metavar="CKPT_OR_RUN_DIR", help="a run directory or a .ckpt in its checkpoints/")
    parser.add_argument(
        "overrides", nargs="*", metavar="precision=NAME", help="the QAT preset and its options: precision=qat_int4 ..."
    )
    parser.add_argument("--method", default="rtn", choices=PTQ_METHODS, help="rounding (default rtn)")
    parser.add_argument("--ranges", default="minmax", choices=RANGES, help="weight scales (default minmax)")
    options = (
        ("--calibration", 256, "N", "training sequences for AdaRound and static scales (256)"),
        ("--iters", ADAROUND_ITERS, "N", f"AdaRound steps per layer ({ADAROUND_ITERS})"),
        ("--seed", 0, "N", "AdaRound's minibatch seed (0)"),
        ("--val-batches", 8, "N", "validation batches for the loss report (8; 0: none)"),
    )
    for flag, default, metavar, text in options:
        parser.add_argument(flag, type=int, default=default, metavar=metavar, help=text)
    parser.add_argument("--out", metavar="DIR", help="the new run directory (default <source run dir>-ptq-<method>)")

    def error(message: str):
        raise LowbitError(f"{message} (lowbit quantize --help)")

    parser.error = error
    return parser


def quantize_main(argv: Sequence[str] | None = None) -> int:
    """``lowbit quantize CKPT_OR_RUN_DIR precision=qat_int4 [precision.KEY=V ...] [--method rtn|adaround]
    [--ranges minmax|mse] [--calibration N] [--iters N] [--seed N] [--val-batches N] [--out DIR]``."""
    args = _parser().parse_intermixed_args(argv)
    if not args.overrides:
        raise LowbitError("name the QAT preset to quantize into, e.g. precision=qat_int4 (lowbit quantize --help)")
    quantize_checkpoint(
        args.source,
        args.overrides,
        method=args.method,
        ranges=args.ranges,
        calibration=args.calibration,
        out=args.out,
        seed=args.seed,
        iters=args.iters,
        val_batches=args.val_batches,
    )
    return 0
