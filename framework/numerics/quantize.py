"""``quantize``, ``dequantize``, ``fake_quantize``, ``requantize``: a QuantSpec applied to a tensor.

quantize(x, spec):
  1. optional random Hadamard transform of the last dim (``spec.rht_size``);
  2. a tensor-level amax where the spec needs one (``block="tensor"``, NVFP4's global scale);
  3. per block: amax -> scale (MX E8M0 rule, NVFP4 two-level E4M3, FP32 current scaling, or
     asymmetric integer min/max) -> element encode factor (see :mod:`lowbit.numerics.blocks`);
  4. elements: encode(x * factor * sr_prescale) in the element format, rounding ``spec.rounding``.
Everything is computed in float32 whatever the input dtype. On CPU, steps 3-4 run over chunks
of block rows (same numbers, far fewer page faults; see :mod:`lowbit.numerics._chunks`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from lowbit.errors import LowbitError
from lowbit.numerics._chunks import row_chunks
from lowbit.numerics.blocks import (
    BlockLayout,
    block_layout,
    fp32_scales,
    global_encode_scale,
    int_asymmetric_scales,
    lowp_block_scales,
    mx_scale_codes,
    pow2_from_exponent,
)
from lowbit.numerics.formats import ElementFormat, get_format
from lowbit.numerics.hadamard import inverse_rht, rht
from lowbit.numerics.qtensor import QTensor
from lowbit.numerics.rounding import make_generator
from lowbit.numerics.scaling import tensor_amax
from lowbit.numerics.spec import QuantSpec, get_spec

__all__ = ["dequantize", "fake_quantize", "quantize", "requantize"]

SpecLike = str | Mapping[str, Any] | QuantSpec
_FLT_MAX = torch.finfo(torch.float32).max


@dataclass
class _Scaling:
    """Scales of a set of blocks, each (n, blocks_per_row) or (1, 1) for one tensor scale."""

    decode: torch.Tensor  # float32 decode scales
    codes: torch.Tensor  # the scales in the scale format
    factor: torch.Tensor  # float32 factor that multiplies elements before encoding
    zero_point: torch.Tensor | None = None  # int32, asymmetric integers


def _check_input(x: Any, what: str = "quantize") -> None:
    if not isinstance(x, torch.Tensor):
        raise LowbitError(f"{what} needs a torch.Tensor, got {type(x).__name__}")
    if x.is_complex() or not x.is_floating_point():
        raise LowbitError(f"{what} needs a floating-point tensor (float32, bfloat16, float16), got {x.dtype}")
    if x.numel() == 0:
        raise LowbitError(f"{what} needs a non-empty tensor, got shape {tuple(x.shape)}")


def _formats(spec: QuantSpec) -> tuple[ElementFormat, ElementFormat]:
    return get_format(spec.element), get_format(spec.scale_format)


def _block_scaling(
    blocks: torch.Tensor,
    spec: QuantSpec,
    element: ElementFormat,
    scale_format: ElementFormat,
    global_encode: torch.Tensor | None,
) -> _Scaling:
    """Scales of the blocks of ``blocks`` (n, r, nb, c) -> each field (n, nb)."""
    if spec.asymmetric:
        scale, zero_point = int_asymmetric_scales(blocks.amin(dim=(1, 3)), blocks.amax(dim=(1, 3)), element)
        return _Scaling(scale, scale.view(torch.int32), torch.reciprocal(scale), zero_point)
    amax = blocks.abs().amax(dim=(1, 3))  # (n, nb); NaN propagates
    return _scaling_from_amax(amax, spec, element, scale_format, global_encode)


def _scaling_from_amax(
    amax: torch.Tensor,
    spec: QuantSpec,
    element: ElementFormat,
    scale_format: ElementFormat,
    global_encode: torch.Tensor | None,
) -> _Scaling:
    if scale_format.name == "e8m0":
        codes = mx_scale_codes(amax, element, spec.scale_rule)
        exponent = codes.to(torch.int32) - 127
        return _Scaling(scale_format.decode(codes), codes, pow2_from_exponent(-exponent))
    if scale_format.name == "fp32":
        decode, factor = fp32_scales(amax, element, spec.pow2_scale)
        return _Scaling(decode, decode.view(torch.int32), factor)
    codes, decode, factor = lowp_block_scales(amax, element, scale_format, global_encode)
    return _Scaling(decode, codes, factor)


def _tensor_scaling(
    x: torch.Tensor,
    spec: QuantSpec,
    element: ElementFormat,
    scale_format: ElementFormat,
    amax: torch.Tensor | None,
    scale: torch.Tensor | None,
) -> _Scaling:
    """One scale for the whole tensor, (1, 1)."""
    if scale is not None:
        factor = torch.as_tensor(scale, dtype=torch.float32, device=x.device).reshape(1, 1)
        decode = torch.reciprocal(factor)
        return _Scaling(decode, decode.view(torch.int32), factor)
    if spec.asymmetric:
        lo, hi = torch.aminmax(x)
        decode, zero_point = int_asymmetric_scales(lo.reshape(1, 1), hi.reshape(1, 1), element)
        return _Scaling(decode, decode.view(torch.int32), torch.reciprocal(decode), zero_point)
    amax = tensor_amax(x) if amax is None else torch.as_tensor(amax, dtype=torch.float32, device=x.device)
    return _scaling_from_amax(amax.reshape(1, 1), spec, element, scale_format, None)


def _encode_blocks(
    rows: torch.Tensor,
    layout: BlockLayout,
    spec: QuantSpec,
    element: ElementFormat,
    scaling_of,
    generator: torch.Generator | None,
    stats: dict[str, torch.Tensor] | None,
) -> tuple[torch.Tensor, list[_Scaling]]:
    """Encode (B, r, C) block rows chunk by chunk; ``scaling_of(blocks, sl)`` gives the scales."""
    codes = torch.empty(rows.shape, dtype=element.code_dtype, device=rows.device)
    saturate = spec.saturate or spec.scale_format != "fp32"  # MX and NVFP4 always saturate
    parts = []
    for sl in row_chunks(rows.shape[0], rows[0].numel(), rows.device):
        blocks = layout.blocks(rows[sl].float())  # (n, r, nb, c)
        scaling = scaling_of(blocks, sl)
        factor = scaling.factor[:, None, :, None]
        if spec.sr_prescale != 1.0:
            factor = factor * spec.sr_prescale
        scaled = blocks * factor
        if scaling.zero_point is not None:
            scaled = scaled + scaling.zero_point[:, None, :, None]
        codes[sl] = element.encode(scaled, rounding=spec.rounding, saturate=saturate, generator=generator).view(
            codes[sl].shape
        )
        if stats is not None:
            if spec.asymmetric:
                saturated = (scaled < element.qmin) | (scaled > element.qmax)
            else:
                saturated = scaled.abs() > element.max
            stats["saturated"] += saturated.sum()
        parts.append(scaling)
    return codes, parts


def _quantize(
    x: torch.Tensor,
    spec: QuantSpec,
    generator: torch.Generator | None,
    seed: int | None,
    amax: torch.Tensor | float | None,
    scale: torch.Tensor | float | None,
    stats: dict[str, torch.Tensor] | None = None,
) -> QTensor:
    _check_input(x)
    element, scale_format = _formats(spec)
    layout = block_layout(x.shape, spec.block)
    if (amax is not None or scale is not None) and not (layout.per_tensor or spec.global_scale):
        raise LowbitError(
            f"amax/scale overrides need block='tensor' or global_scale=True, got block={spec.block!r}"
        )
    if scale is not None and (not layout.per_tensor or spec.scale_format != "fp32"):
        raise LowbitError("a scale override needs block='tensor' with scale_format='fp32' (FP8 delayed scaling)")
    gen = make_generator(generator, seed, x.device) if spec.rounding == "sr" else None
    src = rht(x, spec.rht_size, spec.rht_seed) if spec.rht_size else x
    rows = layout.block_rows(src)  # (B, r, C)

    global_encode = None
    if spec.global_scale:
        measured = tensor_amax(src) if amax is None else torch.as_tensor(amax, dtype=torch.float32, device=x.device)
        global_encode = global_encode_scale(measured, element, scale_format)
    if layout.per_tensor:
        fixed = _tensor_scaling(src, spec, element, scale_format, amax if not spec.global_scale else None, scale)
        scaling_of = lambda blocks, sl: fixed
    else:
        scaling_of = lambda blocks, sl: _block_scaling(blocks, spec, element, scale_format, global_encode)
    codes, parts = _encode_blocks(rows, layout, spec, element, scaling_of, gen, stats)

    first = parts[0]
    if layout.per_tensor:
        scaling = first
    else:
        cat = lambda name: torch.cat([getattr(p, name) for p in parts]) if len(parts) > 1 else getattr(first, name)
        scaling = _Scaling(cat("decode"), cat("codes"), first.factor, cat("zero_point") if spec.asymmetric else None)
    scale_shape = layout.scale_shape
    return QTensor(
        codes=codes.view(x.shape),
        scales=scaling.decode.reshape(scale_shape),
        scale_codes=scaling.codes.reshape(scale_shape),
        global_scale=None if global_encode is None else torch.reciprocal(global_encode).reshape(()),
        zero_points=None if scaling.zero_point is None else scaling.zero_point.reshape(scale_shape),
        spec=spec,
        shape=tuple(x.shape),
        dtype=x.dtype,
    )


def quantize(
    x: torch.Tensor,
    spec: SpecLike,
    *,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    amax: torch.Tensor | float | None = None,
    scale: torch.Tensor | float | None = None,
) -> QTensor:
    """Quantize ``x`` (any float dtype; computed in float32) as ``spec`` describes.

    spec: a QuantSpec, a preset name (``"mxfp4"``, ``"nvfp4"``, ...) or a mapping (YAML).
    generator / seed: randomness for stochastic rounding (``spec.rounding == "sr"``); with
        neither, torch's global generator. Reproducible for the same seed, shape and version.
    amax: tensor amax to use instead of measuring it (``block="tensor"``, or NVFP4's global
        scale); scale: FP8 encode scale to use (``block="tensor"``, fp32 scales; delayed scaling).
    Blocks run along the last dim (or the last two); move another dim last to block along it.
    """
    return _quantize(x, get_spec(spec), generator, seed, amax, scale)


def dequantize(q: QTensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Decode a QTensor back to a tensor of ``dtype`` (default: the original dtype)."""
    if not isinstance(q, QTensor):
        raise LowbitError(f"dequantize needs a QTensor (from lowbit.numerics.quantize), got {type(q).__name__}")
    spec = q.spec
    element, _ = _formats(spec)
    layout = block_layout(q.shape, spec.block)
    out_dtype = dtype or q.dtype
    codes = layout.block_rows(q.codes)  # (B, r, C)
    n_scale_rows = 1 if layout.per_tensor else layout.n_block_rows
    scales = q.scales.reshape(n_scale_rows, -1)
    zero_points = None if q.zero_points is None else q.zero_points.reshape(n_scale_rows, -1)
    out = torch.empty(codes.shape, dtype=torch.float32 if spec.rht_size else out_dtype, device=q.device)
    for sl in row_chunks(codes.shape[0], codes[0].numel(), codes.device):
        values = layout.blocks(element.decode(codes[sl]))  # (n, r, nb, c) float32
        rows = slice(None) if layout.per_tensor else sl
        if zero_points is not None:
            values = values - zero_points[rows][:, None, :, None]
        values = values * scales[rows][:, None, :, None]
        if q.global_scale is not None:
            values = values * q.global_scale
        if spec.sr_prescale != 1.0:
            values = values / spec.sr_prescale
        out[sl] = values.view(out[sl].shape)
    out = out.view(q.shape)
    if spec.rht_size:
        out = inverse_rht(out, spec.rht_size, spec.rht_seed).to(out_dtype)
    return out


