"""Arithmetic-only encode / decode for the built-in formats (an implementation detail, not an API).

The general ``encode`` in :mod:`lowbit.numerics.formats` defines every format on every input
(NaN, Inf, -0, non-saturating overflow, unsigned formats). On CPU it is slow for reasons that
have nothing to do with the arithmetic: ``torch.where``, boolean masks, table gathers and
torch's float8_e4m3fn -> float32 cast cost 10-30x a multiply there. For what quantization
almost always sees, *finite* input to a *signed, saturating* minifloat or integer format, the
same numbers come from a few arithmetic and integer ops (same binade, same power-of-two
scaling, same rounding call, no masks):

  minifloat, x finite:  y = clamp(x, -max, max)
                        u = 2^(binade(|y|) - mbits), binade clamped below at emin
                        decode(encode(x)) = round(y / u) * u     (both scalings exact)
  integer, x finite:    decode(encode(x)) = clamp(round(x), qmin, qmax) + 0.0  (the +0.0 turns
                        -0 into +0, as the int8 code does)

Codes come from the same binade and integer (``code = ((binade - emin) << mbits) + integer``);
decoding goes through float16, whose 5-bit exponent field holds any minifloat's exponent field
unchanged (value = fp16(code bits) * 2^(15 - bias), exact, no float32 subnormal arithmetic).

E5M2 is float16's top byte, so its fake-quantized values are torch's cast and a shift.

Compiled (``fake_quantize(compile=True)``): the element step of a whole finite tensor
(scale, round, unscale, SR bits hashed in place) is one ``torch.compile``d kernel, as are the
block amax and minifloat or E8M0 block scales (:func:`run_compiled`). Inductor's C++ would turn a
bitcast into a scalar loop, so a compiled kernel finds the binade with float arithmetic
(:func:`pow2_floor`), which gives the same powers of two; the tests compare compiled and eager
bits on adversarial inputs (tests/framework/numerics/test_numerics_compiled.py).

:mod:`lowbit.numerics.quantize` calls these on CPU only, for formats :func:`supported`
accepts, in chunks whose input is finite and whose encode factors are finite (anything else,
NaN included, takes the general path, so even NaN payloads match). The tests compare both
paths bit for bit on adversarial inputs (tests/framework/numerics/test_numerics_fastpath.py).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable
from typing import NamedTuple

import torch

from lowbit.numerics import _graphs, _native
from lowbit.numerics.blocks import (
    _block_scale_target,
    _element_encode_factor,
    _global_encode,
    mx_scale_codes,
    true_divide,
)
from lowbit.numerics.formats import ElementFormat, FloatFormat, IntFormat
from lowbit.numerics.rounding import RandomBits, hash_bits, round_to_integer, sr_round_up
from lowbit.numerics.scaling import current_scale

__all__ = [
    "compiled_fake_quantize",
    "compiled_scaled_fake_quantize",
    "decode",
    "e8m0_scales",
    "encode",
    "fake_quantize_blocks",
    "pow2_floor",
    "round_to_format",
    "run_compiled",
    "supported",
    "unscale",
]

_EXPONENT_FIELD = 0x7F800000  # float32 exponent bits


def supported(element: ElementFormat, saturate: bool) -> bool:
    """Whether the arithmetic path gives the general path's bits for this format (encode with
    ``saturate``, and decode)."""
    if type(element) is IntFormat:  # exact types: a plugin subclass may change the rules
        return element.bits <= 8
    if element.grid_spacing is not None:  # a plugin's arithmetic rounding: values only, codes by its encode
        return saturate
    if type(element) is not FloatFormat:
        return False
    if not saturate and element.special != "none":
        return False  # non-saturating overflow to Inf/NaN: the general path
    return element.signed and element.ebits <= 5 and element.mbits <= 10


def _binade_field(y: torch.Tensor, element: FloatFormat) -> torch.Tensor:
    """(b + 127) << 23 as int32, b = max(float32 exponent of |y|, emin): the binade's exponent bits."""
    return (y.view(torch.int32) & _EXPONENT_FIELD).clamp_(min=(element.emin + 127) << 23)


def _inverse_ulp(field: torch.Tensor, element: FloatFormat) -> torch.Tensor:
    """2^(mbits - b) from the binade field: the format's values in binade b become integers."""
    return (((element.mbits + 254) << 23) - field).view(torch.float32)


def _round_magnitude(y: torch.Tensor, rounding: str, bits: torch.Tensor | None) -> torch.Tensor:
    """``round_to_integer(y, rounding, RandomBits)`` for finite float32 ``y >= 0``, given the SR bits of ``y``."""
    if rounding != "sr":
        return round_to_integer(y, rounding)
    floor = torch.floor(y)
    return floor.add_(sr_round_up(y - floor, bits).to(torch.float32))


def _sr_bits(rounding: str, x: torch.Tensor, rng: RandomBits | torch.Generator | None) -> torch.Tensor | None:
    bits = RandomBits.of(rng, x.device, rounding)
    return None if bits is None else bits.bits(x.shape)


def round_to_format(
    element: ElementFormat, x: torch.Tensor, rounding: str, rng: RandomBits | torch.Generator | None
) -> torch.Tensor:
    """``element.decode(element.encode(x, saturate=True))`` for finite float32 ``x``, as float32."""
    return _round_to_format(element, x, rounding, _sr_bits(rounding, x, rng))


class _Constants(NamedTuple):
    """The numbers of a format that rounding uses, as plain Python values (what a compiled graph
    bakes in; tracing the format's properties would not give constants)."""

    integer: bool
    qmin: int
    qmax: int
    max: float
    emin: int
    mbits: int
    e5m2_cast: str  # torch's float8 dtype name where its cast gives E5M2's values, else ""
    spacing: Callable[[torch.Tensor], torch.Tensor] | None = None  # a plugin format's grid_spacing


