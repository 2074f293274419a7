"""Number formats: FP8/FP6/FP4 minifloats, INT8/INT4, the E8M0/UE5M3 scale formats, FP32.

Every format is an :class:`ElementFormat`: a small frozen object that describes the format
(bits, exponent/mantissa bits, bias, max, min normal, min subnormal, Inf/NaN) and converts
bit-exactly between float32 and integer codes with ``encode`` / ``decode``.

References
- FP8 E4M3/E5M2: Micikevicius et al., "FP8 Formats for Deep Learning" (arXiv 2209.05433), and
  the OCP 8-bit Floating Point Specification (OFP8) v1.0.
- FP6 E2M3/E3M2, FP4 E2M1, E8M0: OCP Microscaling Formats (MX) v1.0, sections 5.1-5.4.
- UE5M3: Hu et al., "Elucidating the Design Space of FP4 training" (arXiv 2509.17791); the paper
  names the format but not its special values, so lowbit fixes them (see :data:`UE5M3`).

Encoding works on the float32 bit pattern: the exponent field picks the binade, an exact
power-of-two multiply makes the format's values in that binade the integers, one rounding
(:func:`lowbit.numerics.rounding.round_to_integer`) picks the value, and the code is
``((binade - emin) << mbits) + integer``. Codes are monotone in magnitude, which makes
saturation a ``min`` on codes. Decoding is a gather from a 2^bits table built from the
format's definition (or torch's native float8 view where one exists; the tests check both).

Special values (decided here where a spec leaves it open):
- saturating encode (the default, and what MX/NVFP4 use): |x| > max gives ±max; ±Inf gives ±max
  (CUDA's ``__NV_SATFINITE``); NaN gives NaN where the format has one.
- non-saturating encode (FP8 paper): overflow is NaN for E4M3 and ±Inf for E5M2, decided after
  rounding (so 464 still rounds to 448 in E4M3); Inf follows the same rule. Formats with
  neither (FP6, FP4) always saturate.
- NaN input to a format without NaN (FP6, FP4, INT) encodes as +0. In an MX block the NaN is
  carried by the E8M0 scale instead (OCP MX v1.0 section 6.3), so the block still decodes to NaN.
- negative input to an unsigned format (UE5M3, E8M0) encodes as its smallest code.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lowbit.errors import LowbitError
from lowbit.numerics._chunks import map_elementwise
from lowbit.numerics.rounding import RandomBits, check_rounding, round_to_integer

__all__ = [
    "E2M1",
    "E2M3",
    "E3M2",
    "E4M3",
    "E5M2",
    "E8M0",
    "FP32",
    "INT2",
    "INT3",
    "INT4",
    "INT5",
    "INT6",
    "INT7",
    "INT8",
    "UE5M3",
    "E8M0Format",
    "ElementFormat",
    "FP32Format",
    "FloatFormat",
    "IntFormat",
    "BUILTIN_FORMATS",
    "INT_WIDTHS",
    "FLT_MAX",
    "format_names",
    "get_format",
    "set_format_resolver",
]

_F32_MANT = 23
_F32_BIAS = 127
FLT_MAX = torch.finfo(torch.float32).max
"""float32's largest finite value: scale factors that overflow float32 (tiny amax, zero scales) clamp to it."""


def _pow2(exponent: int) -> float:
    return math.ldexp(1.0, exponent)


def _float32_exponent(bits: torch.Tensor) -> torch.Tensor:
    """Unbiased exponent of float32 magnitudes from their int32 bit pattern (-127 for subnormals)."""
    return (bits >> _F32_MANT) - _F32_BIAS


def _pow2_tensor(exponent: torch.Tensor) -> torch.Tensor:
    """2^exponent as float32, built from bits; exponent must lie in [-126, 127]."""
    return ((exponent + _F32_BIAS) << _F32_MANT).view(torch.float32)


_TABLES: dict[tuple[str, torch.device], torch.Tensor] = {}