def fake_quantize(
    x: torch.Tensor,
    spec: SpecLike,
    *,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    amax: torch.Tensor | float | None = None,
    scale: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """``dequantize(quantize(x, spec))``: x rounded to the values the spec can represent."""
    return dequantize(quantize(x, spec, generator=generator, seed=seed, amax=amax, scale=scale))


def requantize(
    x: torch.Tensor, like: QTensor, *, generator: torch.Generator | None = None, seed: int | None = None
) -> QTensor:
    """Quantize ``x`` onto the grid of ``like``: same spec, scales, global scale and zero points.

    ``requantize(dequantize(q), q)`` reproduces ``q.codes``: quantization is a projection onto
    the grid its scales define (the property that holds for NVFP4, whose scales move when the
    amax of the already-quantized tensor differs). FP32 scales use factor = 1 / decode scale.
    """
    _check_input(x, "requantize")
    if tuple(x.shape) != like.shape:
        raise LowbitError(f"requantize needs x of shape {like.shape} (the QTensor's), got {tuple(x.shape)}")
    spec = like.spec
    element, scale_format = _formats(spec)
    layout = block_layout(x.shape, spec.block)
    gen = make_generator(generator, seed, x.device) if spec.rounding == "sr" else None
    src = rht(x, spec.rht_size, spec.rht_seed) if spec.rht_size else x
    n_scale_rows = 1 if layout.per_tensor else layout.n_block_rows
    decode = like.scales.reshape(n_scale_rows, -1)
    codes = like.scale_codes.reshape(n_scale_rows, -1)
    zero_point = None if like.zero_points is None else like.zero_points.reshape(n_scale_rows, -1)
    if scale_format.name == "e8m0":
        factor = pow2_from_exponent(127 - codes.to(torch.int32))
    elif like.global_scale is not None:
        factor = torch.clamp(torch.reciprocal(decode * like.global_scale), max=_FLT_MAX)
    else:
        factor = torch.clamp(torch.reciprocal(decode), max=_FLT_MAX)

    def scaling_of(blocks: torch.Tensor, sl: slice) -> _Scaling:
        rows = slice(None) if layout.per_tensor else sl
        zp = None if zero_point is None else zero_point[rows]
        return _Scaling(decode[rows], codes[rows], factor[rows], zp)

    new_codes, _ = _encode_blocks(layout.block_rows(src), layout, spec, element, scaling_of, gen, None)
    return QTensor(
        new_codes.view(x.shape), like.scales, like.scale_codes, like.global_scale, like.zero_points, spec, like.shape, x.dtype
    )
