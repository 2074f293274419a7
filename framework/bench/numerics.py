"""``lowbit bench numerics``: quantize + dequantize throughput of every preset on CPU, beside torchao.

For each preset, these functions run on the same seeded normal tensor with the same thread count:
  lowbit q+dq       ``dequantize(quantize(x, preset))``: amax, scales, codes, decode, rescale;
  torchao q+dq      torchao's function for the same format, doing the same work (table below);
  lowbit fake       ``fake_quantize(x, preset)``: the same bits as lowbit q+dq, without codes;
and, unless ``--no-compile``, each side as its user would compile it:
  lowbit compiled   ``dequantize(quantize(x, preset, compile=True), compile=True)`` (from 2^16
                    elements: compiled scales, codes and decode; smaller tensors run eagerly);
  torchao compiled  ``torch.compile`` of torchao's function (compiled once, before timing).
Each compiled function's output is compared bit for bit with its eager one's, and the number of
values that differ is reported: a fast wrong answer is not a speed-up.
Timing: ``--warmup`` calls of each, then ``--repeats`` rounds that call them in turn (interleaved,
so load from other processes hits all alike); the median per function. The table gives GB/s of
input (numel * bytes per element / median seconds) and lowbit/torchao, the throughput ratio
(> 1: lowbit is faster), eager against eager and compiled against compiled. torchao is a dev
dependency: without it, or for a format it lacks, its columns read n/a.

torchao functions (0.18):
  MX presets       ``prototype.mx_formats.mx_tensor.to_mx`` (block 32, floor scales) + ``to_dtype``
  nvfp4            ``NVFP4Tensor.to_nvfp4`` (per-tensor scale from ``max(|x|)``, as lowbit's
                   global scale) + ``.dequantize``
  fp8 tensor/row   ``float8.float8_scaling_utils.hp_tensor_to_float8_dynamic`` (tensorwise /
                   axiswise on the last dim) + ``.to_original_precision``
  int8 / int4      ``quantization.quant_primitives``: ``choose_qparams_affine`` (symmetric;
                   row / groups of 32) + ``quantize_affine`` + ``dequantize_affine``
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from lowbit.errors import LowbitError

__all__ = ["Row", "main", "markdown", "run", "torchao_baseline"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_MX_TORCHAO = {
    "mxfp8_e4m3": "float8_e4m3fn",
    "mxfp8_e5m2": "float8_e5m2",
    "mxfp6_e2m3": "fp6_e2m3",
    "mxfp6_e3m2": "fp6_e3m2",
    "mxfp4": "float4_e2m1fn_x2",
}


@dataclass(frozen=True)
class Row:
    """One preset's result: throughputs in GB/s of input; None where torchao has no such format (or,
    for the compiled columns, where they were not run or torch.compile failed). ``*_differ``: values
    of the compiled function's output whose bits differ from its eager function's."""

    preset: str
    lowbit_gbs: float
    torchao_gbs: float | None
    fake_gbs: float
    torchao_function: str
    lowbit_compiled_gbs: float | None = None
    torchao_compiled_gbs: float | None = None
    lowbit_compiled_differ: int = 0
    torchao_compiled_differ: int = 0

    @property
    def ratio(self) -> float | None:
        """lowbit / torchao throughput (> 1: lowbit is faster)."""
        return None if self.torchao_gbs is None else self.lowbit_gbs / self.torchao_gbs

    @property
    def compiled_ratio(self) -> float | None:
        """lowbit compiled / torchao compiled throughput."""
        if self.lowbit_compiled_gbs is None or self.torchao_compiled_gbs is None:
            return None
        return self.lowbit_compiled_gbs / self.torchao_compiled_gbs


@contextmanager
def _quiet_torch_warnings():
    """torchao's import logs deprecation warnings through torch's pytree logger; hide them only here."""
    logger = logging.getLogger("torch.utils._pytree")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def torchao_baseline(preset: str, x: torch.Tensor) -> tuple[Callable[[], torch.Tensor], str] | None:
    """torchao's quantize + dequantize for ``preset`` on ``x`` and its name, or None (no torchao,
    or no such format in torchao)."""
    try:
        with _quiet_torch_warnings():
            from torchao.float8.config import ScalingGranularity
            from torchao.float8.float8_scaling_utils import hp_tensor_to_float8_dynamic
            from torchao.float8.float8_training_tensor import LinearMMConfig
            from torchao.prototype.mx_formats.mx_tensor import to_dtype, to_mx
            from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor, per_tensor_amax_to_scale
            from torchao.quantization.quant_primitives import (
                MappingType,
                choose_qparams_affine,
                dequantize_affine,
                quantize_affine,
            )
    except ImportError:
        return None
    dtype = x.dtype
    if preset in _MX_TORCHAO:
        elem = _MX_TORCHAO[preset]
        elem = getattr(torch, elem) if elem.startswith("float") else elem

        def mx() -> torch.Tensor:
            scale, data = to_mx(x, elem, 32)
            return to_dtype(data, scale, elem, 32, dtype)

        return mx, "to_mx + to_dtype"
    if preset == "nvfp4":

        def nvfp4() -> torch.Tensor:
            per_tensor_scale = per_tensor_amax_to_scale(torch.max(torch.abs(x)))
            return NVFP4Tensor.to_nvfp4(x, per_tensor_scale=per_tensor_scale).dequantize(dtype)

        return nvfp4, "NVFP4Tensor.to_nvfp4 + dequantize"
    if preset.startswith("fp8_"):
        fp8 = torch.float8_e5m2 if "e5m2" in preset else torch.float8_e4m3fn
        rowwise = preset.endswith("_row")
        granularity = ScalingGranularity.AXISWISE if rowwise else ScalingGranularity.TENSORWISE

        def float8() -> torch.Tensor:
            t = hp_tensor_to_float8_dynamic(
                x, fp8, LinearMMConfig(), scaling_granularity=granularity, axiswise_dim=-1 if rowwise else None
            )
            return t.to_original_precision()

        return float8, "hp_tensor_to_float8_dynamic + to_original_precision"
    if preset in ("int8_channel", "int4_group32"):
        block = (1, x.shape[-1]) if preset == "int8_channel" else (1, 32)
        block = (1,) * (x.dim() - 2) + block
        qmin, qmax = (-128, 127) if preset == "int8_channel" else (-8, 7)

        def affine() -> torch.Tensor:
            scale, zero = choose_qparams_affine(x, MappingType.SYMMETRIC, block, torch.int8, qmin, qmax)
            q = quantize_affine(x, block, scale, zero, torch.int8, qmin, qmax)
            return dequantize_affine(q, block, scale, zero, torch.int8, qmin, qmax, output_dtype=dtype)

        return affine, "choose_qparams_affine + quantize_affine + dequantize_affine"
    return None


def _median_seconds(fns: Sequence[Callable[[], object]], repeats: int, warmup: int) -> list[float]:
    """Median wall time of each function over ``repeats`` interleaved rounds, after warm-up."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            start = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - start)
    return [statistics.median(ts) for ts in times]


