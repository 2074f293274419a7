"""``quantize``, ``dequantize``, ``fake_quantize``, ``requantize``: a QuantSpec applied to a tensor.

quantize(x, spec):
  1. optional random Hadamard transform of the last dim (``spec.rht_size``);
  2. a tensor-level amax where the spec needs one (``block="tensor"``, NVFP4's global scale);
  3. every block: amax -> scale (MX E8M0 rule, NVFP4 two-level E4M3, FP32 current scaling, or
     asymmetric integer min/max) -> element encode factor (see :mod:`lowbit.numerics.blocks`);
  4. elements: encode(x * factor * sr_prescale) in the element format, rounding ``spec.rounding``.
Everything is computed in float32 whatever the input dtype. Steps 1-3 make a :class:`_Plan`;
step 4 (and decoding) runs over chunks of block rows on CPU (same numbers, far fewer page
faults and cache misses; see :mod:`lowbit.numerics._chunks`).

Two element paths give the same bits. The general one is each format's ``encode`` /
``decode``, the definition. On CPU, chunks without NaN/Inf input in a built-in signed,
saturating format take the arithmetic-only path of :mod:`lowbit.numerics._fast` (no
``torch.where``, no table gathers; 2-5x faster). ``fake_quantize`` rounds elements straight to
their decoded values there, without codes. Eagerly on CPU, where every block is finite and the
format is a built-in one of at most 8 bits rounded RNE or SR, the block amax (or min/max), the
block scales, the codes (or ``fake_quantize``'s values) and ``dequantize``'s values are each
one C pass over the whole tensor (:mod:`lowbit.numerics._native`), the same arithmetic in the
same order. The tests compare all paths bit for bit; the
private ``_quantize`` / ``_dequantize`` / ``_fake_quantize`` / ``_requantize`` take
``fast=False`` to force the general path.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from lowbit.errors import LowbitError
from lowbit.numerics import _fast, _native
from lowbit.numerics._chunks import contiguous, row_chunks
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
from lowbit.numerics.formats import FLT_MAX, ElementFormat, get_format
from lowbit.numerics.hadamard import (
    _shared_signs,
    inverse_rht,
    rht,
    rotate_blocks,
    rotate_columns,
    unrotate_blocks,
    unrotate_columns,
)
from lowbit.numerics.qtensor import QTensor
from lowbit.numerics.rounding import RandomBits, make_generator
from lowbit.numerics.scaling import tensor_amax
from lowbit.numerics.spec import QuantSpec, get_spec

__all__ = ["Kept", "dequantize", "fake_quantize", "fake_quantize_columns", "keep_columns", "quantize", "requantize"]

SpecLike = str | Mapping[str, Any] | QuantSpec
_COMPILE_MIN_ELEMENTS = 1 << 16  # below this, eager chunks cost less than a compiled call's guards


@dataclass
class _Scaling:
    """Scales of a set of blocks, each (n, blocks_per_row) or (1, 1) for one tensor scale."""

    decode: torch.Tensor  # float32 decode scales
    codes: torch.Tensor | None  # the scales in the scale format (None: fake_quantize's compiled path)
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


def _encode_factor(decode: torch.Tensor) -> torch.Tensor:
    """1 / decode scale, clamped to FLT_MAX where a subnormal scale's reciprocal overflows (as
    current scaling clamps max / amax): measured, given and requantize scales encode alike."""
    return torch.clamp(torch.reciprocal(decode), max=FLT_MAX)


def _scaling_from_amax(
    amax: torch.Tensor,
    spec: QuantSpec,
    element: ElementFormat,
    scale_format: ElementFormat,
    global_encode: torch.Tensor | None,
    finite: bool = False,
) -> _Scaling:
    """Scales from block amax; ``finite``: every amax is finite (no NaN scale codes to mind; on CPU one C
    pass makes them, the same bits)."""
    if finite:
        options = (spec.scale_rule, spec.pow2_scale, spec.amax_target, global_encode)
        native = _fast.block_scales(amax, element, scale_format, *options)
        if native is not None:
            decode, factor, codes = native
            return _Scaling(decode, decode.view(torch.int32) if codes is None else codes, factor)
    if scale_format.name == "e8m0":
        codes = mx_scale_codes(amax, element, spec.scale_rule)
        if finite:  # the arithmetic path's where-free E8M0 decode
            decode, factor = _fast.e8m0_scales(codes)
            return _Scaling(decode, codes, factor)
        exponent = codes.to(torch.int32) - 127
        return _Scaling(scale_format.decode(codes), codes, pow2_from_exponent(-exponent))
    if scale_format.name == "fp32":
        decode, factor = fp32_scales(amax, element, spec.pow2_scale, spec.amax_target)
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
        return _Scaling(decode, decode.view(torch.int32), _encode_factor(decode), zero_point)
    amax = tensor_amax(x) if amax is None else torch.as_tensor(amax, dtype=torch.float32, device=x.device)
    return _scaling_from_amax(amax.reshape(1, 1), spec, element, scale_format, None)


_POOL_MAX_COLS = 32  # widest block whose |x| max a CPU max-pool takes (wider rows: amax is as fast)


def _block_reduce(rows: torch.Tensor, layout: BlockLayout, reduce, absolute: bool = False) -> torch.Tensor:
    """``reduce`` (torch.amax / torch.amin) of every block of (B, r, C) block rows (of ``|x|``
    with ``absolute``) -> (B, C/c) float32, chunk by chunk. Reduces the inner c first, then the
    r rows: the same values as one reduction over both dims, 2-3x faster for 2-D blocks on CPU.
    The inner max of ``|x|`` on CPU is a max-pool with stride c: the same maxima (NaN propagates,
    every zero is +0 after abs), 2.5x faster than amax over an inner dim of 16 or 32."""
    if absolute and reduce is torch.amax and (native := _native.block_extrema(rows, layout.cols)) is not None:
        return native[0]  # one C pass where every block is finite
    out = torch.empty(rows.shape[0], layout.blocks_per_row, dtype=torch.float32, device=rows.device)
    pool = absolute and reduce is torch.amax and rows.device.type == "cpu" and layout.cols <= _POOL_MAX_COLS
    for sl in row_chunks(rows.shape[0], rows[0].numel(), rows.device):
        if pool:
            chunk = rows[sl].float().abs()  # (n, r, C)
            inner = F.max_pool1d(chunk.view(-1, 1, layout.last), layout.cols)  # (n*r, 1, C/c)
            out[sl] = inner.view(chunk.shape[0], layout.rows, layout.blocks_per_row).amax(dim=1)
            continue
        blocks = layout.blocks(rows[sl].float())  # (n, r, nb, c)
        if absolute:
            blocks = blocks.abs()
        out[sl] = reduce(reduce(blocks, dim=3), dim=1)
    return out


def _scale_options(spec: QuantSpec) -> tuple[bool, str, bool, float]:
    """What the compiled scale graphs read of a spec besides its formats: (global scale, scale rule,
    power-of-two FP32 scales, amax target)."""
    return spec.global_scale, spec.scale_rule, spec.pow2_scale, spec.amax_target


def _compiled_scales(
    rows: torch.Tensor, layout: BlockLayout, spec: QuantSpec
) -> tuple[_Scaling, torch.Tensor | None] | None:
    """Block amax, global and minifloat (E4M3, UE5M3), E8M0 or FP32 block scales of the block rows in one
    compiled graph, when they apply (:func:`._fast.compiled_block_scales`); minifloat codes are left out
    (fake_quantize needs none; ``_qtensor`` encodes them)."""
    element, scale_format = _formats(spec)
    out = _fast.compiled_block_scales(layout.blocks(rows), element, scale_format, *_scale_options(spec))
    if out is None:
        return None
    decode, factor, global_encode, codes = out
    return _Scaling(decode, codes, factor), global_encode


_ROTATIONS = {  # (down columns, inverse) -> the reference function
    (False, False): rotate_blocks,
    (False, True): unrotate_blocks,
    (True, False): rotate_columns,
    (True, True): unrotate_columns,
}


def _fast_rotation(x: torch.Tensor, signs: torch.Tensor, columns: bool, inverse: bool) -> torch.Tensor | None:
    """``rotate_blocks`` of (M, n) blocks or ``rotate_columns`` of (N, C) ``x`` (their inverses with ``inverse``)
    by the C kernel (:mod:`._native`), else as one compiled kernel; the same bits; None where neither runs."""
    out = (_native.rotate_columns if columns else _native.rotate_blocks)(x, signs, inverse)
    if out is None:
        out = _fast.run_compiled(_ROTATIONS[columns, inverse], (x, signs), ((0, 1) if columns else (0,), ()))
    return out


def _rht(x: torch.Tensor, size: int, seed: int, compile: bool, inverse: bool = False) -> torch.Tensor:
    """``rht`` (or ``inverse_rht``) of ``x`` by the C kernel (:mod:`._native`) where it runs, else with
    ``compile`` by a compiled CPU kernel, else eagerly (the same values)."""
    if x.device.type == "cpu" and x.dim() and x.shape[-1] % size == 0:  # else the eager call raises the clear error
        blocks, signs = x.reshape(-1, size), _shared_signs(size, int(seed), x.device)
        if compile:
            out = _fast_rotation(blocks, signs, False, inverse)
        else:  # the C kernel at any width beats the eager butterfly
            out = _native.rotate_blocks(blocks.contiguous(), signs, inverse, narrow=True)
        if out is not None:
            return out.view(x.shape)
    return (inverse_rht if inverse else rht)(x, size, seed)


def _finite_rows(n_rows: int, *extrema: torch.Tensor) -> torch.Tensor | None:
    """(B,) bool: block rows whose extrema (each (B, nb) or (1, 1)) are finite, i.e. rows without
    NaN/Inf input; None when every row is."""
    if _all_finite(*extrema):
        return None
    if all(e.numel() == 1 for e in extrema):  # one tensor scale
        return torch.zeros(n_rows, dtype=torch.bool)
    ok = torch.isfinite(extrema[0])
    for e in extrema[1:]:
        ok = ok & torch.isfinite(e)
    return ok.all(dim=1).expand(n_rows)


def _fill(shape: torch.Size, dtype: torch.dtype, device: torch.device, parts) -> torch.Tensor:
    """One (B, ...) tensor of ``dtype`` from (block-row slice, values) chunks, written in place.
    A single chunk that covers every row is returned as is (cast to ``dtype``): small tensors
    skip the copy."""
    out = None
    for sl, part in parts:
        if out is None and sl.start == 0 and sl.stop >= shape[0]:
            return part.reshape(shape).to(dtype)
        if out is None:
            out = torch.empty(shape, dtype=dtype, device=device)
        out[sl] = part.view(out[sl].shape)
    return out


def _finite_factors(scaling: _Scaling) -> bool:
    """Finite input times a finite factor is never NaN, what the arithmetic path needs. Factors
    are finite except from a scale override (Inf/NaN) or a degenerate global scale."""
    return _all_finite(scaling.factor)


def _all_finite(*tensors: torch.Tensor | None) -> bool:
    """Whether every element of the tensors given (None: none) is finite: their min and max are (NaN
    propagates through ``aminmax``, one pass without a mask: on CPU 15x faster than ``isfinite().all()``)."""
    for t in tensors:
        if t is None:
            continue
        extrema = (t.item(),) if t.numel() == 1 else [v.item() for v in torch.aminmax(t)]
        if not all(math.isfinite(v) for v in extrema):
            return False
    return True


@dataclass
class _Plan:
    """Everything quantization fixes before it touches elements: the scales of every block, the
    RHT-transformed block rows, and where the arithmetic-only path (:mod:`._fast`) applies."""

    spec: QuantSpec
    element: ElementFormat
    layout: BlockLayout
    rows: torch.Tensor  # (B, r, C) block rows of the (transformed) input, any float dtype
    scaling: _Scaling  # every block's scales, (B, C/c), or (1, 1) for one tensor scale
    global_encode: torch.Tensor | None  # NVFP4's global encode scale
    rng: RandomBits | None  # SR bits of the rows' elements, by flat index
    fast: bool  # CPU and a format the arithmetic path covers
    finite_rows: torch.Tensor | None  # (B,) bool: block rows without NaN/Inf; None: all

    @functools.cached_property
    def factor(self) -> torch.Tensor:
        """The blocks' encode factors with the SR prescale folded in (computed once per quantization)."""
        factor = self.scaling.factor
        return factor * self.spec.sr_prescale if self.spec.sr_prescale != 1.0 else factor

    def chunks(self):
        """Yield (block-row slice, slice of the block scales, whether the arithmetic path applies)
        over chunks of block rows."""
        for sl in row_chunks(self.rows.shape[0], self.rows[0].numel(), self.rows.device):
            blocks_of = slice(None) if self.layout.per_tensor else sl
            yield sl, blocks_of, self.fast and (self.finite_rows is None or bool(self.finite_rows[sl].all()))

    @functools.cached_property
    def global_scale(self) -> torch.Tensor | None:
        """NVFP4's global decode scale (0-d), or None."""
        return None if self.global_encode is None else torch.reciprocal(self.global_encode).reshape(())

    def scaled(self, sl: slice, blocks_of: slice) -> torch.Tensor:
        """Elements of block rows ``sl`` times their encode factor, plus their zero point, (n, r, nb, c) float32."""
        zero_point = None if self.scaling.zero_point is None else self.scaling.zero_point[blocks_of]
        return _fast._scaled(self.layout.blocks(self.rows[sl]), self.factor[blocks_of], zero_point)

    def scaled_chunks(self):
        """Yield (block-row slice, ``scaled`` elements, whether the arithmetic path applies) over
        chunks of block rows."""
        for sl, blocks_of, fast in self.chunks():
            yield sl, self.scaled(sl, blocks_of), fast

    def rng_of(self, sl: slice) -> RandomBits | None:
        """The SR bits from the first element of block rows ``sl`` on."""
        return None if self.rng is None else self.rng.at(sl.start * self.rows[0].numel())

    def encode(self, scaled: torch.Tensor, fast: bool, sl: slice) -> torch.Tensor:
        """Codes of the scaled elements of block rows ``sl``."""
        if fast:
            return _fast.encode(self.element, scaled, self.spec.rounding, self.rng_of(sl))
        return self.element.encode(
            scaled, rounding=self.spec.rounding, saturate=self.spec.saturating, generator=self.rng_of(sl)
        )

    def encode_codes(self, stats: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Codes of every element, (B, r, C)."""

        def parts():
            element, spec = self.element, self.spec
            for sl, scaled, fast in self.scaled_chunks():
                if stats is not None:
                    stats["saturated"] += _saturated(scaled, element, spec.asymmetric).sum()
                yield sl, self.encode(scaled, fast, sl)

        return _fill(self.rows.shape, self.element.code_dtype, self.rows.device, parts())


def _saturated(scaled: torch.Tensor, element: Any, asymmetric: bool) -> torch.Tensor:
    """Scaled elements beyond the element format's range (clipped): outside [qmin, qmax] for
    asymmetric integers, |v| > max otherwise. ``element``: a format or its ``_fast`` constants."""
    if asymmetric:
        return (scaled < element.qmin) | (scaled > element.qmax)
    return scaled.abs() > element.max


def _draw_bits(
    spec: QuantSpec, generator: torch.Generator | RandomBits | None, seed: int | None, device: torch.device
) -> RandomBits | None:
    """The SR bits of one quantization (keys drawn once from the generator, or given), or None without SR."""
    if spec.rounding != "sr":
        return None  # no generator to make
    return RandomBits.of(make_generator(generator, seed, device), device)


def _plan(
    x: torch.Tensor,
    spec: QuantSpec,
    generator: torch.Generator | None,
    seed: int | None,
    amax: torch.Tensor | float | None,
    scale: torch.Tensor | float | None,
    fast: bool,
    compile: bool = False,
    scales: torch.Tensor | None = None,
    zero_points: torch.Tensor | None = None,
) -> _Plan:
    """``compile``: the RHT, block amax and block scales as compiled kernels (same values); the
    caller decides where that applies (``_fake_quantize``: CPU, 2^16 elements or more)."""
    _check_input(x)
    element, scale_format = _formats(spec)
    layout = block_layout(x.shape, spec.block)
    if scales is not None or zero_points is not None:
        return _given_plan(x, spec, element, layout, generator, seed, amax, scale, scales, zero_points, fast)
    if (amax is not None or scale is not None) and not (layout.per_tensor or spec.global_scale):
        raise LowbitError(f"amax/scale overrides need block='tensor' or global_scale=True, got block={spec.block!r}")
    if scale is not None and (not layout.per_tensor or spec.scale_format != "fp32"):
        raise LowbitError("a scale override needs block='tensor' with scale_format='fp32' (FP8 delayed scaling)")
    rng = _draw_bits(spec, generator, seed, x.device)
    src = _rht(x, spec.rht_size, spec.rht_seed, compile) if spec.rht_size else x
    rows = layout.block_rows(src)  # (B, r, C)
    fast = fast and x.device.type == "cpu" and _fast.supported(element, spec.saturating)

    def global_encode_from(block_amax: torch.Tensor | None = None) -> torch.Tensor:
        if amax is not None:
            measured = torch.as_tensor(amax, dtype=torch.float32, device=x.device)
        elif block_amax is not None:  # every block amax finite: their max is max |x|, one pass fewer
            measured = block_amax.amax()
        else:
            measured = tensor_amax(src)
        return global_encode_scale(measured, element, scale_format)

    symmetric_blocks = not (layout.per_tensor or spec.asymmetric)
    global_encode = global_encode_from() if spec.global_scale and not symmetric_blocks else None
    finite_rows = None
    if layout.per_tensor:
        data_amax = tensor_amax(src)
        measured = amax if amax is not None or spec.asymmetric else data_amax
        scaling = _tensor_scaling(src, spec, element, scale_format, measured, scale)
        if fast:
            finite_rows = _finite_rows(rows.shape[0], data_amax.reshape(1, 1))
    elif spec.asymmetric:
        extrema = _native.block_extrema(rows, layout.cols, signed=True)  # one C pass where every block is finite
        if extrema is None:
            extrema = _block_reduce(rows, layout, torch.amin), _block_reduce(rows, layout, torch.amax)
        block_min, block_max = extrema
        decode, zero_point = int_asymmetric_scales(block_min, block_max, element)
        scaling = _Scaling(decode, decode.view(torch.int32), _encode_factor(decode), zero_point)
        if fast:
            finite_rows = _finite_rows(rows.shape[0], block_min, block_max)
    elif compile and fast and amax is None and (scales := _compiled_scales(rows, layout, spec)) is not None:
        scaling, global_encode = scales  # every amax finite: finite factors, and no row takes the general path
        return _Plan(spec, element, layout, rows, scaling, global_encode, rng, fast, None)
    else:
        block_amax = _fast.compiled_block_amax(layout.blocks(rows)) if compile else None
        if block_amax is None:
            block_amax = _block_reduce(rows, layout, torch.amax, absolute=True)  # NaN propagates
        if fast:
            finite_rows = _finite_rows(rows.shape[0], block_amax)
        finite = fast and finite_rows is None
        if spec.global_scale:
            global_encode = global_encode_from(block_amax if finite else None)
        scaling = _scaling_from_amax(block_amax, spec, element, scale_format, global_encode, finite)
    fast = fast and _finite_factors(scaling)
    return _Plan(spec, element, layout, rows, scaling, global_encode, rng, fast, finite_rows)


def _given_plan(
    x: torch.Tensor,
    spec: QuantSpec,
    element: ElementFormat,
    layout: BlockLayout,
    generator: torch.Generator | None,
    seed: int | None,
    amax: Any,
    scale: Any,
    scales: torch.Tensor | None,
    zero_points: torch.Tensor | None,
    fast: bool,
) -> _Plan:
    """The plan for block scales (and zero points) given rather than measured: learned step sizes
    (LSQ), calibrated or searched ranges. FP32 decode scales of the layout's scale shape; the encode
    factor is 1 / scale, as ``requantize`` uses for FP32 scales."""
    if scales is None:
        raise LowbitError("zero_points need their scales: pass scales= too")
    if amax is not None or scale is not None:
        raise LowbitError("scales= replaces the measured scales; it does not combine with amax= or scale=")
    if spec.scale_format != "fp32" or spec.global_scale or spec.rht_size:
        raise LowbitError(
            f"given scales= are FP32 decode scales: they need scale_format='fp32', no global scale and no RHT; "
            f"got scale_format={spec.scale_format!r}, global_scale={spec.global_scale}, rht_size={spec.rht_size}"
        )
    if zero_points is not None and not spec.asymmetric:
        raise LowbitError("zero_points= need an asymmetric spec (asymmetric=True)")
    n_scale_rows = 1 if layout.per_tensor else layout.n_block_rows
    decode = torch.as_tensor(scales, dtype=torch.float32, device=x.device)
    if decode.numel() != math.prod(layout.scale_shape):
        raise LowbitError(
            f"scales= has {decode.numel()} values; block {spec.block!r} over shape {tuple(x.shape)} needs "
            f"shape {layout.scale_shape}"
        )
    decode = decode.reshape(n_scale_rows, -1)
    factor = _encode_factor(decode)
    zero_point = None
    if zero_points is not None:
        zero_point = torch.as_tensor(zero_points, device=x.device).to(torch.int32).reshape(decode.shape)
    scaling = _Scaling(decode, decode.view(torch.int32), factor, zero_point)
    rows = layout.block_rows(x)
    fast = fast and x.device.type == "cpu" and _fast.supported(element, spec.saturating) and _finite_factors(scaling)
    finite_rows = _finite_rows(rows.shape[0], tensor_amax(x).reshape(1, 1)) if fast else None
    rng = _draw_bits(spec, generator, seed, x.device)
    return _Plan(spec, element, layout, rows, scaling, None, rng, fast, finite_rows)


def _quantize(
    x: torch.Tensor,
    spec: QuantSpec,
    generator: torch.Generator | None,
    seed: int | None,
    amax: torch.Tensor | float | None,
    scale: torch.Tensor | float | None,
    stats: dict[str, torch.Tensor] | None = None,
    fast: bool = True,
    scales: torch.Tensor | None = None,
    zero_points: torch.Tensor | None = None,
    compile: bool = False,
) -> QTensor:
    """``quantize``; ``fast=False`` forces the general element path (the tests' reference); ``compile``:
    the RHT, block scales and codes as compiled kernels where they apply (same values)."""
    compile = compile and x.device.type == "cpu" and x.numel() >= _COMPILE_MIN_ELEMENTS
    if fast and not compile and stats is None and all(v is None for v in (amax, scale, scales, zero_points)):
        _check_input(x)
        generator, seed = _draw_bits(spec, generator, seed, x.device), None  # a fallback plan takes these bits
        if (fused := _fused_quantize(x, spec, generator)) is not None:
            return fused
    plan = _plan(x, spec, generator, seed, amax, scale, fast, compile, scales=scales, zero_points=zero_points)
    codes = None
    if stats is None and plan.fast and plan.finite_rows is None:
        zero_point = plan.scaling.zero_point
        if compile:
            blocks = plan.layout.blocks(plan.rows)
            codes = _fast.compiled_encode(
                blocks, plan.factor, zero_point, plan.rng, element=plan.element, rounding=spec.rounding
            )
        else:  # one C pass
            fused = _fast.quantize_blocks(
                plan.element, plan.rows, plan.layout.cols, plan.factor, zero_point, spec.rounding, plan.rng
            )
            codes = None if fused is None else fused[0]
    return _qtensor(x, plan, plan.encode_codes(stats) if codes is None else codes.view(plan.rows.shape))


def _fused_quantize(x: torch.Tensor, spec: QuantSpec, rng: RandomBits | None) -> QTensor | None:
    """``quantize`` of ``x`` on CPU with 1-D blocks of at most 4,096 elements and symmetric scales (no RHT
    or zero points; NVFP4's global scale from the tensor amax, measured first): each block's amax, scales
    and codes in one C pass over x (``_fast.quantize_fused``), the same codes and scales as the plan's
    passes; None where that does not apply or a block holds a NaN or an Inf (the caller plans it with the
    same SR bits)."""
    element, scale_format = _formats(spec)
    if x.device.type != "cpu" or spec.rht_size or spec.asymmetric:
        return None
    layout = block_layout(x.shape, spec.block)
    if layout.per_tensor or layout.rows != 1 or not _fast.supported(element, spec.saturating):
        return None
    options = {"rule": spec.scale_rule, "pow2": spec.pow2_scale, "target": spec.amax_target}
    x = x if x.is_contiguous() else x.contiguous()
    # the plan's global encode scale from max |x| (there: the blocks' amax, the same value when all are finite)
    global_encode = global_encode_scale(tensor_amax(x), element, scale_format) if spec.global_scale else None
    out = _fast.quantize_fused(
        element, scale_format, x, layout.cols, spec.rounding, rng, prescale=spec.sr_prescale,
        global_encode=global_encode, **options,
    )  # fmt: skip
    if out is None:
        return None
    codes, decode, scale_codes = out
    scale_shape = layout.scale_shape
    return QTensor(
        codes=codes.view(x.shape),
        scales=decode.reshape(scale_shape),
        scale_codes=(decode.view(torch.int32) if scale_codes is None else scale_codes).reshape(scale_shape),
        global_scale=None if global_encode is None else torch.reciprocal(global_encode).reshape(()),
        zero_points=None,
        spec=spec,
        shape=tuple(x.shape),
        dtype=x.dtype,
    )


def _qtensor(x: torch.Tensor, plan: _Plan, codes: torch.Tensor) -> QTensor:
    """The QTensor of ``x`` quantized by ``plan``, its element ``codes`` (B, r, C) given."""
    scaling, scale_shape = plan.scaling, plan.layout.scale_shape
    scale_codes = scaling.codes
    if scale_codes is None:  # compiled minifloat scales come as values, each on the grid: its code, exactly
        scale_codes = _formats(plan.spec)[1].encode(scaling.decode)
    return QTensor(
        codes=codes.view(x.shape),
        scales=scaling.decode.reshape(scale_shape),
        scale_codes=scale_codes.reshape(scale_shape),
        global_scale=plan.global_scale,
        zero_points=None if scaling.zero_point is None else scaling.zero_point.reshape(scale_shape),
        spec=plan.spec,
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
    scales: torch.Tensor | None = None,
    zero_points: torch.Tensor | None = None,
    compile: bool = False,
) -> QTensor:
    """Quantize ``x`` (any float dtype; computed in float32) as ``spec`` describes.

    spec: a QuantSpec, a preset name (``"mxfp4"``, ``"nvfp4"``, ...) or a mapping (YAML).
    generator / seed: randomness for stochastic rounding (``spec.rounding == "sr"``); with
        neither, torch's global generator. Reproducible for the same seed, shape and version.
    amax: tensor amax to use instead of measuring it (``block="tensor"``, or NVFP4's global
        scale); scale: FP8 encode scale to use (``block="tensor"``, fp32 scales; delayed scaling).
    scales / zero_points: given FP32 decode block scales (shape ``block_layout(...).scale_shape``)
        and integer zero points, e.g. a learned or calibrated quantizer's, instead of measured ones.
    compile: on CPU, a finite tensor of 2^16 elements or more gets its RHT, block scales and codes
        from ``torch.compile``d kernels instead of eager passes over chunks (same codes and scales;
        the first call of each format, rounding and shape kind compiles, seconds each; without a
        working C++ compiler a warning, then eager), as ``fake_quantize(compile=True)``.
    Blocks run along the last dim (or the last two); move another dim last to block along it.
    """
    spec = get_spec(spec)
    return _quantize(x, spec, generator, seed, amax, scale, scales=scales, zero_points=zero_points, compile=compile)


def _dequantize(q: QTensor, dtype: torch.dtype | None = None, fast: bool = True, compile: bool = False) -> torch.Tensor:
    """``dequantize``; ``fast=False`` forces the general decode (the tests' reference); ``compile``: the
    decode and rescale, and the inverse RHT, as compiled kernels (same values)."""
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
    fast = fast and q.device.type == "cpu" and _fast.supported(element, saturate=True)
    compile = compile and fast and q.device.type == "cpu" and codes.numel() >= _COMPILE_MIN_ELEMENTS
    out = None
    # NaN scales (a NaN input's) leave NaN payloads to the kernel's operand order: eager, as specified
    if compile and _all_finite(scales, q.global_scale):
        options = {
            "element": element,
            "sr_prescale": spec.sr_prescale,
            "out_dtype": torch.float32 if spec.rht_size else out_dtype,
        }
        out = _fast.compiled_decode(layout.blocks(codes), scales, zero_points, q.global_scale, **options)
    codec = _fast.block_codec(element) if out is None and fast else None
    if codec is not None and _all_finite(scales, q.global_scale):  # one C pass, float32
        out = _native.decode_blocks(codes, layout.cols, codec, scales, zero_points, q.global_scale, spec.sr_prescale)
        if out is not None and not spec.rht_size:
            out = out.to(out_dtype)

    def parts():
        for sl in row_chunks(codes.shape[0], codes[0].numel(), codes.device):
            values = _fast.decode(element, codes[sl]) if fast else None  # None: Inf/NaN codes
            if values is None:
                values = element.decode(codes[sl])
            blocks_of = slice(None) if layout.per_tensor else sl
            zp = None if zero_points is None else zero_points[blocks_of]
            yield sl, _fast.unscale(layout.blocks(values), scales[blocks_of], zp, q.global_scale, spec.sr_prescale)

    if out is None:
        out = _fill(codes.shape, torch.float32 if spec.rht_size else out_dtype, q.device, parts())
    out = out.view(q.shape)
    if spec.rht_size:
        compile = compile and out.device.type == "cpu" and out.numel() >= _COMPILE_MIN_ELEMENTS
        out = _rht(out, spec.rht_size, spec.rht_seed, compile, inverse=True).to(out_dtype)
    return out


def dequantize(q: QTensor, dtype: torch.dtype | None = None, *, compile: bool = False) -> torch.Tensor:
    """Decode a QTensor back to a tensor of ``dtype`` (default: the original dtype). ``compile``: on
    CPU, 2^16 codes or more decoded and rescaled in one ``torch.compile``d kernel (same values; see
    ``quantize``)."""
    return _dequantize(q, dtype, compile=compile)


def _fake_quantize(
    x: torch.Tensor,
    spec: QuantSpec,
    generator: torch.Generator | None,
    seed: int | None,
    amax: torch.Tensor | float | None,
    scale: torch.Tensor | float | None,
    fast: bool = True,
    compile: bool = False,
    rotated: bool = False,
    scales: torch.Tensor | None = None,
    zero_points: torch.Tensor | None = None,
    plan: _Plan | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``dequantize(quantize(x), dtype or x.dtype)`` without materializing codes: where the arithmetic
    path applies, each chunk's elements are rounded to the format's values directly and unscaled
    (:func:`._fast.fake_quantize_blocks`), or the whole tensor in one compiled kernel (``compile``);
    elsewhere encoded, decoded and unscaled exactly as ``dequantize`` does. ``plan``: ``x``'s plan,
    already made (with the same ``compile``)."""
    compile = compile and x.device.type == "cpu" and x.numel() >= _COMPILE_MIN_ELEMENTS
    dtype = dtype or x.dtype
    out_dtype = torch.float32 if spec.rht_size else dtype
    out = None
    if plan is None and compile and fast and scales is None and zero_points is None and amax is None and scale is None:
        _check_input(x)
        generator, seed = _draw_bits(spec, generator, seed, x.device), None  # a fallback plan takes these bits
        out = _scaled_fake_quantize(x, spec, generator, out_dtype)
    if out is None:
        out = _planned_fake_quantize(
            x, spec, generator, seed, amax, scale, fast, compile, scales, zero_points, plan, out_dtype
        )
    out = out.view(x.shape)
    if spec.rht_size and not rotated:  # rotated: the values in the transformed basis, float32
        out = _rht(out, spec.rht_size, spec.rht_seed, compile, inverse=True).to(dtype)
    return out


def _scaled_fake_quantize(
    x: torch.Tensor, spec: QuantSpec, rng: RandomBits | None, out_dtype: torch.dtype
) -> torch.Tensor | None:
    """The compiled path's block scales and element step of ``x`` (after its RHT) in one compiled graph
    (``_fast.compiled_scaled_fake_quantize``), (B, r, C) values in ``out_dtype``; None where that does
    not apply (per-tensor or asymmetric scales, a format the arithmetic path does not cover, a non-finite
    block, scales no compiled graph makes): the caller plans it step by step, with the same SR bits."""
    element, scale_format = _formats(spec)
    layout = block_layout(x.shape, spec.block)
    if layout.per_tensor or spec.asymmetric or not _fast.supported(element, spec.saturating):
        return None
    global_scale, rule, pow2, target = _scale_options(spec)
    if _fast._scale_graph(element, scale_format, global_scale, rule, x.device, pow2, target) is None:
        return None
    src = _rht(x, spec.rht_size, spec.rht_seed, True) if spec.rht_size else x
    out = _fast.compiled_scaled_fake_quantize(
        layout.blocks(layout.block_rows(src)),
        rng,
        element=element,
        scale_format=scale_format,
        global_scale=global_scale,
        rule=rule,
        pow2=pow2,
        target=target,
        rounding=spec.rounding,
        sr_prescale=spec.sr_prescale,
        out_dtype=out_dtype,
    )
    return None if out is None else out[0]


def _planned_fake_quantize(
    x: torch.Tensor,
    spec: QuantSpec,
    generator: torch.Generator | RandomBits | None,
    seed: int | None,
    amax: torch.Tensor | float | None,
    scale: torch.Tensor | float | None,
    fast: bool,
    compile: bool,
    scales: torch.Tensor | None,
    zero_points: torch.Tensor | None,
    plan: _Plan | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """``_fake_quantize`` step by step: the plan (scales), then the elements, (B, r, C) in ``out_dtype``."""
    if plan is None:
        plan = _plan(x, spec, generator, seed, amax, scale, fast, compile, scales, zero_points)
    scaling, element, layout = plan.scaling, plan.element, plan.layout
    global_scale = plan.global_scale
    options = {"element": element, "rounding": spec.rounding, "sr_prescale": spec.sr_prescale, "out_dtype": out_dtype}
    factor = plan.factor
    out = None
    if compile and plan.fast and plan.finite_rows is None:
        out = _fast.compiled_fake_quantize(
            layout.blocks(plan.rows), factor, scaling.decode, scaling.zero_point, global_scale, plan.rng, **options
        )
    elif plan.fast and plan.finite_rows is None:  # one C pass: codes, their values, unscaled
        unscale = (scaling.decode, global_scale, spec.sr_prescale)
        fused = _fast.quantize_blocks(
            element,
            plan.rows,
            layout.cols,
            factor,
            scaling.zero_point,
            spec.rounding,
            plan.rng,
            codes=False,
            unscale=unscale,
        )
        out = None if fused is None else fused[1].to(out_dtype)

    def parts():
        for sl, blocks_of, fast_chunk in plan.chunks():
            zp = None if scaling.zero_point is None else scaling.zero_point[blocks_of]
            if fast_chunk:
                rng = plan.rng_of(sl)
                blocks = layout.blocks(plan.rows[sl])
                bits = None if rng is None else rng.bits(blocks.shape)
                args = (factor[blocks_of], scaling.decode[blocks_of], zp, global_scale, bits)
                yield sl, _fast.fake_quantize_blocks(blocks, *args, **options)
                continue
            values = element.decode(plan.encode(plan.scaled(sl, blocks_of), False, sl))
            yield sl, _fast.unscale(values, scaling.decode[blocks_of], zp, global_scale, spec.sr_prescale)

    return _fill(plan.rows.shape, out_dtype, x.device, parts()) if out is None else out


def _saturated_count(
    blocks: torch.Tensor, factor: torch.Tensor, zero_point: torch.Tensor | None, *, element: Any, asymmetric: bool
) -> torch.Tensor:
    """``encode_codes``' saturation count of blocks (n, r, nb, c), by the same functions."""
    return _saturated(_fast._scaled(blocks, factor, zero_point), element, asymmetric).sum()


def _fake_quantize_stats(
    x: torch.Tensor, spec: QuantSpec, seed: int | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int] | None:
    """``dequantize(q, float32)`` of ``q = quantize(x, seed=seed)``, ``q.scales``, ``q.global_scale``
    and the saturation count ``quantize`` records, without materializing codes: compiled CPU
    kernels (the quantization health of a large operand). None where that does not apply (not CPU,
    small, a non-finite block, a format outside the arithmetic path)."""
    if x.device.type != "cpu" or x.numel() < _COMPILE_MIN_ELEMENTS:
        return None
    plan = _plan(x, spec, None, seed, None, None, True, True)
    if not plan.fast or plan.finite_rows is not None:
        return None
    blocks, zero_point = plan.layout.blocks(plan.rows), plan.scaling.zero_point
    constants = _fast._constants(plan.element)  # plain numbers, as a compiled graph bakes them in
    dims = ((0, 2), (0, 1), (0, 1))
    count = _fast.run_compiled(
        _saturated_count, (blocks, plan.factor, zero_point), dims, element=constants, asymmetric=spec.asymmetric
    )
    if count is None:
        return None
    values = _fake_quantize(x, spec, None, seed, None, None, compile=True, plan=plan, dtype=torch.float32)
    return values, plan.scaling.decode.reshape(plan.layout.scale_shape), plan.global_scale, int(count)


def _columns_apply(t: torch.Tensor, spec: QuantSpec, element: ElementFormat) -> bool:
    """Whether :func:`fake_quantize_columns` has a compiled path for ``spec`` on 2-D ``t`` (N, C): 1 x c
    blocks with symmetric scales, the RHT (if any) and the blocks dividing N, the arithmetic path's formats."""
    if t.dim() != 2 or t.device.type != "cpu" or t.numel() < _COMPILE_MIN_ELEMENTS:
        return False
    if isinstance(spec.block, str) or spec.block[0] != 1 or spec.asymmetric:
        return False
    n = t.shape[0]
    if n % spec.block[1] or (spec.rht_size and n % spec.rht_size):
        return False
    return _fast.supported(element, spec.saturating)


def _columns_blocks(
    t: torch.Tensor, spec: QuantSpec, element: ElementFormat, compile: bool
) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """The compiled column path's blocks: (c x 1 blocks (N/c, c, C) of t after the RHT down its columns,
    RHT signs or None), or None where that path does not apply (the caller takes the reference)."""
    if not (compile and _columns_apply(t, spec, element)):
        return None
    signs = _shared_signs(spec.rht_size, int(spec.rht_seed), t.device) if spec.rht_size else None
    src = t if signs is None else _fast_rotation(t, signs, True, False)
    if src is None:
        return None
    c = spec.block[1]
    return src.view(t.shape[0] // c, c, t.shape[1]), signs


def _columns_scales(
    blocks: torch.Tensor, spec: QuantSpec, element: ElementFormat, scale_format: ElementFormat
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
    """The blocks' scales, each block's as (N/c, C): (encode factors with the SR prescale folded in, decode
    scales, global decode scale or None); None for a non-finite block (the caller takes the reference)."""
    # every block's scales as (N/c, C), tᵀ's (C, N/c) transposed: elementwise from the amax, so either layout
    scales = _fast.compiled_block_scales(blocks, element, scale_format, *_scale_options(spec))
    if scales is not None:
        decode, factor, global_encode, _ = scales
    else:
        block_amax = _fast.compiled_block_amax(blocks)
        if block_amax is None or not bool(torch.isfinite(block_amax).all()):
            return None
        amax_t = block_amax.t()  # (C, N/c): the amax of tᵀ's blocks, as _plan computes them
        global_encode = global_encode_scale(amax_t.amax(), element, scale_format) if spec.global_scale else None
        scaling = _scaling_from_amax(amax_t, spec, element, scale_format, global_encode, finite=True)
        if not _finite_factors(scaling):
            return None
        decode = scaling.decode.t().contiguous()  # strided, inductor would transpose a tile per use
        factor = scaling.factor.t().contiguous()
    if spec.sr_prescale != 1.0:  # folded in as _Plan.factor folds it
        factor = factor * spec.sr_prescale
    global_scale = None if global_encode is None else torch.reciprocal(global_encode).reshape(())
    return factor, decode, global_scale


def _columns_values(
    t: torch.Tensor,
    spec: QuantSpec,
    rng: RandomBits | None,
    out_dtype: torch.dtype,
    compile: bool,
    container: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None] | None:
    """The compiled column path of ``fake_quantize_columns`` and ``keep_columns``: (values (N/c, c, C) in
    ``out_dtype``, or the element values in ``container``; decode scales (N/c, C); global decode scale or
    None; RHT signs or None). Scales and elements in one compiled graph where one serves them, else in
    two; None where the path does not apply (the caller takes the reference)."""
    element, scale_format = _formats(spec)
    prepared = _columns_blocks(t, spec, element, compile)
    if prepared is None:
        return None
    blocks, signs = prepared
    options = {
        "rounding": spec.rounding,
        "sr_prescale": spec.sr_prescale,
        "out_dtype": out_dtype,
        "columns": True,
        "container": container,
    }
    fused = _fast.compiled_scaled_fake_quantize(
        blocks,
        rng,
        element=element,
        scale_format=scale_format,
        global_scale=spec.global_scale,
        rule=spec.scale_rule,
        pow2=spec.pow2_scale,
        target=spec.amax_target,
        **options,
    )
    if fused is not None:
        return (*fused, signs)
    scales = _columns_scales(blocks, spec, element, scale_format)
    if scales is None:
        return None
    factor, decode, global_scale = scales
    values = _fast.compiled_fake_quantize(blocks, factor, decode, None, global_scale, rng, element=element, **options)
    return None if values is None else (values, decode, global_scale, signs)


def fake_quantize_columns(
    t: torch.Tensor,
    spec: QuantSpec,
    *,
    generator: torch.Generator | None = None,
    compile: bool = False,
    rotated: bool = False,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``fake_quantize(t.t(), spec)`` for 2-D ``t`` (N, C), same bits (SR too: the bits follow tᵀ's
    element order), as a (C, N) view of an (N, C) tensor: with ``compile``, the blocks of tᵀ's rows
    are quantized where they lie, down t's columns (c x 1 blocks (N/c, c, C) of t; the RHT along N
    as a butterfly over rows), so nothing is transposed and the GEMM takes the view: what wgrad's
    operands dyᵀ and xᵀ need. Otherwise (or for NaN/Inf input) tᵀ is copied and quantized, with
    the same SR keys. ``rotated``: with an RHT, the values before the inverse transform (float32,
    or cast to ``dtype`` when given: one rounding either way), as ``_fake_quantize``."""
    rng = _draw_bits(spec, generator, None, t.device)
    rotates = spec.rht_size != 0
    out_dtype = (dtype or torch.float32) if rotates and rotated else torch.float32 if rotates else t.dtype
    path = _columns_values(t, spec, rng, out_dtype, compile)
    if path is None:  # the reference: tᵀ copied, with the same SR keys
        out = _fake_quantize(contiguous(t.t()), spec, rng, None, None, None, compile=compile, rotated=rotated)
        return out if dtype is None else out.to(dtype)
    out, _, _, signs = path
    out = out.view(t.shape)
    if signs is not None and not rotated:
        inverse = _fast_rotation(out, signs, True, True)
        out = (inverse if inverse is not None else unrotate_columns(out, signs)).to(t.dtype)
    return (out if dtype is None else out.to(dtype)).t()


@dataclass(frozen=True)
class Kept:
    """A fake-quantized operand held for a later GEMM as what it is made of: its element values in an
    8-bit container (FP8 E4M3 for E4M3 and the FP4/FP6 formats, E5M2 for E5M2, int8 for integers: each
    value exactly, see ``_fast.container``), its block decode scales (E4M3 scales in float8_e4m3fn, the
    others float32) and its global decode scale. ``restore`` unscales them with the
    arithmetic ``fake_quantize`` uses, so the result is ``fake_quantize_columns(t, spec, compile=True,
    rotated=True, dtype=dtype)`` bit for bit and in the same memory layout, from about half the bytes
    of a BF16 copy of the operand (a quarter of an FP32 one). Built by ``keep_columns``."""

    values: torch.Tensor  # blocks of the elements: (N/c, c, C) down t's columns, or tᵀ's (B, r, nb, c)
    decode: torch.Tensor  # each block's decode scale
    global_scale: torch.Tensor | None
    sr_prescale: float
    dtype: torch.dtype
    shape: tuple[int, int]  # the restored operand's (C, N)
    columns: bool  # values lie down t's columns: the operand is a (C, N) view of an (N, C) tensor

    @property
    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """What to save (``ctx.save_for_backward``); ``with_tensors`` takes them back."""
        return self.values, self.decode, self.global_scale

    def with_tensors(self, values: torch.Tensor, decode: torch.Tensor, global_scale: torch.Tensor | None) -> Kept:
        return dataclasses.replace(self, values=values, decode=decode, global_scale=global_scale)

    def restore(self) -> torch.Tensor:
        """The fake-quantized operand (C, N) in ``dtype``."""
        args = (self.values, self.decode, None, self.global_scale, self.sr_prescale, self.dtype)
        out = _fast.compiled_unscale(*args)
        return out.view(self.shape[::-1]).t() if self.columns else out.view(self.shape)


def keep_columns(t: torch.Tensor, spec: QuantSpec, *, dtype: torch.dtype) -> Kept | None:
    """``fake_quantize_columns(t, spec, compile=True, rotated=True, dtype=dtype)`` kept as a :class:`Kept`
    (its element values and scales, restored later to the same bits in the same layout), by the same
    path: down t's columns where the compiled column path applies, else from a copy of tᵀ (per-tensor
    scales, as FP8's). None where it cannot be kept: stochastic rounding (a later quantization would
    draw other bits: nothing to keep for), asymmetric scales, an element format no 8-bit dtype holds
    exactly, a non-finite or small operand, or a kernel that cannot be built (then the caller keeps
    ``t`` itself, as before)."""
    element, scale_format = _formats(spec)
    store = _fast.container(element)
    if spec.rounding == "sr" or spec.asymmetric or store is None or t.dim() != 2:
        return None
    options = {"element": element, "rounding": spec.rounding, "sr_prescale": spec.sr_prescale, "out_dtype": dtype}
    path = _columns_values(t, spec, None, dtype, compile=True, container=store)
    if path is not None:
        values, decode, global_scale, _ = path
        columns = True
    else:  # the reference's way: a copy of tᵀ, quantized along its rows
        tt = contiguous(t.t())
        if tt.device.type != "cpu" or tt.numel() < _COMPILE_MIN_ELEMENTS:
            return None
        rows_plan = _plan(tt, spec, None, None, None, None, True, True)
        if not rows_plan.fast or rows_plan.finite_rows is not None:
            return None
        blocks, decode, global_scale = (
            rows_plan.layout.blocks(rows_plan.rows),
            rows_plan.scaling.decode,
            rows_plan.global_scale,
        )
        values = _fast.compiled_fake_quantize(
            blocks, rows_plan.factor, decode, None, global_scale, None, **options, container=store
        )
        columns = False
    if values is None:
        return None
    if _fast.container(scale_format) == torch.float8_e4m3fn:
        # E4M3 scales in one byte each (exact). E8M0 scales stay float32: inductor's C++ does not vectorize
        # a float8_e8m0fnu load, and the whole restore loop turns scalar (2048 x 768 MXFP4: 3.3 ms against
        # 0.8 ms), for 3 bytes a block of 32 elements saved
        decode = decode.to(torch.float8_e4m3fn)
    shape = (t.shape[1], t.shape[0])
    return Kept(values, decode, global_scale, spec.sr_prescale, dtype, shape, columns)


def fake_quantize(
    x: torch.Tensor,
    spec: SpecLike,
    *,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    amax: torch.Tensor | float | None = None,
    scale: torch.Tensor | float | None = None,
    compile: bool = False,
    rotated: bool = False,
    scales: torch.Tensor | None = None,
    zero_points: torch.Tensor | None = None,
) -> torch.Tensor:
    """``dequantize(quantize(x, spec))``: x rounded to the values the spec can represent.

    Same bits as that composition (tested), computed without building codes. ``compile``: on
    CPU, round a finite tensor of 2^16 elements or more in one ``torch.compile``d kernel instead
    of ~15 eager passes (same bits, 2-5x faster; the first call of each format, rounding and
    dtype compiles, seconds each; without a working C++ compiler a warning, then eager).
    ``rotated``: with an RHT in the spec, the values in the rotated basis (float32, before the
    inverse transform), what a GEMM whose two operands share the rotation multiplies.
    ``scales`` / ``zero_points``: given block scales, as for ``quantize``."""
    return _fake_quantize(
        x,
        get_spec(spec),
        generator,
        seed,
        amax,
        scale,
        compile=compile,
        rotated=rotated,
        scales=scales,
        zero_points=zero_points,
    )


def _requantize(
    x: torch.Tensor,
    like: QTensor,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    fast: bool = True,
) -> QTensor:
    """``requantize``; ``fast=False`` forces the general element path (the tests' reference)."""
    _check_input(x, "requantize")
    if tuple(x.shape) != like.shape:
        raise LowbitError(f"requantize needs x of shape {like.shape} (the QTensor's), got {tuple(x.shape)}")
    spec = like.spec
    element, scale_format = _formats(spec)
    layout = block_layout(x.shape, spec.block)
    rng = _draw_bits(spec, generator, seed, x.device)
    src = rht(x, spec.rht_size, spec.rht_seed) if spec.rht_size else x
    rows = layout.block_rows(src)
    n_scale_rows = 1 if layout.per_tensor else layout.n_block_rows
    decode = like.scales.reshape(n_scale_rows, -1)
    codes = like.scale_codes.reshape(n_scale_rows, -1)
    zero_point = None if like.zero_points is None else like.zero_points.reshape(n_scale_rows, -1)
    if scale_format.name == "e8m0":
        factor = pow2_from_exponent(127 - codes.to(torch.int32))
    elif like.global_scale is not None:
        factor = _encode_factor(decode * like.global_scale)
    else:
        factor = _encode_factor(decode)
    scaling = _Scaling(decode, codes, factor, zero_point)
    fast = fast and x.device.type == "cpu" and _fast.supported(element, spec.saturating) and _finite_factors(scaling)
    finite_rows = _finite_rows(rows.shape[0], tensor_amax(src).reshape(1, 1)) if fast else None
    plan = _Plan(spec, element, layout, rows, scaling, None, rng, fast, finite_rows)
    return QTensor(
        plan.encode_codes().view(x.shape),
        like.scales,
        like.scale_codes,
        like.global_scale,
        like.zero_points,
        spec,
        like.shape,
        x.dtype,
    )


def requantize(
    x: torch.Tensor, like: QTensor, *, generator: torch.Generator | None = None, seed: int | None = None
) -> QTensor:
    """Quantize ``x`` onto the grid of ``like``: same spec, scales, global scale and zero points.

    ``requantize(dequantize(q), q)`` reproduces ``q.codes``: quantization is a projection onto
    the grid its scales define (the property that holds for NVFP4, whose scales move when the
    amax of the already-quantized tensor differs). FP32 scales use factor = 1 / decode scale.
    """
    return _requantize(x, like, generator, seed)
