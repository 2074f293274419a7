"""``lowbit bench kernels``: lowbit's Triton kernels against the device and torch, on a CUDA GPU, in one run.

Three tables:
  quantize  GB/s of each fused quantize kernel on a (--quant-size)^2 BF16 tensor (bytes read once plus
            codes and scales written), as a share of the device's measured copy bandwidth (a BF16
            tensor of the same size copied: read + write), beside torchao's quantize function for the
            same format where it has one;
  GEMM      TFLOP/s of the block-scaled GEMMs at LLM shapes (--sizes, M = N = K) against BF16
            ``torch.matmul`` and tensorwise FP8 ``torch._scaled_mm``, and torchao's MX / NVFP4 matmuls
            where they run (its MX GEMMs use CUTLASS on Blackwell, else its emulated path);
  training  ``nvfp4_llm`` step time with the kernels (backend auto) and with the emulate backend
            against ``bf16_llm`` on a GPU-sized GPT, with peak memory (``lowbit.bench.speed.measure``).
Timing is ``triton.testing.do_bench`` (CUDA events, L2 flushed, median). A row that fails reads
``error: ...`` and the run goes on. Without CUDA the command stops with one line: it needs a GPU.
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from lowbit.bench._report import device_name, markdown_table
from lowbit.bench.numerics import _quiet_torch_warnings
from lowbit.errors import LowbitError

__all__ = ["E2E_MODEL", "gemm_rows", "main", "quantize_rows", "training_rows"]

E2E_MODEL = ["model.dim=1024", "model.n_layers=8", "model.n_heads=16", "data.seq_len=1024", "data.batch_size=16"]
"""The GPU-sized GPT of the training table: about 100M parameters, 16k tokens a step."""


def _ms(fn: Callable[[], object]) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100)


def _timed(fn: Callable[[], object] | None) -> float | str | None:
    """Milliseconds of ``fn``, the error it raised (one line), or None without a function."""
    if fn is None:
        return None
    try:
        return _ms(fn)
    except Exception as err:  # a row that cannot run says why; the others still run
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"lowbit bench kernels: {message}", file=sys.stderr)
        return f"error: {message[:80]}"


def _fmt(value: float | str | None) -> str:
    """A measured number with 3 significant digits (no exponent above 100), an error, or n/a."""
    if value is None:
        return "n/a"
    if isinstance(value, str):
        return value
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


# ---- torchao baselines (optional: n/a where torchao or the GPU lacks them) ------------------
def _torchao_quantizers(x: torch.Tensor) -> dict[str, Callable[[], object]]:
    try:
        with _quiet_torch_warnings():
            from torchao.float8.config import ScalingGranularity
            from torchao.float8.float8_scaling_utils import hp_tensor_to_float8_dynamic
            from torchao.float8.float8_training_tensor import LinearMMConfig
            from torchao.prototype.mx_formats.mx_tensor import to_mx
            from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor, per_tensor_amax_to_scale
    except ImportError:
        return {}

    def fp8(granularity):
        axis = -1 if granularity == ScalingGranularity.AXISWISE else None
        return lambda: hp_tensor_to_float8_dynamic(
            x, torch.float8_e4m3fn, LinearMMConfig(), scaling_granularity=granularity, axiswise_dim=axis
        )

    def nvfp4():
        scale = per_tensor_amax_to_scale(torch.max(torch.abs(x)))
        return NVFP4Tensor.to_nvfp4(x, per_tensor_scale=scale)

    return {
        "fp8_tensor": fp8(ScalingGranularity.TENSORWISE),
        "fp8_row": fp8(ScalingGranularity.AXISWISE),
        "mxfp8": lambda: to_mx(x, torch.float8_e4m3fn, 32),
        "mxfp4": lambda: to_mx(x, torch.float4_e2m1fn_x2, 32),
        "nvfp4": nvfp4,
    }


def _torchao_matmuls(x: torch.Tensor, w: torch.Tensor) -> dict[str, tuple[Callable[[], object], str]]:
    """torchao's MX / NVFP4 matmuls of x @ w.T: its real (CUTLASS / cuBLAS) GEMM where the GPU has one
    (Blackwell), else its emulated one; keyed like lowbit's rows."""
    try:
        with _quiet_torch_warnings():
            from torchao.prototype.mx_formats.mx_tensor import MXTensor
            from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor, per_tensor_amax_to_scale
            from torchao.quantization.quantize_.common.kernel_preference import KernelPreference
    except ImportError:
        return {}
    native = x.is_cuda and torch.cuda.get_device_capability(x.device) >= (10, 0)
    pref = KernelPreference.AUTO if native else KernelPreference.EMULATED
    path = "torchao CUTLASS/cuBLAS" if native else "torchao emulated (dequantize + BF16 mm)"
    out = {}
    for name, elem in (("mxfp8", torch.float8_e4m3fn), ("mxfp4", torch.float4_e2m1fn_x2)):
        try:
            a = MXTensor.to_mx(x, elem, 32, kernel_preference=pref)
            b = MXTensor.to_mx(w, elem, 32, kernel_preference=pref).t()
            out[name] = (lambda a=a, b=b: torch.mm(a, b), path)
        except Exception as err:
            out[name] = (None, f"torchao: {str(err).splitlines()[0][:60]}")
    if native:
        try:
            a = NVFP4Tensor.to_nvfp4(
                x, per_tensor_scale=per_tensor_amax_to_scale(x.abs().max()), is_swizzled_scales=True
            )
            b = NVFP4Tensor.to_nvfp4(
                w, per_tensor_scale=per_tensor_amax_to_scale(w.abs().max()), is_swizzled_scales=True
            )
            out["nvfp4"] = (lambda: torch.mm(a, b.t()), "torchao cuBLAS")
        except Exception as err:
            out["nvfp4"] = (None, f"torchao: {str(err).splitlines()[0][:60]}")
    return out