def _differ(a: torch.Tensor, b: torch.Tensor) -> int:
    """Values whose bits differ (NaN payloads and signed zeros included)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return a.numel()
    bits = {2: torch.int16, 4: torch.int32}[a.element_size()]
    return int((a.view(bits) != b.view(bits)).sum())


def _compiled_torchao(fn: Callable[[], torch.Tensor], eager: torch.Tensor) -> tuple[Callable[[], object] | None, int]:
    """``torch.compile(fn)``, compiled by a first call, and how many of its values differ from ``eager``
    (None where torch.compile fails: the column reads n/a)."""
    compiled = torch.compile(fn)
    try:
        with _quiet_torch_warnings():
            out = compiled()
    except Exception:  # noqa: BLE001 - a format torch.compile cannot build here reads n/a, not a crash
        return None, 0
    return compiled, _differ(out, eager)


def run(
    shape: tuple[int, ...],
    *,
    dtype: torch.dtype = torch.float32,
    repeats: int = 5,
    warmup: int = 1,
    presets: Sequence[str] | None = None,
    compile: bool = True,
) -> list[Row]:
    """Time every preset (or ``presets``) on a seeded ``torch.randn(shape)`` of ``dtype``; ``compile``:
    the compiled columns too."""
    from lowbit.numerics import dequantize, fake_quantize, preset_names, quantize

    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    gigabytes = x.numel() * x.element_size() / 1e9
    rows = []
    for preset in presets or preset_names():
        lowbit = partial(lambda p: dequantize(quantize(x, p)), preset)
        fns: dict[str, Callable[[], object]] = {"lowbit": lowbit, "fake": partial(fake_quantize, x, preset)}
        baseline = torchao_baseline(preset, x)
        if baseline is not None:
            fns["torchao"] = baseline[0]
        differ = {}
        if compile:
            fns["lowbit_compiled"] = partial(lambda p: dequantize(quantize(x, p, compile=True), compile=True), preset)
            differ["lowbit_compiled"] = _differ(fns["lowbit_compiled"](), lowbit())
            if baseline is not None:
                compiled, differ["torchao_compiled"] = _compiled_torchao(baseline[0], baseline[0]())
                if compiled is not None:
                    fns["torchao_compiled"] = compiled
        seconds = dict(zip(fns, _median_seconds(list(fns.values()), repeats, warmup)))
        gbs = {name: gigabytes / s for name, s in seconds.items()}
        rows.append(
            Row(
                preset=preset,
                lowbit_gbs=gbs["lowbit"],
                torchao_gbs=gbs.get("torchao"),
                fake_gbs=gbs["fake"],
                torchao_function="n/a" if baseline is None else baseline[1],
                lowbit_compiled_gbs=gbs.get("lowbit_compiled"),
                torchao_compiled_gbs=gbs.get("torchao_compiled"),
                lowbit_compiled_differ=differ.get("lowbit_compiled", 0),
                torchao_compiled_differ=differ.get("torchao_compiled", 0),
            )
        )
    return rows


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}"  # 3 significant digits: tiny sizes stay > 0


def _compiled_cell(gbs: float | None, differ: int) -> str:
    return _number(gbs) + (f" ({differ:,} values differ from eager)" if differ else "")


def markdown(
    rows: Sequence[Row], shape: tuple[int, ...], dtype: torch.dtype, repeats: int, warmup: int, compile: bool = True
) -> str:
    """The results as a markdown table, with a header line saying what was timed and how."""
    size, threads = "x".join(str(s) for s in shape), torch.get_num_threads()
    dtype_name = str(dtype).removeprefix("torch.")
    header = (
        f"Quantize + dequantize throughput, GB/s of {dtype_name} input ({size}), CPU, "
        f"{threads} thread{'s' if threads != 1 else ''}, torch {torch.__version__.split('+')[0]}, {_torchao_version()}; "
        f"median of {repeats} interleaved rounds after {warmup} warm-up. "
        "q+dq = amax, scales, encode to codes, decode, rescale (both sides); "
        "fake = lowbit `fake_quantize` (same bits, no codes); "
        "lowbit/torchao = throughput ratio (> 1: lowbit faster)"
    )
    columns = ["preset", "lowbit q+dq GB/s", "torchao q+dq GB/s", "lowbit/torchao"]
    if compile:
        header += (
            "; compiled = lowbit `quantize`/`dequantize(compile=True)` and `torch.compile` of torchao's function, "
            "each checked bit for bit against its eager output"
        )
        columns += ["lowbit compiled GB/s", "torchao compiled GB/s", "compiled lowbit/torchao"]
    columns += ["lowbit fake GB/s", "torchao function"]
    lines = [header + ".", "", "| " + " | ".join(columns) + " |", "|---|" + "---:|" * (len(columns) - 2) + "---|"]
    for r in rows:
        cells = [r.preset, _number(r.lowbit_gbs), _number(r.torchao_gbs), _number(r.ratio)]
        if compile:
            cells += [
                _compiled_cell(r.lowbit_compiled_gbs, r.lowbit_compiled_differ),
                _compiled_cell(r.torchao_compiled_gbs, r.torchao_compiled_differ),
                _number(r.compiled_ratio),
            ]
        cells += [_number(r.fake_gbs), r.torchao_function]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _torchao_version() -> str:
    try:
        import torchao
    except ImportError:
        return "torchao not installed"
    return f"torchao {torchao.__version__}"


def _parse_size(text: str) -> tuple[int, ...]:
    """``4096`` -> (4096, 4096); ``2048x192`` -> (2048, 192)."""
    try:
        dims = tuple(int(d) for d in text.lower().split("x"))
    except ValueError:
        dims = ()
    if not dims or len(dims) > 2 or min(dims) < 1:
        raise LowbitError(f"--size must be N or ROWSxCOLS with positive ints, such as 4096 or 2048x192, got '{text}'")
    shape = dims * 2 if len(dims) == 1 else dims
    if shape[-1] % 32 or shape[-2] % 16:
        raise LowbitError(
            f"--size {text}: every preset needs columns divisible by 32 and rows by 16 (nvfp4_2d), got {shape[0]}x{shape[1]}"
        )
    return shape


def main(argv: Sequence[str] | None = None) -> int:
    """``lowbit bench numerics [--size N|RxC] [--repeats K] [--warmup W] [--dtype D] [--threads T] [--out FILE]
    [--no-compile]``"""
    parser = argparse.ArgumentParser(
        prog="lowbit bench numerics",
        description="Quantize + dequantize throughput of every preset on CPU, beside torchao.",
    )
    parser.add_argument("--size", default="4096", help="N (an N x N tensor) or ROWSxCOLS; default 4096")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds; the median is reported (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls of each function first (default 1)")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="float32", help="input dtype (default float32)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--presets", default=None, help="comma-separated presets (default: all)")
    parser.add_argument("--out", default=None, help="also write the markdown table to this file")
    parser.add_argument(
        "--no-compile", dest="compile", action="store_false", help="leave out the compiled columns (no compiling)"
    )
    args = parser.parse_args(list(argv or []))
    shape = _parse_size(args.size)
    if args.repeats < 1 or args.warmup < 0:
        raise LowbitError(f"--repeats must be >= 1 and --warmup >= 0, got {args.repeats} and {args.warmup}")
    presets = None
    if args.presets:
        from lowbit.numerics import preset_names

        presets = [p.strip() for p in args.presets.split(",") if p.strip()]
        unknown = [p for p in presets if p not in preset_names()]
        if unknown:
            raise LowbitError(f"unknown preset '{unknown[0]}'; valid: {', '.join(preset_names())}")
    if args.threads is not None and args.threads < 1:
        raise LowbitError(f"--threads must be >= 1, got {args.threads}")
    dtype = _DTYPES[args.dtype]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(args.threads or threads)
        rows = run(shape, dtype=dtype, repeats=args.repeats, warmup=args.warmup, presets=presets, compile=args.compile)
        table = markdown(rows, shape, dtype, args.repeats, args.warmup, args.compile)
    finally:
        torch.set_num_threads(threads)  # called as a library, leave the process as it was
    print(table, end="")
    if args.out:
        Path(args.out).write_text(table)
    return 0