@functools.cache
def _constants(element: ElementFormat) -> _Constants:
    if isinstance(element, IntFormat):
        return _Constants(True, element.qmin, element.qmax, float(element.qmax), 0, 0, "")
    if element.grid_spacing is not None:
        return _Constants(False, 0, 0, float(element.max), 0, 0, "", element.grid_spacing)
    e5m2 = element.native if element.native and element.ebits == 5 else ""
    return _Constants(False, 0, 0, float(element.max), element.emin, element.mbits, e5m2)


def pow2_floor(a: torch.Tensor) -> torch.Tensor:
    """2^floor(log2 a) for finite float32 ``a > 0`` in the normal range, in float arithmetic only:
    Veltkamp's split with 2^23 + 1 rounds ``a`` to one significant bit, 2^e or 2^(e+1) for
    ``a`` in [2^e, 2^(e+1)), and halving the second gives 2^e. Float32 subnormals and 0 give at
    most 2^-126. (The tests check every float32 significand in several binades against the
    exponent bits.)"""
    split = a * 8388609.0
    one_bit = split + (a - split)
    return torch.where(one_bit > a, one_bit * 0.5, one_bit)


def _round_to_format(element: ElementFormat, x: torch.Tensor, rounding: str, bits: torch.Tensor | None) -> torch.Tensor:
    return _round(_constants(element), x, rounding, bits)


def _round(c: _Constants, x: torch.Tensor, rounding: str, bits: torch.Tensor | None) -> torch.Tensor:
    if c.integer:
        if rounding == "rne":
            rounded = torch.round(x)  # round half even is symmetric: sign(x) * round(|x|)
        else:  # sr / ta round the magnitude, as the general path
            magnitude = torch.clamp(x.abs(), max=float(-c.qmin))
            rounded = torch.copysign(_round_magnitude(magnitude, rounding, bits), x)
        rounded = rounded.clamp_(c.qmin, c.qmax)
        if torch.compiler.is_compiling():  # inductor drops "+ 0.0" as an identity
            return torch.where(rounded == 0, 0.0, rounded)
        return rounded.add_(0.0)
    if c.e5m2_cast and rounding == "rne" and not torch.compiler.is_compiling():
        # E5M2: torch's cast, then its codes shifted into float16 (no Inf/NaN codes from finite x);
        # a compiled kernel takes the arithmetic below, the same values
        codes = torch.clamp(x, -c.max, c.max).to(getattr(torch, c.e5m2_cast)).view(torch.uint8)
        return (codes.to(torch.int16) << 8).view(torch.float16).float()
    if c.spacing is not None:  # a plugin format: round the magnitude to its spacing there, one zero (+0)
        magnitude = torch.clamp(x.abs(), max=c.max)
        spacing = c.spacing(magnitude)
        value = _round_magnitude(magnitude / spacing, rounding, bits).mul_(spacing)  # exact: powers of two
        return torch.where(value == 0, 0.0, torch.copysign(value, x))
    y = torch.clamp(x, -c.max, c.max)  # saturate first, so rounding never passes max
    if torch.compiler.is_compiling():
        # inductor's C++ turns each bitcast into a scalar loop (3x the whole kernel's time): the
        # binade 2^b from float arithmetic instead, the same powers of two (tested exhaustively)
        binade = torch.clamp(pow2_floor(y.abs()), min=2.0**c.emin)
        scaled = y * (2.0**c.mbits / binade)  # exact: powers of two
        ulp = binade * 2.0**-c.mbits
    else:
        # binade field (b + 127) << 23, b = max(float32 exponent of |y|, emin)
        field = (y.view(torch.int32) & _EXPONENT_FIELD).clamp_(min=(c.emin + 127) << 23)
        scaled = y.mul_((((c.mbits + 254) << 23) - field).view(torch.float32))  # exact: times 2^(mbits - b)
        ulp = field.sub_(c.mbits << 23).view(torch.float32)  # 2^(b - mbits)
    if rounding == "rne":
        return scaled.round_().mul_(ulp)  # keeps the sign of zero, as the code's sign bit does
    integer = _round_magnitude(scaled.abs_(), rounding, bits)
    return torch.copysign(integer.mul_(ulp), x)


def encode(
    element: ElementFormat, x: torch.Tensor, rounding: str, rng: RandomBits | torch.Generator | None
) -> torch.Tensor:
    """``element.encode(x, saturate=True)`` for finite float32 ``x``: uint8 (int8) codes."""
    if isinstance(element, IntFormat):
        return round_to_format(element, x, rounding, rng).to(torch.int8)
    if element.grid_spacing is not None:  # a plugin's arithmetic covers values; its codes are its encode's
        return element.encode(x, rounding=rounding, saturate=True, generator=rng)
    bits = _sr_bits(rounding, x, rng)
    if rounding in ("rne", "sr") and x.dtype == torch.float32:  # the same arithmetic in one C pass
        codes = _native.encode_float(x, element.bits, element.mbits, element.emin, float(element.max), bits)
        if codes is not None:
            return codes
    if element.native and rounding == "rne":  # torch's float8 cast: same codes, faster than the ops below
        return element.encode(x, rounding=rounding, saturate=True)
    magnitude = torch.clamp(x.abs(), max=element.max)
    field = _binade_field(magnitude, element)
    integer = _round_magnitude(magnitude.mul_(_inverse_ulp(field, element)), rounding, bits)
    # code = ((b - emin) << mbits) + integer; (field >> (23 - mbits)) is (b + 127) << mbits
    code = (field >> (23 - element.mbits)).add_(integer.to(torch.int32)).sub_((element.emin + 127) << element.mbits)
    sign = (x.view(torch.int32) >> (32 - element.bits)) & (1 << (element.bits - 1))  # bit 31 -> bit (bits - 1)
    return code.bitwise_or_(sign).to(torch.uint8)