# ---- the tables ----------------------------------------------------------------------------
def quantize_rows(size: int, device: str = "cuda") -> tuple[float, list[list[str]]]:
    """(copy GB/s, rows: kernel, GB/s, % of copy, torchao GB/s, lowbit / torchao) at size x size, BF16."""
    from lowbit.kernels.amax import amax
    from lowbit.kernels.quantize_fp8 import quantize_fp8
    from lowbit.kernels.quantize_mx import quantize_mx
    from lowbit.kernels.quantize_nvfp4 import quantize_nvfp4

    x = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    y = torch.empty_like(x)
    n, read = x.numel(), x.numel() * x.element_size()
    copy_gbs = 2 * read / _ms(lambda: y.copy_(x)) / 1e6
    sr_rht32 = {"rowwise": False, "colwise": True, "rht": (0, 32), "sr": (False, True), "prescale": (1.0, 0.75)}
    sr_rht16 = {"rowwise": False, "colwise": True, "rht": (0, 16), "sr": (False, True)}
    fp4, mx4, nv = n / 2 + n / 32, n / 2 + n / 32, n / 2 + n / 16
    cases = [
        ("amax (tensor, for FP8 / NVFP4 scales)", lambda: amax(x), 0, None),
        ("fp8 e4m3 tensor (amax pass included)", lambda: quantize_fp8(x), n, "fp8_tensor"),
        ("fp8 e4m3 tensor, rowwise + colwise", lambda: quantize_fp8(x, colwise=True), 2 * n, None),
        ("fp8 e4m3 row", lambda: quantize_fp8(x, block="row"), n + 4 * size, "fp8_row"),
        ("mxfp8 e4m3", lambda: quantize_mx(x, "e4m3"), n + n / 32, "mxfp8"),
        ("mxfp8 e4m3, rowwise + colwise", lambda: quantize_mx(x, "e4m3", colwise=True), 2 * (n + n / 32), None),
        ("mxfp4", lambda: quantize_mx(x, "e2m1"), mx4, "mxfp4"),
        ("mxfp4, rowwise + colwise", lambda: quantize_mx(x, "e2m1", colwise=True), 2 * mx4, None),
        ("mxfp4 colwise, SR + RHT-32 (gradients)", lambda: quantize_mx(x, "e2m1", **sr_rht32), fp4, None),
        ("nvfp4 1x16 (amax pass included)", lambda: quantize_nvfp4(x), nv, "nvfp4"),
        ("nvfp4 1x16, rowwise + colwise", lambda: quantize_nvfp4(x, colwise=True), 2 * nv, None),
        ("nvfp4 16x16 (weights)", lambda: quantize_nvfp4(x, block=(16, 16)), n / 2 + n / 256, None),
        ("nvfp4 colwise, SR + RHT-16 (wgrad dy)", lambda: quantize_nvfp4(x, **sr_rht16), nv, None),
    ]
    baselines = _torchao_quantizers(x)
    rows = []
    for name, fn, written, baseline in cases:
        ms, ao_ms = _timed(fn), _timed(baselines.get(baseline) if baseline else None)
        gbs = (read + written) / ms / 1e6 if isinstance(ms, float) else ms
        ao_gbs = (read + written) / ao_ms / 1e6 if isinstance(ao_ms, float) else ao_ms
        share = f"{100 * gbs / copy_gbs:.0f}%" if isinstance(gbs, float) else "n/a"
        ratio = f"{gbs / ao_gbs:.2f}" if isinstance(gbs, float) and isinstance(ao_gbs, float) else "n/a"
        rows.append([name, _fmt(gbs), share, _fmt(ao_gbs), ratio])
    return copy_gbs, rows


