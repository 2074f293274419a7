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

:mod:`lowbit.numerics.quantize` calls these on CPU only, for formats :func:`supported`
accepts, in chunks whose input is finite and whose encode factors are finite (anything else,
NaN included, takes the general path, so even NaN payloads match). The tests compare both
paths bit for bit on adversarial inputs (tests/framework/numerics/test_numerics_fastpath.py).
"""

from __future__ import annotations

import torch

from lowbit.numerics.formats import ElementFormat, FloatFormat, IntFormat
from lowbit.numerics.rounding import round_to_integer

__all__ = ["decode", "e8m0_scales", "encode", "round_to_format", "supported"]

_EXPONENT_FIELD = 0x7F800000  # float32 exponent bits
_FLOAT64_LOW_MANTISSA = (1 << 29) - 1  # the float64 mantissa bits float32 lacks (52 - 23)


def supported(element: ElementFormat, saturate: bool) -> bool:
    """Whether the arithmetic path gives the general path's bits for this format (encode with
    ``saturate``, and decode)."""
    if type(element) is IntFormat:  # exact types: a plugin subclass may change the rules
        return element.bits <= 8
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


def _round_magnitude(y: torch.Tensor, rounding: str, generator: torch.Generator | None) -> torch.Tensor:
    """``round_to_integer(y, rounding, generator)`` for finite float32 ``y >= 0``, same bits; SR
    draws the same float64 ``u`` and rounds up where u < frac, compared in float32: frac is a
    float32, so u < frac exactly when u truncated to float32 (low mantissa bits cleared) is, and
    the float32 difference of two numbers in [0, 1) keeps its sign, so floor(trunc(u) - frac) is
    -1 to round up and +0 to round down. 2x faster than the float64 compare and bool cast."""
    if rounding != "sr":
        return round_to_integer(y, rounding, generator)
    floor = torch.floor(y)
    frac = y - floor  # exact, as in round_to_integer
    u = torch.rand(y.shape, generator=generator, dtype=torch.float64, device=y.device)
    u_trunc = u.view(torch.int64).bitwise_and_(~_FLOAT64_LOW_MANTISSA).view(torch.float64).to(torch.float32)
    return floor.sub_(u_trunc.sub_(frac).floor_())


def round_to_format(
    element: ElementFormat, x: torch.Tensor, rounding: str, generator: torch.Generator | None
) -> torch.Tensor:
    """``element.decode(element.encode(x, saturate=True))`` for finite float32 ``x``, as float32."""
    if isinstance(element, IntFormat):
        if rounding == "rne":
            rounded = torch.round(x)  # round half even is symmetric: sign(x) * round(|x|)
        else:  # sr / ta round the magnitude, as the general path
            magnitude = torch.clamp(x.abs(), max=float(-element.qmin))
            rounded = torch.copysign(_round_magnitude(magnitude, rounding, generator), x)
        return rounded.clamp_(element.qmin, element.qmax).add_(0.0)
    if element.native and element.ebits == 5 and rounding == "rne":
        # E5M2: torch's cast, then its codes shifted into float16 (no Inf/NaN codes from finite x)
        codes = torch.clamp(x, -element.max, element.max).to(getattr(torch, element.native)).view(torch.uint8)
        return (codes.to(torch.int16) << 8).view(torch.float16).float()
    y = torch.clamp(x, -element.max, element.max)  # saturate first, so rounding never passes max
    field = _binade_field(y, element)
    scaled = y.mul_(_inverse_ulp(field, element))  # exact: a power of two
    ulp = field.sub_(element.mbits << 23).view(torch.float32)  # 2^(b - mbits)
    if rounding == "rne":
        return scaled.round_().mul_(ulp)  # keeps the sign of zero, as the code's sign bit does
    integer = _round_magnitude(scaled.abs_(), rounding, generator)
    return torch.copysign(integer.mul_(ulp), x)


def encode(element: ElementFormat, x: torch.Tensor, rounding: str, generator: torch.Generator | None) -> torch.Tensor:
    """``element.encode(x, saturate=True)`` for finite float32 ``x``: uint8 (int8) codes."""
    if isinstance(element, IntFormat):
        return round_to_format(element, x, rounding, generator).to(torch.int8)
    if element.native and rounding == "rne":  # torch's float8 cast: same codes, faster still
        return element.encode(x, rounding=rounding, saturate=True)
    magnitude = torch.clamp(x.abs(), max=element.max)
    field = _binade_field(magnitude, element)
    integer = _round_magnitude(magnitude.mul_(_inverse_ulp(field, element)), rounding, generator)
    # code = ((b - emin) << mbits) + integer; (field >> (23 - mbits)) is (b + 127) << mbits
    code = (field >> (23 - element.mbits)).add_(integer.to(torch.int32)).sub_((element.emin + 127) << element.mbits)
    sign = (x.view(torch.int32) >> (32 - element.bits)) & (1 << (element.bits - 1))  # bit 31 -> bit (bits - 1)
    return code.bitwise_or_(sign).to(torch.uint8)


def decode(element: ElementFormat, codes: torch.Tensor) -> torch.Tensor | None:
    """``element.decode(codes)`` as float32, or None where codes hold Inf/NaN (general path)."""
    if isinstance(element, IntFormat):
        return codes.float()
    magnitude_bits = element.bits - 1
    c = codes.to(torch.int16)
    magnitude = c & ((1 << magnitude_bits) - 1)
    if element.special != "none":
        first_special = element.nan_code if element.special == "fn" else element.inf_code
        if int(magnitude.max()) >= first_special:
            return None
    # the code's exponent and mantissa fields, moved into float16's: value * 2^(bias - 15)
    if element.ebits == 5:  # sign and fields already sit where float16 has them (E5M2: its top byte)
        half = c << (10 - element.mbits)
    else:
        half = (magnitude << (10 - element.mbits)).bitwise_or_((c >> magnitude_bits) << 15)
    values = half.view(torch.float16).float()
    return values if element.bias == 15 else values.mul_(2.0 ** (15 - element.bias))


def e8m0_scales(codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(decode scales 2^(c - 127), encode factors 2^(127 - c)) of E8M0 codes without NaN (c < 255),
    as float32 built from bits; 2^-127 (c = 0 or 254) is the subnormal 1 << 22 (E8M0's decode
    and ``pow2_from_exponent`` give the same bits)."""
    c = codes.to(torch.int32)
    decode = (c << 23).clamp_(min=1 << 22).view(torch.float32)
    factor = ((254 - c) << 23).clamp_(min=1 << 22).view(torch.float32)
    return decode, factor
