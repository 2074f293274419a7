"""Ascend HiFloat8 (HiF8), a tapered-precision 8-bit float (Luo et al., arXiv 2409.16626).

A built-in format plugin, registered like a third-party one (``lowbit.formats`` entry point
``hif8``). Byte layout: sign | dot | exponent | mantissa, where the prefix-coded dot field
says how many exponent bits follow. The exponent is sign-magnitude with an implicit leading 1
on the magnitude (so D stored bits cover |E| in [2^(D-1), 2^D - 1]); no bias.

  dot (after S)  D  exponent bits  |E|        mantissa bits   code (magnitude)
  11             4  4 (Se + 3)     8 .. 15    1               0b11_S_EEE_M
  10             3  3 (Se + 2)     4 .. 7     2               0b10_S_EE_MM
  01             2  2 (Se + 1)     2 .. 3     3               0b01_S_E_MMM
  001            1  1 (Se)         1          3               0b001_S_MMM
  0001           0  0              0          3               0b0001_MMM
  0000           denormal: value 2^(M - 23), M = 1..7 (2^-22 .. 2^-16)

Normal value (-1)^S * 2^E * 1.M: 7 exponents with 3 mantissa bits (|E| <= 3), 8 with 2, 16
with 1, plus 7 denormal binades: 38 binades in all (paper abstract). Special values:
0x00 = 0 (the only zero), 0x80 = NaN, 0x6F / 0xEF = +-Inf (the pattern that would be
+-1.5 * 2^15). Hence max = 2^15 = 32768, min normal 2^-15, min subnormal 2^-22.

Rounding: the paper's default conversion is TA (round half away from zero), which is this
format's default ``rounding="ta"``; ``rne`` and ``sr`` use the same grid. Rounding is linear
on the value grid at every binade, including the denormal binades (the midpoint of 2^k and
2^(k+1) is 1.5 * 2^k, and of 0 and 2^-22 is 2^-23). Overflow: in non-saturating mode any
value that rounds past 32768 (|x| >= 40960 with TA) is +-Inf; saturating mode (default, as
every lowbit format) gives +-32768 and maps +-Inf to +-32768.

Sources: the paper's abstract (the binade counts above); the field layout, special values,
max/min and the TA rounding thresholds agree with two public implementations (MindSpore's
``HiFloat8`` and ``en_dtypes``' ``hifloat8``), checked with the search tool. Not established
here: the paper's hybrid rounding (HR) mode is not implemented, and the text of the paper's
tables was not available, only those implementations and summaries of it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.numerics import pow2_floor
from lowbit.numerics.formats import ElementFormat
from lowbit.numerics.rounding import round_to_integer

__all__ = ["HIF8", "HiF8Format"]

_NAN, _INF, _MAX_CODE = 0x80, 0x6F, 0x6E


@dataclass(frozen=True, repr=False)
class HiF8Format(ElementFormat):
    """HiFloat8; see the module docstring. ``ebits``/``mbits`` are the widest fields (4 and 3)."""

    name: str = "hif8"
    bits: int = 8
    ebits: int = 4
    mbits: int = 3
    bias: int = 0
    signed: bool = True
    has_inf: bool = True
    has_nan: bool = True
    roundings: tuple[str, ...] = ("ta", "rne", "sr")

    @property
    def max(self) -> float:
        return 32768.0

    @property
    def min_normal(self) -> float:
        return 2.0**-15

    @property
    def min_subnormal(self) -> float:
        return 2.0**-22

    @property
    def emax(self) -> int:
        return 15

    def encode(
        self,
        x: torch.Tensor,
        *,
        rounding: str = "ta",
        saturate: bool = True,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Float -> HiF8 codes (uint8); default rounding TA as the paper."""
        return super().encode(x, rounding=rounding, saturate=saturate, generator=generator)

    def _encode(
        self, x: torch.Tensor, rounding: str, saturate: bool, generator: torch.Generator | None
    ) -> torch.Tensor:
        sign = (x.view(torch.int32) >> 31) & 1
        mag = torch.clamp(x.abs(), max=self.max if saturate else 2.0**17)  # keeps NaN
        nan = torch.isnan(mag)
        exp = torch.clamp((mag.view(torch.int32) >> 23) - 127, -23, 16)  # binade of |x|
        abs_exp = exp.abs()
        mant_bits = 3 - (abs_exp > 3).to(torch.int32) - (abs_exp > 7).to(torch.int32)
        # quantum (spacing of representable values) in this binade: 2^(E - mbits); the
        # denormal binades have spacing 2^E, and below them the grid is {0, 2^-22}
        quantum_exp = torch.where(exp < -15, torch.clamp(exp, min=-22), exp - mant_bits)
        scaled = mag * ((127 - quantum_exp) << 23).view(torch.float32)
        integer = round_to_integer(scaled, rounding, generator)
        value = integer * ((127 + quantum_exp) << 23).view(torch.float32)  # exact grid value
        code = self._code_of_grid_value(value)
        code = torch.where(value > self.max, _INF if not saturate else _MAX_CODE, code)
        code = torch.where(code != 0, code | (sign << 7), code)  # one zero: +0
        return torch.where(nan, _NAN, code).to(torch.uint8)

    def grid_spacing(self, magnitude: torch.Tensor) -> torch.Tensor:
        """Spacing of the HiF8 values around float32 magnitudes in [0, 2^15], in float arithmetic
        (the arithmetic rounding path of lowbit's quantization, see ``ElementFormat.grid_spacing``):
        2^(b - m) in binade 2^b with m = 3, 2, 1 mantissa bits for |b| <= 3, <= 7, <= 15; the
        denormal binades 2^b (b < -15) have spacing 2^b, and below them the grid is {0, 2^-22}."""
        binade = pow2_floor(magnitude)  # 2^b; 0 and float32 subnormals give <= 2^-126
        per_binade = torch.where(
            (binade >= 2.0**-3) & (binade <= 2.0**3),
            0.125,
            torch.where((binade >= 2.0**-7) & (binade <= 2.0**7), 0.25, 0.5),
        )
        return torch.where(binade < 2.0**-15, torch.clamp(binade, min=2.0**-22), binade * per_binade)

    @staticmethod
    def _code_of_grid_value(value: torch.Tensor) -> torch.Tensor:
        """Magnitude code of a non-negative value on the HiF8 grid (<= 2^15; larger: garbage)."""
        bits = value.view(torch.int32)
        exp = (bits >> 23) - 127
        mantissa = bits & 0x7FFFFF
        abs_exp = exp.abs()
        exp_neg = (exp < 0).to(torch.int32)
        dot = (
            (abs_exp >= 1).to(torch.int32)
            + (abs_exp >= 2).to(torch.int32)
            + (abs_exp >= 4).to(torch.int32)
            + (abs_exp >= 8).to(torch.int32)
        )  # D: 0 .. 4
        mant_bits = 3 - (abs_exp >= 4).to(torch.int32) - (abs_exp >= 8).to(torch.int32)
        prefix = torch.where(dot == 4, 0x60, torch.where(dot == 0, 0x08, 0x10 << torch.clamp(dot - 1, min=0)))
        low_exp = torch.where(dot == 0, 0, 1 << torch.clamp(dot - 1, min=0))  # implicit leading 1
        exp_field = torch.where(dot == 0, 0, (exp_neg << torch.clamp(dot - 1, min=0)) | (abs_exp - low_exp))
        normal = prefix | (exp_field << mant_bits) | (mantissa >> (23 - mant_bits))
        denormal = exp + 23  # 2^-22 .. 2^-16 -> M = 1 .. 7
        code = torch.where(exp < -15, denormal, normal)
        return torch.where(value == 0, 0, code)

    def decode_reference(self, codes: torch.Tensor) -> torch.Tensor:
        """Decode from the fields (sign, dot, sign-magnitude exponent, mantissa)."""
        c = codes.to(torch.int32) & 0xFF
        mag = c & 0x7F
        dot = torch.where(
            (mag >> 5) == 3,
            4,
            torch.where((mag >> 5) == 2, 3, torch.where((mag >> 5) == 1, 2, torch.where((mag >> 4) == 1, 1, 0))),
        )
        mant_bits = torch.where(dot == 4, 1, torch.where(dot == 3, 2, 3))
        exp_bits = torch.clamp(dot - 1, min=0)  # stored magnitude bits below the implicit 1
        exp_neg = torch.where(dot >= 1, (mag >> (mant_bits + exp_bits)) & 1, 0)
        exp_mag = torch.where(dot >= 1, (1 << exp_bits) + ((mag >> mant_bits) & ((1 << exp_bits) - 1)), 0)
        exp = torch.where(exp_neg == 1, -exp_mag, exp_mag).double()
        mantissa = (mag & ((1 << mant_bits) - 1)).double() / (1 << mant_bits).double()
        normal = torch.exp2(exp) * (1 + mantissa)
        denormal = torch.exp2((mag & 7).double() - 23)
        is_denormal = (mag >> 3) == 0
        value = torch.where(is_denormal, denormal, normal)
        value = torch.where(mag == 0, 0.0, value)
        value = torch.where(mag == _INF, torch.inf, value)
        value = torch.where((c >> 7) == 1, -value, value)
        return torch.where(c == _NAN, torch.nan, value).float()


HIF8 = HiF8Format()