def gemm_rows(sizes: list[int], device: str = "cuda") -> list[list[str]]:
    """Rows: size, GEMM, path, TFLOP/s, x BF16 torch.matmul."""
    from lowbit.kernels.gemm_blockscaled import Operand, default_mode, gemm_blockscaled, scaled_mm
    from lowbit.kernels.quantize_fp8 import quantize_fp8
    from lowbit.kernels.quantize_mx import quantize_mx
    from lowbit.kernels.quantize_nvfp4 import quantize_nvfp4

    def mx(t, element):
        codes, scales, _, _ = quantize_mx(t, element)
        return Operand(codes, element, scales, "e8m0", (1, 32))

    def nvfp4(t, block=(1, 16)):
        codes, scales, g, *_ = quantize_nvfp4(t, block=block)
        return Operand(codes, "e2m1", scales, "e4m3", block, g)

    def fp8(t, block="tensor"):
        codes, scales, *_ = quantize_fp8(t, block=block)
        return Operand(codes, "e4m3", scales, "fp32", (1, 0))

    def one_size(size: int) -> list[list[str]]:
        x = torch.randn(size, size, device=device, dtype=torch.bfloat16)
        w = torch.randn(size, size, device=device, dtype=torch.bfloat16)
        bf16_ms = _ms(lambda: torch.matmul(x, w.t()))
        results = [("bf16", "torch.matmul (cuBLAS)", bf16_ms)]
        a8, b8 = fp8(x), fp8(w)
        results.append(
            ("fp8 e4m3 tensor", "torch._scaled_mm (cuBLASLt)", _timed(lambda: scaled_mm(a8, b8, None, torch.bfloat16)))
        )
        results.append(("fp8 e4m3 tensor", "lowbit Triton, fp8", _timed(lambda: gemm_blockscaled(a8, b8, mode="fp8"))))
        r8a, r8b = fp8(x, "row"), fp8(w, "row")
        path = {"scaled_mm": "lowbit default: torch._scaled_mm"}.get(default_mode(r8a, r8b), "lowbit Triton, fp8")
        results.append(("fp8 e4m3 row", path, _timed(lambda: gemm_blockscaled(r8a, r8b))))
        pairs = {
            "mxfp8": (mx(x, "e4m3"), mx(w, "e4m3")),
            "mxfp4": (mx(x, "e2m1"), mx(w, "e2m1")),
            "mxfp8 x mxfp4": (mx(x, "e4m3"), mx(w, "e2m1")),
            "nvfp4 (x 1x16, w 16x16)": (nvfp4(x), nvfp4(w, (16, 16))),
        }
        for name, (a, b) in pairs.items():
            mode = default_mode(a, b)
            results.append((name, f"lowbit Triton, {mode}", _timed(lambda a=a, b=b: gemm_blockscaled(a, b))))
            if mode != "bf16" and name == "mxfp4":  # the fallback path, for comparison
                results.append(
                    (name, "lowbit Triton, bf16", _timed(lambda a=a, b=b: gemm_blockscaled(a, b, mode="bf16")))
                )
        for name, (fn, path) in _torchao_matmuls(x, w).items():
            results.append((name, path, _timed(fn)))
        flop = 2 * size**3
        return [
            [str(size), name, path, _fmt(flop / ms / 1e9 if isinstance(ms, float) else ms), _fmt_ratio(bf16_ms, ms)]
            for name, path, ms in results
        ]

    return [row for size in sizes for row in one_size(size)]


