"""Quantization error statistics: SNR, underflow and saturation fractions (quantization health)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lowbit.numerics import _fast, _native
from lowbit.numerics.qtensor import QTensor
from lowbit.numerics.quantize import (
    _COMPILE_MIN_ELEMENTS,
    SpecLike,
    _dequantize,
    _fake_quantize_stats,
    _quantize,
)
from lowbit.numerics.spec import get_spec

__all__ = ["QuantError", "quant_error", "quant_error_and_codes", "quant_error_and_scales"]


@dataclass(frozen=True)
class QuantError:
    """snr_db: 10 log10(sum x^2 / sum (x - q)^2), +inf when exact (and for an all-zero x).
    underflow: fraction of non-zero elements that quantized to zero.
    saturation: fraction of elements whose scaled magnitude |x| * factor exceeded the element
        format's max (clipped; for asymmetric integers, outside [qmin, qmax]).
    max_abs_error: max |x - q|."""

    snr_db: float
    underflow: float
    saturation: float
    max_abs_error: float


def quant_error(
    x: torch.Tensor, spec: SpecLike, *, generator: torch.Generator | None = None, seed: int | None = None
) -> QuantError:
    """Quantize ``x`` with ``spec`` and measure the error of ``dequantize`` against ``x`` (float64 sums)."""
    return quant_error_and_codes(x, spec, generator=generator, seed=seed)[0]


def _error_sums(x: torch.Tensor, deq: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """sum x², sum (q - x)², underflowed and non-zero counts, max |q - x|, in float64 (NaN propagates)."""
    ref = x.double()
    err = deq.double() - ref
    nonzero = ref != 0
    underflowed = nonzero & (ref + err == 0)
    return (ref * ref).sum(), (err * err).sum(), underflowed.sum(), nonzero.sum(), err.abs().max()


def _error(x: torch.Tensor, deq: torch.Tensor, saturated: int, compile: bool) -> QuantError:
    """The error of ``deq`` (float32) against ``x``: its sums in one pass of the C kernel on CPU
    (``_native.error_sums``), else in one compiled kernel (``compile``) or the tensor ops."""
    flat, deq_flat = x.reshape(-1), deq.reshape(-1)
    sums = _native.error_sums(flat, deq_flat)
    if sums is None and compile:
        sums = _fast.run_compiled(_error_sums, (flat, deq_flat), ((0,), (0,)))
    signal, noise, underflowed, nonzero, max_abs_error = (float(s) for s in (sums or _error_sums(x, deq)))
    return QuantError(
        snr_db=math.inf if noise == 0 else (10 * math.log10(signal / noise) if signal > 0 else -math.inf),
        underflow=underflowed / max(1.0, nonzero),
        saturation=saturated / x.numel(),
        max_abs_error=max_abs_error,
    )


def quant_error_and_scales(
    x: torch.Tensor, spec: SpecLike, *, seed: int | None = None
) -> tuple[QuantError, torch.Tensor, torch.Tensor | None]:
    """``quant_error`` and the scales it measured (the QTensor's ``scales`` and ``global_scale``),
    from compiled kernels that write no codes where ``x`` is a large CPU tensor (the quantization
    health of a GEMM operand; the same values, scales and counts as ``quant_error_and_codes``, the
    float64 sums from the same C kernel on CPU, elsewhere in another order); elsewhere by
    ``quant_error_and_codes(compile=True)``."""
    spec = get_spec(spec)
    fast = _fake_quantize_stats(x, spec, seed)
    if fast is None:
        error, q = quant_error_and_codes(x, spec, seed=seed, compile=True)
        return error, q.scales, q.global_scale
    values, scales, global_scale, saturated = fast
    return _error(x, values, saturated, True), scales, global_scale


def quant_error_and_codes(
    x: torch.Tensor,
    spec: SpecLike,
    *,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    compile: bool = False,
) -> tuple[QuantError, QTensor]:
    """``quant_error`` and the QTensor it measured: one quantization for both. ``compile``: the RHT and
    block scales as compiled CPU kernels on large tensors (the same codes and scales as
    ``fake_quantize(compile=True)``'s). The error sums run in the C kernel on CPU either way; where it is
    not built, compiled with ``compile`` (float64 sums in another order: the SNR may differ from the
    eager one in its last digits)."""
    compile = compile and x.device.type == "cpu" and x.numel() >= _COMPILE_MIN_ELEMENTS
    stats = {"saturated": torch.zeros((), dtype=torch.int64)}
    q = _quantize(x, get_spec(spec), generator, seed, None, None, stats, compile=compile)
    error = _error(x, _dequantize(q, torch.float32, compile=compile), int(stats["saturated"]), compile)
    return error, q