class ElementFormat:
    """Interface of a number format (a plugin in the ``lowbit.formats`` entry-point group).

    Attributes: ``name``, ``bits``, ``ebits``, ``mbits``, ``bias``, ``signed``, ``has_inf``,
    ``has_nan``, ``max``, ``min_normal``, ``min_subnormal``, ``emax`` (exponent of the largest
    power of two <= max, the OCP MX ``emax_elem``), ``is_integer``. Methods: ``encode``,
    ``decode``, ``all_codes``, ``values``.
    """

    lowbit_plugin_api = 1
    name: str
    is_integer = False

    @property
    def code_dtype(self) -> torch.dtype:
        return torch.uint8

    @property
    def emax(self) -> int:
        return math.floor(math.log2(self.max))

    roundings: tuple[str, ...] = ("rne", "ta", "sr")

    def encode(
        self,
        x: torch.Tensor,
        *,
        rounding: str = "rne",
        saturate: bool = True,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Float tensor (any float dtype, computed in float32) -> integer codes, bit-exact.

        ``rounding``: ``rne`` (default), ``ta`` or ``sr`` (stochastic, drawing from
        ``generator``). ``saturate``: clamp overflow to +-max (else the format's overflow value).
        """
        check_rounding(rounding, self.roundings)
        rng = RandomBits.of(generator, x.device, rounding)  # keys drawn once: the chunks continue one stream
        fn = lambda c, start: self._encode(c.float(), rounding, saturate, rng and rng.at(start))
        return map_elementwise(fn, x, self.code_dtype, offsets=True)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Integer codes -> float32 values, bit-exact."""
        return map_elementwise(self._decode, codes, torch.float32)

    def _encode(
        self, x: torch.Tensor, rounding: str, saturate: bool, generator: torch.Generator | RandomBits | None
    ) -> torch.Tensor:
        raise NotImplementedError

    def decode_reference(self, codes: torch.Tensor) -> torch.Tensor:
        """Decode by the format's definition (arithmetic on the code fields); builds the table."""
        raise NotImplementedError

    grid_spacing = None
    """Optional, for a plugin format whose values are symmetric about one zero (+0), with a uniform
    spacing within each binade [2^b, 2^(b+1)) that divides 2^b: a method ``grid_spacing(magnitude)``
    giving, for float32 magnitudes in [0, max], the spacing of the values around each one (a power
    of two), from float arithmetic alone (no bitcasts, so a compiled kernel vectorizes it). With it,
    quantization rounds finite input to the format's values arithmetically, saturating, as encode
    then decode would, without building codes (HiF8's ``grid_spacing`` is an example)."""

    def _decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Gather from the 2^bits table built once per device by ``decode_reference``."""
        key = (self.name, codes.device)
        table = _TABLES.get(key)
        if table is None:
            table = self.decode_reference(self.all_codes()).to(codes.device)
            _TABLES[key] = table
        return table[codes.to(torch.int64) & (table.numel() - 1)]

    def all_codes(self) -> torch.Tensor:
        """Every code of the format, 0 .. 2^bits - 1 (formats of 8 bits or fewer)."""
        if self.bits > 8:
            raise LowbitError(f"format '{self.name}' has {self.bits}-bit codes; a code table needs 8 bits or fewer")
        return torch.arange(2**self.bits, dtype=torch.int32).to(self.code_dtype)

    def values(self) -> torch.Tensor:
        """The ordered table of distinct finite values (float32), for tests and plots."""
        vals = self.decode_reference(self.all_codes())
        vals = vals[torch.isfinite(vals)]
        return torch.unique(vals)  # sorted; +0 and -0 collapse to one zero

    def __repr__(self) -> str:
        return f"<format {self.name}: {self.bits} bits, max {self.max:g}>"


@dataclass(frozen=True, repr=False)
class FloatFormat(ElementFormat):
    """A binary minifloat: sign, ``ebits`` exponent bits with ``bias``, ``mbits`` mantissa bits,
    subnormals. ``special`` says how the top of the code space is used:
    ``"ieee"`` (exponent all ones = Inf/NaN; E5M2), ``"fn"`` (only all-ones is NaN; E4M3,
    UE5M3), ``"none"`` (every code finite; FP6, FP4)."""

    name: str
    ebits: int
    mbits: int
    bias: int
    signed: bool = True
    special: str = "none"
    native: str = ""  # torch dtype name with identical semantics, for the fast path

    def __post_init__(self) -> None:
        if self.special not in ("ieee", "fn", "none"):
            raise LowbitError(f"format '{self.name}': special must be ieee, fn or none, got '{self.special}'")

    # ---- description -----------------------------------------------------------------------
    @property
    def bits(self) -> int:
        return int(self.signed) + self.ebits + self.mbits

    @property
    def has_inf(self) -> bool:
        return self.special == "ieee"

    @property
    def has_nan(self) -> bool:
        return self.special in ("ieee", "fn")

    @property
    def emin(self) -> int:
        return 1 - self.bias

    @property
    def _max_exp_field(self) -> int:
        return 2**self.ebits - (2 if self.special == "ieee" else 1)

    @property
    def _max_mant_field(self) -> int:
        return 2**self.mbits - (2 if self.special == "fn" else 1)

    @property
    def max_code(self) -> int:
        """Magnitude code of the largest finite value."""
        return (self._max_exp_field << self.mbits) | self._max_mant_field

    @property
    def nan_code(self) -> int:
        """Magnitude code of the NaN this format produces (all ones, as torch's float8 casts)."""
        return 2 ** (self.ebits + self.mbits) - 1

    @property
    def inf_code(self) -> int:
        return (2**self.ebits - 1) << self.mbits

    @property
    def max(self) -> float:
        return (1 + self._max_mant_field / 2**self.mbits) * _pow2(self._max_exp_field - self.bias)

    @property
    def min_normal(self) -> float:
        return _pow2(self.emin)

    @property
    def min_subnormal(self) -> float:
        return _pow2(self.emin - self.mbits)

    @property
    def emax(self) -> int:
        return self._max_exp_field - self.bias

    # ---- conversion ------------------------------------------------------------------------
    def encode(
        self,
        x: torch.Tensor,
        *,
        rounding: str = "rne",
        saturate: bool = True,
        generator: torch.Generator | None = None,
        native: bool = True,
    ) -> torch.Tensor:
        """Float -> uint8 codes (sign in bit ``bits-1``), bit-exact; rules in the module docstring.

        ``native=False`` forces the bit-manipulation path even where torch has a native float8
        cast with the same semantics (the tests compare the two on millions of inputs).
        """
        check_rounding(rounding, self.roundings)
        if native and self.native and rounding == "rne" and (saturate or self.has_inf):
            fn = lambda c: self._encode_native(c.float(), saturate)
        else:
            rng = RandomBits.of(generator, x.device, rounding)  # keys drawn once: the chunks continue one stream
            fn = lambda c, start: self._encode(c.float(), rounding, saturate, rng and rng.at(start))
            return map_elementwise(fn, x, torch.uint8, offsets=True)
        return map_elementwise(fn, x, torch.uint8)

    def _encode(
        self, x: torch.Tensor, rounding: str, saturate: bool, generator: torch.Generator | RandomBits | None
    ) -> torch.Tensor:
        sign = (x.view(torch.int32) >> 31) & 1  # 1 for negative, -0 and -NaN
        mag = x.abs()
        nan = torch.isnan(mag)
        limit = self.max if saturate or not self.has_nan else _pow2(self.emax + 2)
        mag = torch.clamp(mag, max=limit)  # keeps NaN; Inf -> limit
        binade = torch.clamp(_float32_exponent(mag.view(torch.int32)), min=self.emin)
        # exact scaling: the format's values in this binade become the integers 2^mbits..2^(mbits+1)
        scaled = mag * _pow2_tensor(self.mbits - binade)
        integer = round_to_integer(scaled, rounding, generator)  # NaN lanes are overwritten below
        code = ((binade - self.emin) << self.mbits) + integer.to(torch.int32)
        if saturate or not self.has_nan:
            code = torch.clamp(code, max=self.max_code)
        else:  # non-saturating overflow (FP8 paper): Inf for E5M2, NaN for E4M3
            code = torch.where(code > self.max_code, self.inf_code if self.has_inf else self.nan_code, code)
        if self.has_nan:
            code = torch.where(nan, self.nan_code, code)
        if self.signed:
            code = code | (sign << (self.bits - 1))  # NaN keeps its sign, as torch's float8 casts
        else:
            code = torch.where(sign.bool() & ~nan, 0, code)
        if not self.has_nan:
            code = torch.where(nan, 0, code)  # no NaN code: +0
        return code.to(torch.uint8)

    def _encode_native(self, x: torch.Tensor, saturate: bool) -> torch.Tensor:
        if saturate:
            x = torch.clamp(x, -self.max, self.max)  # clamp keeps NaN, maps +-Inf to +-max
        return x.to(getattr(torch, self.native)).view(torch.uint8)

    def decode_reference(self, codes: torch.Tensor) -> torch.Tensor:
        """Decode from the fields: (-1)^s * 2^(e-bias) * 1.m, subnormal 2^emin * 0.m."""
        c = codes.to(torch.int32)
        mag_bits = self.ebits + self.mbits
        sign = (c >> mag_bits) & 1 if self.signed else torch.zeros_like(c)
        exp_field = (c >> self.mbits) & (2**self.ebits - 1)
        mant = (c & (2**self.mbits - 1)).double()
        normal = (1 + mant / 2**self.mbits) * torch.exp2((exp_field - self.bias).double())
        subnormal = mant * self.min_subnormal
        value = torch.where(exp_field == 0, subnormal, normal)
        mag = c & (2**mag_bits - 1)
        if self.special == "ieee":
            top = exp_field == 2**self.ebits - 1
            value = torch.where(top, torch.where(mant == 0, torch.inf, torch.nan), value)
        elif self.special == "fn":
            value = torch.where(mag == self.nan_code, torch.nan, value)
        return torch.where(sign == 1, -value, value).float()

    def _decode(self, codes: torch.Tensor) -> torch.Tensor:
        if self.native and codes.dtype == torch.uint8:
            return codes.view(getattr(torch, self.native)).float()
        return super()._decode(codes)


@dataclass(frozen=True, repr=False)
class E8M0Format(ElementFormat):
    """OCP MX v1.0 E8M0 scale (section 5.4): code e means 2^(e-127); 0xFF is NaN; no zero, no
    sign, no Inf. Encoding rounds linearly to the nearest power of two (the midpoint of 2^k and
    2^(k+1) is 1.5*2^k; ties up); values below 2^-127 (and 0, negatives) give code 0."""

    name: str = "e8m0"
    bits: int = 8
    ebits: int = 8
    mbits: int = 0
    bias: int = 127
    signed: bool = False
    has_inf: bool = False
    has_nan: bool = True

    @property
    def max(self) -> float:
        return _pow2(127)

    @property
    def min_normal(self) -> float:
        return _pow2(-127)

    @property
    def min_subnormal(self) -> float:
        return _pow2(-127)

    @property
    def emax(self) -> int:
        return 127

    def _encode(
        self, x: torch.Tensor, rounding: str, saturate: bool, generator: torch.Generator | RandomBits | None
    ) -> torch.Tensor:
        nan = torch.isnan(x)
        mag = torch.clamp(x, min=0.0, max=self.max if saturate else math.inf)  # negatives -> 0
        bits = mag.view(torch.int32)
        exp = _float32_exponent(bits)  # -127 for float32 subnormals and zero
        # 1.m in [1, 2) for normal floats; x * 2^127 in [0, 1) for float32 subnormals
        frac = ((bits & 0x7FFFFF) | (_F32_BIAS << _F32_MANT)).view(torch.float32)
        frac = torch.where(exp == -127, mag * _pow2(127), frac)
        frac = torch.where(torch.isinf(mag), 1.0, frac)
        integer = round_to_integer(frac, rounding, generator).to(torch.int32)
        code = torch.clamp(exp + 126 + integer, min=0)  # the value is integer * 2^exp
        code = torch.clamp(code, max=254) if saturate else torch.where(code > 254, 255, code)
        return torch.where(nan, 255, code).to(torch.uint8)

    def decode_reference(self, codes: torch.Tensor) -> torch.Tensor:
        c = codes.to(torch.int32)
        value = torch.exp2((c - self.bias).double())
        return torch.where(c == 255, torch.nan, value).float()

    def _decode(self, codes: torch.Tensor) -> torch.Tensor:
        """2^(e-127) from float32 bits; code 0 is the float32 subnormal 2^-127."""
        c = codes.to(torch.int32)
        value = (c << _F32_MANT).view(torch.float32)
        value = torch.where(c == 0, _pow2(-127), value)
        return torch.where(c == 255, torch.nan, value)


@dataclass(frozen=True, repr=False)
class IntFormat(ElementFormat):
    """Two's-complement integer of ``bits`` bits (codes are int8). Encoding rounds (rne is
    symmetric about zero) and clamps to [-2^(bits-1), 2^(bits-1)-1]; NaN encodes as 0.
    Symmetric quantization scales by +-(2^(bits-1)-1) (see :mod:`lowbit.numerics.blocks`)."""

    name: str
    bits: int
    ebits: int = 0
    bias: int = 0
    signed: bool = True
    has_inf: bool = False
    has_nan: bool = False
    is_integer = True

    @property
    def mbits(self) -> int:
        return self.bits - 1

    @property
    def code_dtype(self) -> torch.dtype:
        return torch.int8

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1))

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    @property
    def max(self) -> float:
        return float(self.qmax)

    @property
    def min_normal(self) -> float:
        return 1.0

    @property
    def min_subnormal(self) -> float:
        return 1.0

    def _encode(
        self, x: torch.Tensor, rounding: str, saturate: bool, generator: torch.Generator | RandomBits | None
    ) -> torch.Tensor:
        x = torch.nan_to_num(x, nan=0.0)
        mag = torch.clamp(x.abs(), max=float(-self.qmin))
        rounded = round_to_integer(mag, rounding, generator)
        value = torch.where(x < 0, -rounded, rounded)
        return torch.clamp(value, self.qmin, self.qmax).to(torch.int8)

    def decode_reference(self, codes: torch.Tensor) -> torch.Tensor:
        c = codes.to(torch.int32) & (2**self.bits - 1)
        return torch.where(c > self.qmax, c - 2**self.bits, c).float()

    def all_codes(self) -> torch.Tensor:
        return torch.arange(self.qmin, self.qmax + 1, dtype=torch.int8)

    def _decode(self, codes: torch.Tensor) -> torch.Tensor:
        return codes.float()


@dataclass(frozen=True, repr=False)
class FP32Format(ElementFormat):
    """IEEE 754 binary32, for FP32 scales; codes are the int32 bit pattern."""

    name: str = "fp32"
    bits: int = 32
    ebits: int = 8
    mbits: int = 23
    bias: int = 127
    signed: bool = True
    has_inf: bool = True
    has_nan: bool = True
    roundings: tuple[str, ...] = ("rne",)

    @property
    def code_dtype(self) -> torch.dtype:
        return torch.int32

    @property
    def max(self) -> float:
        return FLT_MAX

    @property
    def min_normal(self) -> float:
        return _pow2(-126)

    @property
    def min_subnormal(self) -> float:
        return _pow2(-149)

    def encode(
        self,
        x: torch.Tensor,
        *,
        rounding: str = "rne",
        saturate: bool = True,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        check_rounding(rounding, self.roundings)
        return x.float().view(torch.int32)

    def decode_reference(self, codes: torch.Tensor) -> torch.Tensor:
        return codes.to(torch.int32).view(torch.float32)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return codes.to(torch.int32).view(torch.float32)


E4M3 = FloatFormat("e4m3", ebits=4, mbits=3, bias=7, special="fn", native="float8_e4m3fn")
"""FP8 E4M3 ("fn": no Inf, NaN = S.1111.111), max 448, min normal 2^-6, min subnormal 2^-9."""
E5M2 = FloatFormat("e5m2", ebits=5, mbits=2, bias=15, special="ieee", native="float8_e5m2")
"""FP8 E5M2 (IEEE-style Inf/NaN), max 57344, min normal 2^-14, min subnormal 2^-16."""
E2M3 = FloatFormat("e2m3", ebits=2, mbits=3, bias=1)
"""FP6 E2M3 (OCP MX), max 7.5, min normal 1, min subnormal 0.125."""
E3M2 = FloatFormat("e3m2", ebits=3, mbits=2, bias=3)
"""FP6 E3M2 (OCP MX), max 28, min normal 0.25, min subnormal 0.0625."""
E2M1 = FloatFormat("e2m1", ebits=2, mbits=1, bias=1)
"""FP4 E2M1 (OCP MX), values +-{0, 0.5, 1, 1.5, 2, 3, 4, 6}."""
UE5M3 = FloatFormat("ue5m3", ebits=5, mbits=3, bias=15, signed=False, special="fn")
"""Unsigned 8-bit scale, 5 exponent and 3 mantissa bits (arXiv 2509.17791). lowbit's choice,
mirroring E4M3: bias 15, subnormals, no Inf, only 0xFF is NaN, saturating; so max
1.75 * 2^16 = 114688, min normal 2^-14, min subnormal 2^-17."""
E8M0 = E8M0Format()
INT8 = IntFormat("int8", bits=8)
INT4 = IntFormat("int4", bits=4)
INT2, INT3, INT5, INT6, INT7 = (IntFormat(f"int{bits}", bits=bits) for bits in (2, 3, 5, 6, 7))
INT_WIDTHS = {f.bits: f for f in (INT2, INT3, INT4, INT5, INT6, INT7, INT8)}
"""Two's-complement integers of 2 to 8 bits by width (QAT's word lengths; int4 and int8 are INT4, INT8)."""
FP32 = FP32Format()


BUILTIN_FORMATS: dict[str, ElementFormat] = {
    f.name: f for f in (E4M3, E5M2, E2M3, E3M2, E2M1, *INT_WIDTHS.values(), E8M0, UE5M3, FP32)
}
"""The formats this module defines, by name."""

_resolver: Callable[[str], ElementFormat] | None = None
_names: Callable[[], list[str]] | None = None


def set_format_resolver(resolve: Callable[[str], ElementFormat], names: Callable[[], list[str]]) -> None:
    """How names beyond the built-in formats resolve. ``lowbit.registry`` installs its entry-point
    lookup (group ``lowbit.formats``) when imported, so the numerics import nothing of the rest
    of lowbit and third-party formats still resolve by name in a spec."""
    global _resolver, _names
    _resolver, _names = resolve, names


def format_names() -> list[str]:
    """Names of every format a spec can name: the built-ins and, once the registry is imported,
    every installed ``lowbit.formats`` plugin."""
    return sorted({*BUILTIN_FORMATS, *(_names() if _names is not None else ())})


def get_format(name: str | ElementFormat) -> ElementFormat:
    """A format by name: a built-in, or a plugin through the resolver the registry installs."""
    if isinstance(name, ElementFormat):
        return name
    if not isinstance(name, str):
        raise LowbitError(f"a format is named by a string, got {name!r}; installed: {', '.join(format_names())}")
    if name in BUILTIN_FORMATS:
        return BUILTIN_FORMATS[name]
    if _resolver is not None:
        return _resolver(name)
    raise LowbitError(
        f"unknown format '{name}'; built in: {', '.join(sorted(BUILTIN_FORMATS))} "
        "(plugin formats resolve once lowbit.registry is imported)"
    )