def _fmt_ratio(base: float, value: float | str) -> str:
    return f"{base / value:.2f}" if isinstance(value, float) else "n/a"


def training_rows(model: list[str], steps: int, warmup: int) -> list[list[str]]:
    """Rows: configuration, step ms (median), x bf16, tokens/s, peak MB, x bf16."""
    from lowbit.bench.speed import measure

    configs = [
        ("bf16_llm", ["recipe=bf16_llm"]),
        ("nvfp4_llm, kernels (backend auto)", ["recipe=nvfp4_llm"]),
        ("nvfp4_llm, emulate backend", ["recipe=nvfp4_llm", "precision.backend=emulate"]),
    ]
    tokens = _tokens_per_step(model)
    results = []
    for name, overrides in configs:
        m = measure([*overrides, "logger=csv", *model], steps, warmup)
        results.append((name, 1e3 * statistics.median(m.step_s), m.peak_cuda_mb))
    base_ms, base_peak = results[0][1], results[0][2]
    return [
        [
            name,
            f"{ms:.1f}",
            f"{ms / base_ms:.2f}",
            f"{tokens / ms * 1e3:,.0f}",
            f"{peak:.0f}",
            f"{peak / base_peak:.2f}",
        ]
        for name, ms, peak in results
    ]


def _tokens_per_step(model: list[str]) -> int:
    values = dict(item.split("=", 1) for item in model if "=" in item)
    return int(values.get("data.seq_len", 128)) * int(values.get("data.batch_size", 16))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lowbit bench kernels", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quant-size", type=int, default=8192, help="the quantized tensor is N x N BF16")
    parser.add_argument("--sizes", default="4096,8192", help="GEMM sizes M = N = K, comma-separated")
    parser.add_argument("--steps", type=int, default=20, help="timed training steps per configuration")
    parser.add_argument("--warmup", type=int, default=5, help="untimed training steps first (autotuning)")
    parser.add_argument("--skip-training", action="store_true", help="only the kernel tables")
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown here")
    parser.add_argument("model", nargs="*", default=None, help=f"training overrides (default: {' '.join(E2E_MODEL)})")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise LowbitError(
            "lowbit bench kernels needs a CUDA GPU (torch.cuda.is_available() is False here); run it on a GPU machine"
        )
    sizes = [int(s) for s in args.sizes.split(",")]
    copy_gbs, quant = quantize_rows(args.quant_size)
    command = " ".join(["lowbit bench kernels", *(argv if argv is not None else sys.argv[3:])])
    parts = [
        f"`{command}` — {dt.date.today()}, {device_name()}, torch {torch.__version__.split('+')[0]}, {_versions()}",
        f"Quantize, {args.quant_size}x{args.quant_size} BF16; device copy bandwidth {copy_gbs:.0f} GB/s "
        "(read + write). GB/s = (input bytes + code and scale bytes) / time.",
        markdown_table(["kernel", "GB/s", "of copy", "torchao GB/s", "lowbit/torchao"], quant),
        "GEMMs C = A·Bᵀ, M = N = K, BF16 output; ×bf16 = speed-up over torch.matmul in BF16.",
        markdown_table(["size", "GEMM", "path", "TFLOP/s", "× bf16"], gemm_rows(sizes)),
    ]
    if not args.skip_training:
        model = args.model or E2E_MODEL
        rows = training_rows(model, args.steps, args.warmup)
        parts += [
            f"Training step (forward + backward + AdamW), GPT {' '.join(model)}; median of {args.steps} steps "
            f"after {args.warmup}.",
            markdown_table(["configuration", "step ms", "× bf16", "tokens/s", "peak MB", "× bf16"], rows),
        ]
    text = "\n\n".join(parts) + "\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


def _versions() -> str:
    import triton

    try:
        import torchao

        ao = f"torchao {torchao.__version__}"
    except ImportError:
        ao = "no torchao"
    return f"triton {triton.__version__}, {ao}"