def decode(element: ElementFormat, codes: torch.Tensor) -> torch.Tensor | None:
    """``element.decode(codes)`` as float32, or None where codes hold Inf/NaN (general path)."""
    if isinstance(element, IntFormat):
        return codes.float()
    if element.grid_spacing is not None:
        return element.decode(codes)
    c = _code_constants(element)
    if codes.dtype == torch.uint8:  # the fields' arithmetic in one C pass (Inf/NaN codes: the reference's values)
        values = _native.decode_float(codes, c.bits, c.mbits, c.bias, c.first_special, _code_table(element))
        if values is not None:
            return values
    if element.native == "float8_e5m2" and codes.dtype == torch.uint8:
        # torch's E5M2 cast is the format's decode (Inf, NaN too) and one fast pass (through float16);
        # its E4M3 cast is slower than the arithmetic below
        return codes.view(torch.float8_e5m2).float()
    half_codes = codes.to(torch.int16)
    magnitude = half_codes & ((1 << (c.bits - 1)) - 1)
    if c.first_special and int(magnitude.max()) >= c.first_special:
        return None
    # eagerly, in 2-byte integers (faster here than ``_finite_values``' int32): the code's exponent and
    # mantissa fields moved into float16's are the value times 2^(bias - 15)
    if c.ebits == 5:  # sign and fields already sit where float16 has them (E5M2: its top byte)
        half = half_codes << (10 - c.mbits)
    else:
        half = (magnitude << (10 - c.mbits)).bitwise_or_((half_codes >> (c.bits - 1)) << 15)
    values = half.view(torch.float16).float()
    return values if c.bias == 15 else values.mul_(2.0 ** (15 - c.bias))


@functools.cache
def _code_table(element: FloatFormat) -> torch.Tensor:
    """The float32 value of every uint8 code (code mod 2^bits: the format's codes, Inf and NaN included),
    by the format's own decode."""
    return element.decode(torch.arange(256, dtype=torch.int64).remainder(2**element.bits).to(torch.uint8)).float()


@functools.cache
def block_codec(element: ElementFormat) -> _native.Codec | None:
    """The format as the C block kernels code it (``_native.quantize_blocks``: ``encode``'s codes, one byte
    each, and every code byte's ``decode`` value), or None where they do not cover it (a plugin's
    arithmetic rounding, over 8 bits, a format the arithmetic path does not take)."""
    if type(element) is IntFormat and element.bits <= 8:
        table = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.int8).float()
        return _native.Codec(True, element.bits, 0, 0, 0, 0, 0.0, element.qmin, element.qmax, table)
    if type(element) is not FloatFormat or element.bits > 8 or not supported(element, saturate=True):
        return None
    c = _code_constants(element)
    values = (element.bits, c.mbits, c.emin, c.bias, c.first_special, float(element.max), 0, 0, _code_table(element))
    return _native.Codec(False, *values)


_MX_RULES = {"floor": 0, "ceil": 1, "even": 2, "nearest": 3, "rceil": 4}


def _scale_kind(
    element: ElementFormat,
    scale_format: ElementFormat,
    rule: str,
    pow2: bool,
    target: float,
    global_encode: torch.Tensor | None,
) -> tuple[int, dict] | None:
    """The C kind of a block scale (0 E8M0, 1 a signed minifloat, with NVFP4's ``global_encode``, 2 FP32) and
    its options, or None where the C kernels do not make it or the global encode scale is not finite and
    positive (e.g. from an amax override of -0)."""
    if type(element) not in (FloatFormat, IntFormat):
        return None
    if global_encode is not None and not 0.0 < float(global_encode) < math.inf:
        return None
    if scale_format.name == "e8m0":
        if rule not in _MX_RULES or (rule == "even" and type(element) is not FloatFormat):
            return None
        mbits = element.mbits if type(element) is FloatFormat else 0
        return 0, {"rule": _MX_RULES[rule], "emax": element.emax, "mbits": mbits, "elem_max": float(element.max)}
    if scale_format.name == "fp32":
        return 2, {"pow2": pow2, "target": float(target or element.max)}
    codec = block_codec(scale_format)
    if codec is None or codec.integer:
        return None
    return 1, {"elem_max": float(element.max), "scale": codec, "global_encode": global_encode}


