"""Quantization error statistics: SNR, underflow and saturation fractions (quantization health)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lowbit.numerics import _fast
from lowbit.numerics.qtensor import QTensor
from lowbit.numerics.quantize import _COMPILE_MIN_ELEMENTS, SpecLike, _dequantize, _quantize
from lowbit.numerics.spec import get_spec

__all__ = ["QuantError", "quant_error", "quant_error_and_codes"]


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


def quant_error_and_codes(
    x: torch.Tensor,
    spec: SpecLike,
    *,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    compile: bool = False,
) -> tuple[QuantError, QTensor]:
    """``quant_error`` and the QTensor it measured: one quantization for both (the health callback
    reports the error and the scales). ``compile``: the RHT, block scales and error sums as compiled CPU
    kernels on large tensors (the same codes and scales as ``fake_quantize(compile=True)``'s; the
    float64 sums in another order, so the SNR may differ from the eager one in its last digits)."""
    compile = compile and x.device.type == "cpu" and x.numel() >= _COMPILE_MIN_ELEMENTS
    stats = {"saturated": torch.zeros((), dtype=torch.int64)}
    q = _quantize(x, get_spec(spec), generator, seed, None, None, stats, compile=compile)
    deq = _dequantize(q, torch.float32, compile=compile)
    sums = _fast.run_compiled(_error_sums, (x.reshape(-1), deq.reshape(-1)), ((0,), (0,))) if compile else None
    signal, noise, underflowed, nonzero, max_abs_error = (float(s) for s in (sums or _error_sums(x, deq)))
    snr = math.inf if noise == 0 else (10 * math.log10(signal / noise) if signal > 0 else -math.inf)
    underflow = underflowed / max(1.0, nonzero)
    n = x.numel()
    error = QuantError(
        snr_db=snr,
        underflow=underflow,
        saturation=float(stats["saturated"]) / n,
        max_abs_error=max_abs_error,
    )
    return error, q
