"""Quantization error statistics: SNR, underflow and saturation fractions (quantization health)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lowbit.numerics.qtensor import QTensor
from lowbit.numerics.quantize import SpecLike, _quantize, dequantize
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


def quant_error_and_codes(
    x: torch.Tensor, spec: SpecLike, *, generator: torch.Generator | None = None, seed: int | None = None
) -> tuple[QuantError, QTensor]:
    """``quant_error`` and the QTensor it measured: one quantization for both (the health callback
    reports the error and the scales)."""
    stats = {"saturated": torch.zeros((), dtype=torch.int64)}
    q = _quantize(x, get_spec(spec), generator, seed, None, None, stats)
    ref = x.double()
    err = dequantize(q, torch.float32).double() - ref
    signal, noise = float((ref * ref).sum()), float((err * err).sum())
    snr = math.inf if noise == 0 else (10 * math.log10(signal / noise) if signal > 0 else -math.inf)
    nonzero = ref != 0
    underflow = float((nonzero & (ref + err == 0)).sum()) / max(1, int(nonzero.sum()))
    n = x.numel()
    error = QuantError(
        snr_db=snr,
        underflow=underflow,
        saturation=float(stats["saturated"]) / n,
        max_abs_error=float(err.abs().max()),
    )
    return error, q