def block_scales(
    amax: torch.Tensor,
    element: ElementFormat,
    scale_format: ElementFormat,
    rule: str,
    pow2: bool,
    target: float,
    global_encode: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
    """(decode scales, encode factors, scale codes or None for FP32) of finite float32 block ``amax`` as
    ``quantize._scaling_from_amax`` makes them (E8M0 by ``rule``; a signed minifloat scale format, with
    NVFP4's ``global_encode``; FP32 with ``pow2`` and ``target``), in one C pass; None where it does not run."""
    kind = _scale_kind(element, scale_format, rule, pow2, target, global_encode) if amax.device.type == "cpu" else None
    return None if kind is None else _native.block_scales(amax, kind[0], **kind[1])


def quantize_fused(
    element: ElementFormat,
    scale_format: ElementFormat,
    x: torch.Tensor,
    cols: int,
    rounding: str,
    rng: RandomBits | None,
    *,
    rule: str,
    pow2: bool,
    target: float,
    prescale: float,
    global_encode: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
    """The codes (``element``'s code dtype, x's shape), decode scales (flat) and scale codes (flat; None for
    FP32 scales) of ``x`` in 1-D blocks of ``cols`` without a zero point (NVFP4's ``global_encode`` with a
    minifloat scale format), each block's amax, scales and codes in one C pass over x
    (``_native.quantize_fused``); None where it does not run or a block is not finite."""
    codec = block_codec(element)
    kind = _scale_kind(element, scale_format, rule, pow2, target, global_encode)
    if codec is None or kind is None or rounding not in ("rne", "sr") or (rounding == "sr") != (rng is not None):
        return None
    if global_encode is not None and kind[0] != 1:
        return None
    sr = None if rng is None else (rng.offset, rng.keys)
    out = _native.quantize_fused(x, cols, kind[0], codec, sr, prescale=prescale, **kind[1])
    if out is None:
        return None
    codes, decode, _, scale_codes = out
    return codes.view(element.code_dtype), decode, scale_codes


def quantize_blocks(
    element: ElementFormat,
    rows: torch.Tensor,
    cols: int,
    factor: torch.Tensor,
    zero_point: torch.Tensor | None,
    rounding: str,
    rng: RandomBits | None,
    *,
    codes: bool = True,
    unscale: tuple[torch.Tensor, torch.Tensor | None, float] | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None] | None:
    """``encode`` of finite block rows (B, r, C) times their blocks' encode factors (plus zero points), and
    with ``unscale`` (decode scales, global decode scale, prescale) the values dequantizing gives, in one C
    pass (``_native.quantize_blocks``): (codes in ``element``'s code dtype or None, float32 values or None);
    None where it does not run (RNE and SR only)."""
    codec = block_codec(element)
    if codec is None or rounding not in ("rne", "sr") or (rounding == "sr") != (rng is not None):
        return None
    sr = None if rng is None else (rng.offset, rng.keys)
    out = _native.quantize_blocks(rows, cols, factor, zero_point, codec, sr, codes=codes, unscale=unscale)
    if out is None:
        return None
    code_bytes, values = out
    return None if code_bytes is None else code_bytes.view(element.code_dtype), values


def _magnitude(c: _Codes, codes: torch.Tensor) -> torch.Tensor:
    return codes.to(torch.int32) & ((1 << (c.bits - 1)) - 1)


def _finite_values(c: _Codes, codes: torch.Tensor) -> torch.Tensor:
    """``decode``'s values of a float format's codes that hold no Inf/NaN, for a compiled graph (inductor
    does not vectorize the float16 view ``decode`` takes eagerly). The magnitude's exponent and mantissa
    fields moved to the top of float32's (sign in bit 31) are the value times 2^(bias - 127), subnormal
    codes too (a float32 subnormal then: m 2^(-126 - mbits)); times 2^(127 - bias), exact, gives it."""
    codes = codes.to(torch.int32)
    bits = (_magnitude(c, codes) << (23 - c.mbits)).bitwise_or_((codes >> (c.bits - 1)) << 31)
    return bits.view(torch.float32).mul_(2.0 ** (127 - c.bias))


def e8m0_scales(codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(decode scales 2^(c - 127), encode factors 2^(127 - c)) of E8M0 codes without NaN (c < 255),
    as float32 built from bits; 2^-127 (c = 0 or 254) is the subnormal 1 << 22 (E8M0's decode
    and ``pow2_from_exponent`` give the same bits)."""
    c = codes.to(torch.int32)
    decode = (c << 23).clamp_(min=1 << 22).view(torch.float32)
    factor = ((254 - c) << 23).clamp_(min=1 << 22).view(torch.float32)
    return decode, factor


def _per_block(t: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """A per-block tensor (n, nb) broadcast over the elements of blocks (n, r, nb, c) or (n, r, nb)."""
    return t[:, None, :, None] if blocks.dim() == 4 else t[:, None, :]


def unscale(
    values: torch.Tensor,
    scales: torch.Tensor,
    zero_points: torch.Tensor | None,
    global_scale: torch.Tensor | None,
    sr_prescale: float | torch.Tensor,
) -> torch.Tensor:
    """Decoded elements (n, r, nb, c) -> values: (v - zero point) * scale * global / prescale,
    each scale (n, nb) or (1, 1). dequantize and fake_quantize share it, so they round alike.
    Elements (n, r, nb) are blocks of r x 1 (a column layout, see ``fake_quantize_whole``).
    A compiled kernel gets the prescale as a 0-d float32 input: a graph's constant divisor may
    become a multiply by its reciprocal, an input's stays a division, as ``true_divide``'s."""
    if zero_points is not None:
        values = values - _per_block(zero_points, values)
    values = values * _per_block(scales, values)
    if global_scale is not None:
        values = values * global_scale
    if isinstance(sr_prescale, torch.Tensor):
        values = values / sr_prescale
    elif sr_prescale != 1.0:
        values = true_divide(values, sr_prescale)
    return values


def _scaled(blocks: torch.Tensor, factor: torch.Tensor, zero_point: torch.Tensor | None) -> torch.Tensor:
    """Elements (n, r, nb, c) times their blocks' encode factors (n, nb), plus their zero points, float32."""
    scaled = blocks.float() * _per_block(factor, blocks)
    return scaled if zero_point is None else scaled + _per_block(zero_point, blocks)


def fake_quantize_blocks(
    blocks: torch.Tensor,
    factor: torch.Tensor,
    decode: torch.Tensor,
    zero_point: torch.Tensor | None,
    global_scale: torch.Tensor | None,
    bits: torch.Tensor | None,
    *,
    element: ElementFormat,
    rounding: str,
    sr_prescale: float | torch.Tensor,
    out_dtype: torch.dtype,
    container: torch.dtype | None = None,
) -> torch.Tensor:
    """Elements (n, r, nb, c) of any float dtype, finite -> their fake-quantized values in ``out_dtype``:
    times the block's encode factor (n, nb) (the SR prescale folded in), plus its zero point,
    rounded to the format, unscaled. ``bits``: the SR bits of the elements (int32, their shape).
    ``container``: the rounded element values instead, in that 8-bit dtype (``container``), not unscaled."""
    scaled = _scaled(blocks, factor, zero_point)
    values = _round(element if isinstance(element, _Constants) else _constants(element), scaled, rounding, bits)
    if container is not None:
        return values.to(container)
    return unscale(values, decode, zero_point, global_scale, sr_prescale).to(out_dtype)


@functools.cache
def container(element: ElementFormat) -> torch.dtype | None:
    """The 8-bit dtype that holds every value of ``element`` exactly (int8 for integers up to 8 bits,
    float8 E4M3 for FP8 E4M3 and every FP4/FP6 format inside its range, float8 E5M2 for E5M2, torch's
    E8M0 for the MX scale format), or None:
    checked over the format's every code, so a fake-quantized tensor's element values can be kept in
    one byte each and unscaled later to the same bits."""
    if isinstance(element, IntFormat):
        return torch.int8 if element.qmin >= -128 and element.qmax <= 127 else None
    if element.bits > 8:
        return None
    codes = torch.arange(1 << element.bits, dtype=torch.int32).to(element.code_dtype)
    values = element.decode(codes).float()
    values = values[torch.isfinite(values)]
    for dtype in (torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e8m0fnu):
        back = values.to(dtype).float()
        if torch.equal(back, values) and torch.equal(torch.signbit(back), torch.signbit(values)):
            return dtype
    return None


def _unscale_whole(
    values: torch.Tensor,
    decode: torch.Tensor,
    zero_point: torch.Tensor | None,
    global_scale: torch.Tensor | None,
    prescale: torch.Tensor | None,
    *,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """Kept element values (``fake_quantize_blocks(container=...)``) -> the values ``fake_quantize_blocks``
    gives: the same ``unscale`` on the same float32 numbers."""
    sr_prescale = 1.0 if prescale is None else prescale
    return unscale(values.float(), decode.float(), zero_point, global_scale, sr_prescale).to(out_dtype)


def compiled_unscale(
    values: torch.Tensor,
    decode: torch.Tensor,
    zero_point: torch.Tensor | None,
    global_scale: torch.Tensor | None,
    sr_prescale: float,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """``_unscale_whole`` in one compiled kernel on CPU (eagerly where it cannot be built: the same numbers).
    The prescale enters as a 0-d input, as in ``compiled_fake_quantize``."""
    prescale = None if sr_prescale == 1.0 else torch.tensor(sr_prescale, dtype=torch.float32, device=values.device)
    tensors = (values, decode, zero_point, global_scale, prescale)
    out = None
    if values.device.type == "cpu":
        dims = ((0, 2), (0, 1), (0, 1), (), ())
        out = run_compiled(_unscale_whole, tensors, dims, out_dtype=out_dtype)
    return _unscale_whole(*tensors, out_dtype=out_dtype) if out is None else out


def _fake_quantize_whole(
    blocks: torch.Tensor,
    factor: torch.Tensor,
    decode: torch.Tensor,
    zero_point: torch.Tensor | None,
    global_scale: torch.Tensor | None,
    keys: torch.Tensor | None,
    column_index: torch.Tensor | None = None,
    prescale: torch.Tensor | None = None,
    **options,
) -> torch.Tensor:
    """``fake_quantize_blocks`` of a whole tensor, its SR bits hashed from ``keys`` in the same kernel.
    Element i's bits come from index i (row-major), or for r x 1 blocks (n, r, C) of a tensor t
    (N = n r, C) from ``column_index[col] + row``: with ``column_index = arange(C) * N`` that is
    the index of the element in tᵀ, whose 1 x r blocks these are. (An input rather than an
    arange in the graph: inductor vectorizes a load, not a strided arange.)"""
    if prescale is not None:
        options["sr_prescale"] = prescale
    bits = _whole_bits(blocks, keys, column_index)
    return fake_quantize_blocks(blocks, factor, decode, zero_point, global_scale, bits, **options)


def _whole_bits(blocks: torch.Tensor, keys: torch.Tensor | None, column_index: torch.Tensor | None = None):
    """The SR bits of a whole tensor's blocks hashed in the graph (see ``_fake_quantize_whole``), or None."""
    if keys is None:
        return None
    if column_index is None:
        index = torch.arange(blocks.numel(), dtype=torch.int64, device=blocks.device).to(torch.int32)
        return hash_bits(index.view(blocks.shape), keys)
    n, r, cols = blocks.shape
    row = torch.arange(n * r, dtype=torch.int64, device=blocks.device).to(torch.int32).view(n, r, 1)
    return hash_bits(row + column_index.view(1, 1, cols), keys)


class _Codes(NamedTuple):
    """What coding and decoding read of a format, as constants for a compiled graph."""

    integer: bool
    bits: int
    emin: int
    mbits: int
    ebits: int
    bias: int
    first_special: int  # the lowest magnitude code of Inf or NaN; 0: none


@functools.cache
def _code_constants(element: ElementFormat) -> _Codes:
    if isinstance(element, IntFormat):
        return _Codes(True, element.bits, 0, 0, 0, 0, 0)
    special = {"fn": element.nan_code, "ieee": element.inf_code}.get(element.special, 0)
    return _Codes(False, element.bits, element.emin, element.mbits, element.ebits, element.bias, special)


def _codes_of_values(c: _Codes, values: torch.Tensor) -> torch.Tensor:
    """The codes of float32 values on a format's grid (finite, within its range: what ``_round`` gives),
    by the fields, as ``encode`` computes them: a value on the grid is its own rounding, so these are
    ``encode``'s codes of the unrounded elements (int8 for integers, uint8 with the sign in the top bit)."""
    if c.integer:
        return values.to(torch.int8)
    magnitude = values.abs()
    field = _binade_field(magnitude, c)
    integer = magnitude * _inverse_ulp(field, c)  # exact: an integer below 2^(mbits + 1)
    code = (field >> (23 - c.mbits)) + integer.to(torch.int32) - ((c.emin + 127) << c.mbits)
    sign = (values.view(torch.int32) >> (32 - c.bits)) & (1 << (c.bits - 1))  # bit 31 -> bit (bits - 1)
    return (code | sign).to(torch.uint8)


def _encode_whole(
    blocks: torch.Tensor,
    factor: torch.Tensor,
    zero_point: torch.Tensor | None,
    keys: torch.Tensor | None,
    *,
    element: _Constants,
    codes: _Codes,
    rounding: str,
) -> torch.Tensor:
    """Codes of blocks (n, r, nb, c): times their encode factors (n, nb) (the SR prescale folded in), plus
    their zero points, rounded by ``_round`` (``encode``'s values) and coded, SR bits hashed in the graph."""
    scaled = _scaled(blocks, factor, zero_point)
    return _codes_of_values(codes, _round(element, scaled, rounding, _whole_bits(blocks, keys)))


def compiled_encode(
    blocks: torch.Tensor,
    factor: torch.Tensor,
    zero_point: torch.Tensor | None,
    rng: RandomBits | None,
    *,
    element: ElementFormat,
    rounding: str,
) -> torch.Tensor | None:
    """``encode`` of every element of finite blocks (n, r, nb, c) scaled by their factors, in one compiled
    kernel: the same codes (tests/framework/numerics/test_numerics_compiled.py). None where it does not
    apply (a plugin format, whose codes are its own encode's; a chunk of a larger SR stream) or cannot be built."""
    if element.grid_spacing is not None or (rng is not None and rng.offset):
        return None
    keys = None if rng is None else rng.keys
    bound = {"element": _constants(element), "codes": _code_constants(element), "rounding": rounding}
    return run_compiled(_encode_whole, (blocks, factor, zero_point, keys), ((0, 2), (0, 1), (0, 1), ()), **bound)


def _decode_whole(
    codes: torch.Tensor,
    decode: torch.Tensor,
    zero_point: torch.Tensor | None,
    global_scale: torch.Tensor | None,
    prescale: torch.Tensor | None,
    *,
    c: _Codes,
    out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Codes (n, r, nb, c) -> (values, whether a code holds Inf/NaN): decoded by ``decode``'s arithmetic
    (integers as themselves) and unscaled by ``unscale``, as ``dequantize``; where a code holds Inf or NaN
    the caller decodes by the format's own ``decode`` instead."""
    values = codes.float() if c.integer else _finite_values(c, codes)
    special = (_magnitude(c, codes) >= c.first_special).any() if c.first_special else None
    return _unscale_whole(values, decode, zero_point, global_scale, prescale, out_dtype=out_dtype), special


def compiled_decode(
    codes: torch.Tensor,
    decode: torch.Tensor,
    zero_point: torch.Tensor | None,
    global_scale: torch.Tensor | None,
    *,
    element: ElementFormat,
    sr_prescale: float,
    out_dtype: torch.dtype,
) -> torch.Tensor | None:
    """``dequantize``'s decode and ``unscale`` of codes (n, r, nb, c) with their blocks' decode scales (n, nb)
    in one compiled kernel: the same values. None where a code holds Inf or NaN, for a format outside
    ``decode``'s arithmetic (a plugin's), or where it cannot be built."""
    if element.grid_spacing is not None:
        return None
    c = _code_constants(element)
    prescale = None if sr_prescale == 1.0 else torch.tensor(sr_prescale, dtype=torch.float32, device=codes.device)
    tensors = (codes, decode, zero_point, global_scale, prescale)
    out = run_compiled(_decode_whole, tensors, ((0, 2), (0, 1), (0, 1), (), ()), c=c, out_dtype=out_dtype)
    if out is None or (out[1] is not None and bool(out[1])):
        return None
    return out[0]


def _block_amax(blocks: torch.Tensor) -> torch.Tensor:
    """max |x| of every block of (n, r, nb, c) (or r x 1 blocks (n, r, nb)) -> (n, nb) float32 (NaN propagates)."""
    return blocks.float().abs().amax(dim=(1, 3) if blocks.dim() == 4 else 1)


def _compiled(fn, key: str | None, **bound):
    """``torch.compile(fn)`` with the ``bound`` keywords, under a code object of its own: dynamo keeps
    one cache per code object and checks its entries' guards in turn, so variants sharing ``fn``'s
    would slow every call down (and hit the recompile limit). ``key``: the variant's (``variant_key``)."""
    namespace = {"_fn": functools.partial(fn, **bound)}
    # a file name of its own too: dynamo's automatic dynamic shapes keep what they saw per (file, line, name),
    # so variants sharing one made each other's static dims (a block's shape) symbolic
    name = f"<lowbit {fn.__qualname__} {key or id(namespace)}>"
    code = compile("def compiled_variant(*args):\n    return _fn(*args)\n", name, "exec")
    exec(code, namespace)  # noqa: S102 - a fresh code object
    return torch.compile(namespace["compiled_variant"], fullgraph=True)


@functools.cache
def _variant(fn, **bound) -> _graphs.Variant:
    """``fn`` with its ``bound`` keywords compiled (``_compiled``), its graphs compiled ahead and kept on disk
    (lowbit.numerics._graphs); the variant's key computed once for both."""
    key = _graphs.variant_key(fn, bound)
    compiled = _compiled(fn, key, **bound)
    folder = None if key is None else _graphs.graph_folder() / key
    return _graphs.Variant(compiled, compiled.__wrapped__.__globals__, folder, _RECOMPILE_LIMIT)


_RECOMPILE_LIMIT = 64  # graphs per variant: size-1 dims, dtypes and strides each specialize one
_compile_failed: list[str] = []  # the first failure's message: compiling is off for the process


def run_compiled(fn, tensors: tuple[torch.Tensor | None, ...], dynamic: tuple[tuple[int, ...], ...], **bound):
    """``fn(*tensors, **bound)`` as one compiled CPU kernel (inductor's C++ backend), or None
    when torch.compile cannot build it here (no C++ compiler: a warning once, then the callers
    run their eager code, the same numbers). ``dynamic``: per tensor, the dims that vary from
    call to call (numbers of blocks: symbolic from the first call); the others (a block's own
    shape) stay constants, so the kernel's inner loop is one whole block. Each graph is compiled
    ahead and kept on disk with its guards (lowbit.numerics._graphs): a later process calls it
    without tracing it again."""
    if _compile_failed:
        return None
    # one context for every call, so its guards see one: no autograd (a weight's requires_grad, the
    # forward's grad mode against the backward's) and autocast off (on in the forward, off in the
    # backward); each difference would compile the same kernel again
    tensors = tuple(None if t is None else t.detach() for t in tensors)
    device = next(t.device.type for t in tensors if t is not None)
    config = torch._dynamo.config
    limit = config.recompile_limit  # set and restored by hand: config.patch costs a class per call
    config.recompile_limit = max(limit, _RECOMPILE_LIMIT)
    try:
        with torch.no_grad(), torch.autocast(device, enabled=False):
            return _variant(fn, **bound)(tensors, dynamic)
    except (_graphs.GraphLimit, torch._dynamo.exc.FailOnRecompileLimitHit):
        return None  # this variant has seen too many shape/dtype/stride mixes: eager from here on
    except Exception as err:  # noqa: BLE001 - any compile failure falls back to the same numbers, eagerly
        _compile_failed.append(f"{type(err).__name__}: {err}".splitlines()[0])
        warnings.warn(
            f"lowbit: torch.compile could not build a CPU quantization kernel ({_compile_failed[0]}); "
            "quantizing eagerly (same numbers, slower)",
            stacklevel=3,
        )
        return None
    finally:
        config.recompile_limit = limit


def compiled_fake_quantize(
    blocks: torch.Tensor,
    factor: torch.Tensor,
    decode: torch.Tensor,
    zero_point: torch.Tensor | None,
    global_scale: torch.Tensor | None,
    rng: RandomBits | None,
    *,
    element: ElementFormat,
    rounding: str,
    sr_prescale: float,
    out_dtype: torch.dtype,
    columns: bool = False,
    container: torch.dtype | None = None,
) -> torch.Tensor | None:
    """``fake_quantize_blocks`` of a whole tensor (``columns``: r x 1 blocks (n, r, C) of t standing
    for the 1 x r blocks of tᵀ, SR bits in tᵀ's order) in one compiled kernel: one read, one write,
    instead of ~15 passes over chunks; the same bits (tests/framework/numerics/test_numerics_compiled.py).
    An SR prescale divides by a 0-d input (see ``unscale``). None where it does not apply (a chunk
    of a larger SR stream) or cannot be built."""
    inputs = _element_inputs(blocks, rng, sr_prescale, columns)
    if inputs is None:
        return None
    tensors = (blocks, factor, decode, zero_point, global_scale, *inputs)
    dynamic = ((0, 2), (0, 1), (0, 1), (0, 1), (), (), (0,), ())  # blocks (n, r, nb[, c]): n and nb vary
    return run_compiled(
        _fake_quantize_whole, tensors, dynamic, **_element_options(element, rounding, out_dtype, container)
    )


def _element_inputs(
    blocks: torch.Tensor, rng: RandomBits | None, sr_prescale: float, columns: bool
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None] | None:
    """The element step's tensor inputs besides blocks and scales: (SR keys, column index, prescale),
    or None where the step does not apply (a chunk of a larger SR stream)."""
    if rng is not None and rng.offset:
        return None
    keys = None if rng is None else rng.keys
    column_index = None
    if columns and keys is not None:  # blocks (n, r, C) of t stand for tᵀ's 1 x r blocks
        n, r, cols = blocks.shape
        column_index = (torch.arange(cols, dtype=torch.int64, device=blocks.device) * (n * r)).to(torch.int32)
    prescale = None if sr_prescale == 1.0 else torch.tensor(sr_prescale, dtype=torch.float32, device=blocks.device)
    return keys, column_index, prescale


def _element_options(
    element: ElementFormat, rounding: str, out_dtype: torch.dtype, container: torch.dtype | None
) -> dict[str, object]:
    """The element step's bound keywords (what its compiled variant is specialized on)."""
    options = {"element": _constants(element), "rounding": rounding, "sr_prescale": 1.0, "out_dtype": out_dtype}
    if container is not None:  # the rounded element values, kept (see ``container``); no output dtype to
        options.update(container=container, out_dtype=torch.float32)  # compile a variant for
    return options


def compiled_block_amax(blocks: torch.Tensor) -> torch.Tensor | None:
    """max |x| of every block (n, r, nb, c) or (n, r, nb) -> (n, nb) float32 in one compiled kernel
    (the eager path's max-pool gives the same maxima), or None."""
    return run_compiled(_block_amax, (blocks,), ((0, 2),))


def _minifloat_block_scales(
    blocks: torch.Tensor, emax: torch.Tensor, numerator: torch.Tensor, *, scale: _Constants, global_scale: bool
):
    """Block amax -> minifloat block scales (E4M3, UE5M3, ...) by the formulas ``blocks.global_encode_scale``
    and ``blocks.lowp_block_scales`` use (the same functions; the rounding by ``_round``, which gives the
    saturating encode's values, unsigned formats too: every target is >= 0). ``emax``: the element
    format's max, ``numerator``: S.max * E.max (float32 0-d inputs, so no constant is folded
    differently). -> (decode, factor, global encode, no codes, every amax finite)."""
    amax = _block_amax(blocks)
    finite = torch.isfinite(amax).all()
    g = _global_encode(amax.amax(), numerator) if global_scale else None
    scales = _round(scale, _block_scale_target(amax, emax, g), "rne", None)
    return scales, _element_encode_factor(scales, g), g, None, finite


class _MXConstants(NamedTuple):
    """What ``mx_scale_codes`` reads of the element format, as constants for a compiled graph."""

    max: float
    mbits: int
    emax: int


def _e8m0_block_scales(blocks: torch.Tensor, *, element: _MXConstants, rule: str):
    """Block amax -> E8M0 codes, decode scales and encode factors by ``blocks.mx_scale_codes`` and
    ``e8m0_scales`` (the functions the eager path calls; integer arithmetic on the float32 bits)
    -> (decode, factor, no global scale, codes, every amax finite)."""
    amax = _block_amax(blocks)
    codes = mx_scale_codes(amax, element, rule)
    decode, factor = e8m0_scales(codes)
    return decode, factor, None, codes, torch.isfinite(amax).all()


def _fp32_block_scales(blocks: torch.Tensor, target: torch.Tensor, *, pow2: bool):
    """Block amax -> FP32 scales by ``blocks.fp32_scales`` (``current_scale``, the function the eager path
    calls, with ``target``, the element max or the spec's amax target, as a 0-d input) -> (decode, factor,
    no global scale, the decode scales' bits as their codes, every amax finite)."""
    amax = _block_amax(blocks)
    factor = current_scale(amax, target, pow2=pow2)
    decode = torch.reciprocal(factor)
    return decode, factor, None, decode.view(torch.int32), torch.isfinite(amax).all()


@functools.cache
def _scale_inputs(element: ElementFormat, scale_format: ElementFormat) -> tuple[torch.Tensor, torch.Tensor]:
    emax = torch.tensor(element.max, dtype=torch.float32)
    return emax, torch.tensor(scale_format.max, dtype=torch.float32) * emax


def _scale_graph(
    element: ElementFormat,
    scale_format: ElementFormat,
    global_scale: bool,
    rule: str,
    device: torch.device,
    pow2: bool = False,
    target: float = 0.0,
) -> tuple[str, object, torch.Tensor | None, torch.Tensor | None] | None:
    """Which compiled scale graph serves these scales: (kind, its constants, its 0-d inputs or None), or
    None: E8M0 (MX, scale ``rule`` other than rceil, whose division stays eager), FP32 (current scaling
    from each block's amax to the element max or ``target``, ``pow2``: rounded down to a power of two;
    input: that max) or a minifloat (E4M3 as NVFP4's, UE5M3, ...: up to 5 exponent and 10 mantissa bits,
    with or without a global scale; inputs: E.max and S.max * E.max)."""
    if device.type != "cpu":
        return None
    if scale_format.name == "e8m0" and not global_scale and rule != "rceil" and type(element) is FloatFormat:
        return "e8m0", _MXConstants(float(element.max), element.mbits, element.emax), None, None
    if scale_format.name == "fp32" and not global_scale:
        return "fp32", pow2, _fp32_target(target or float(element.max)), None
    if type(scale_format) is not FloatFormat or scale_format.ebits > 5 or scale_format.mbits > 10:
        return None
    return ("minifloat", _constants(scale_format), *_scale_inputs(element, scale_format))


@functools.cache
def _fp32_target(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float32)


def _block_scales(blocks, emax, numerator, *, kind: str, constants, global_scale: bool, rule: str):
    """The scale graph ``_scale_graph`` chose -> (decode, factor, global encode or None, E8M0 codes or None,
    every amax finite)."""
    if kind == "e8m0":
        return _e8m0_block_scales(blocks, element=constants, rule=rule)
    if kind == "fp32":
        return _fp32_block_scales(blocks, emax, pow2=constants)
    return _minifloat_block_scales(blocks, emax, numerator, scale=constants, global_scale=global_scale)


def compiled_block_scales(
    blocks: torch.Tensor,
    element: ElementFormat,
    scale_format: ElementFormat,
    global_scale: bool,
    rule: str = "floor",
    pow2: bool = False,
    target: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None] | None:
    """E8M0, FP32 or minifloat block scales (see ``_scale_graph``) of blocks (n, r, nb, c) or (n, r, nb)
    straight from the elements, in one compiled graph: (decode scales, encode factors, global encode scale
    or None, E8M0 or FP32 codes or None), each block's (n, nb), or None when no scale graph serves them, an
    amax is not finite, or it cannot be built (callers then take the eager path, the same numbers)."""
    graph = _scale_graph(element, scale_format, global_scale, rule, blocks.device, pow2, target)
    if graph is None:
        return None
    kind, constants, emax, numerator = graph
    bound = {"kind": kind, "constants": constants, "global_scale": global_scale, "rule": rule}
    out = run_compiled(_block_scales, (blocks, emax, numerator), ((0, 2), (), ()), **bound)
    if out is None or not bool(out[4]):
        return None
    return out[:4]


def _scaled_fake_quantize_whole(
    blocks: torch.Tensor,
    emax: torch.Tensor | None,
    numerator: torch.Tensor | None,
    keys: torch.Tensor | None,
    column_index: torch.Tensor | None,
    prescale: torch.Tensor | None,
    *,
    kind: str,
    constants,
    global_scale: bool,
    rule: str,
    **options,
):
    """``_block_scales`` then ``_fake_quantize_whole`` in one graph, with the scales the eager plan makes
    (the factor times the SR prescale as ``_Plan.factor`` folds it, the global decode scale as
    ``_Plan.global_scale``) -> (values, decode scales, global decode scale or None, every amax finite)."""
    decode, factor, g, _, finite = _block_scales(
        blocks, emax, numerator, kind=kind, constants=constants, global_scale=global_scale, rule=rule
    )
    global_decode = None if g is None else torch.reciprocal(g).reshape(())
    if prescale is not None:
        factor = factor * prescale
    out = _fake_quantize_whole(blocks, factor, decode, None, global_decode, keys, column_index, prescale, **options)
    return out, decode, global_decode, finite


def compiled_scaled_fake_quantize(
    blocks: torch.Tensor,
    rng: RandomBits | None,
    *,
    element: ElementFormat,
    scale_format: ElementFormat,
    global_scale: bool,
    rule: str,
    rounding: str,
    sr_prescale: float,
    out_dtype: torch.dtype,
    columns: bool = False,
    container: torch.dtype | None = None,
    pow2: bool = False,
    target: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
    """``compiled_block_scales`` and ``compiled_fake_quantize`` of the same blocks in one compiled graph:
    one call and one graph where they were two, the same bits (tested). -> (fake-quantized values, or the
    kept element values in ``container``; decode scales (n, nb); global decode scale or None), or None
    where either would not apply or an amax is not finite (the caller takes the two-step path, which
    finds the same and falls back as it does)."""
    graph = _scale_graph(element, scale_format, global_scale, rule, blocks.device, pow2, target)
    inputs = _element_inputs(blocks, rng, sr_prescale, columns)
    if graph is None or inputs is None:
        return None
    kind, constants, emax, numerator = graph
    bound = {"kind": kind, "constants": constants, "global_scale": global_scale, "rule": rule}
    dynamic = ((0, 2), (), (), (), (0,), ())
    options = _element_options(element, rounding, out_dtype, container)
    out = run_compiled(_scaled_fake_quantize_whole, (blocks, emax, numerator, *inputs), dynamic, **bound, **options)
    if out is None or not bool(out[3]):
        return None
    return out[0], out[1], out[2]
