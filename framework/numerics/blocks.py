"""Block layout and block scales: MX (E8M0), NVFP4 (two-level E4M3 + FP32), FP32/integer scales.

Layout. A tensor of shape (..., R, C) with blocks (r, c) is viewed as (B, r, C) "block rows"
(B = numel / (r*C)) and each block row as (r, C/c, c) blocks; r = 1 blocks the last dim only.
Scales have the tensor's rank with each blocked dim divided by its block size:
(..., R/r, C/c) for 2-D blocks, (..., C/c) for 1 x c, (..., 1) for ``row``, (1, ..., 1) for
``tensor``. All scales here are *decode* scales: x ~= decode(code) * scale (* global scale).

MX (OCP MX v1.0 section 6.3): X = 2^(floor(log2(amax)) - emax_elem), stored as E8M0; an
all-zero block gets the smallest scale 2^-127 (E8M0 code 0) and zero elements; a block with a
NaN gets scale NaN (code 0xFF), so the whole block decodes to NaN (section 6.3). Other rules in
:func:`mx_scale_codes`.

NVFP4 (Transformer Engine's NVFP4 recipe; arXiv 2509.25149; TE ``NVFP4QuantizerRef``), with a
low-precision scale format S (E4M3) and element format E (E2M1):
  global encode scale  g = S.max * E.max / tensor_amax   (clamped to FLT_MAX; 1 if amax is Inf)
  block scale          s = S(RNE, saturating)(block_amax * (g * (1 / E.max)))
  element              q = E(RNE, saturating)(x * min(1 / (s * (1/g)), FLT_MAX))
  decode               x ~= (q * s) * (1/g)
The stored global scale is the decode scale 1/g = amax / (S.max * E.max). Choices where
references differ: block scales are *not* clamped from below (TE); a block scale that rounds to
0 in E4M3 makes its block decode to 0 (torchao instead clamps block scales to E4M3's min
normal 2^-6); a zero tensor gets g = FLT_MAX and decodes to zeros; a NaN anywhere makes the
tensor amax NaN and so the whole tensor NaN (as TE).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lowbit.errors import LowbitError
from lowbit.numerics.formats import FLT_MAX, ElementFormat, IntFormat
from lowbit.numerics.scaling import current_scale

__all__ = [
    "BlockLayout",
    "block_layout",
    "global_encode_scale",
    "int_asymmetric_scales",
    "lowp_block_scales",
    "mx_scale_codes",
    "pow2_from_exponent",
    "true_divide",
]

_SQRT2_MANTISSA = 3474676  # smallest 23-bit mantissa field m with 1 + m / 2^23 > sqrt(2)


@dataclass(frozen=True)
class BlockLayout:
    """How a tensor of ``shape`` splits into blocks of ``rows`` x ``cols`` (see module doc)."""

    shape: tuple[int, ...]
    rows: int  # block height r (1 for 1 x c blocks)
    cols: int  # block width c along the last dim
    per_tensor: bool  # one block for the whole tensor

    @property
    def last(self) -> int:
        return self.shape[-1] if self.shape else 1

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def n_block_rows(self) -> int:
        return self.numel // (self.rows * self.last)

    @property
    def blocks_per_row(self) -> int:
        return self.last // self.cols

    @property
    def scale_shape(self) -> tuple[int, ...]:
        if self.per_tensor:
            return (1,) * len(self.shape)
        if self.rows > 1:
            return (*self.shape[:-2], self.shape[-2] // self.rows, self.blocks_per_row)
        return (*self.shape[:-1], self.blocks_per_row)

    def block_rows(self, x: torch.Tensor) -> torch.Tensor:
        """(B, r, C) view of x (a copy only if x is not contiguous)."""
        return x.reshape(self.n_block_rows, self.rows, self.last)

    def blocks(self, rows: torch.Tensor) -> torch.Tensor:
        """(n, r, C) block rows -> (n, r, C/c, c) blocks."""
        return rows.view(rows.shape[0], self.rows, self.blocks_per_row, self.cols)


def block_layout(shape: tuple[int, ...] | torch.Size, block: str | tuple[int, int]) -> BlockLayout:
    """The layout of ``block`` over ``shape``; a clear error when the shape does not divide."""
    shape = tuple(int(s) for s in shape)
    if block == "tensor":
        return BlockLayout(shape, 1, shape[-1] if shape else 1, per_tensor=True)
    if not shape:
        raise LowbitError(f"block {block!r} needs a tensor with at least one dimension, got a 0-d tensor")
    if block == "row":
        return BlockLayout(shape, 1, shape[-1], per_tensor=False)
    rows, cols = block
    if rows > 1 and len(shape) < 2:
        raise LowbitError(f"2-D block {tuple(block)} needs a tensor with at least 2 dimensions, got shape {shape}")
    if shape[-1] % cols or (rows > 1 and shape[-2] % rows):
        want = f"last dim a multiple of {cols}" + (f" and second-to-last a multiple of {rows}" if rows > 1 else "")
        raise LowbitError(
            f"shape {shape} is not divisible by block {tuple(block)}; need the {want} (pad the tensor or pick another block)"
        )
    return BlockLayout(shape, rows, cols, per_tensor=False)


def true_divide(x: torch.Tensor, divisor: float) -> torch.Tensor:
    """``x / divisor`` correctly rounded on every device. PyTorch's CUDA kernels divide by a Python
    scalar as a multiply by its float32 reciprocal (one more rounding, so ~half the quotients
    differ in the last bit from CPU's); a tensor divisor is divided elementwise everywhere."""
    return x / torch.tensor(divisor, dtype=x.dtype, device=x.device)


# ---- power-of-two (E8M0) scales --------------------------------------------------------------
def pow2_from_exponent(exponent: torch.Tensor) -> torch.Tensor:
    """2^e as float32 for integer e in [-127, 127], exactly (2^-127 is a float32 subnormal)."""
    e = exponent.to(torch.int32)
    normal = ((torch.clamp(e, min=-126) + 127) << 23).view(torch.float32)
    return torch.where(e <= -127, math.ldexp(1.0, -127), normal)


def mx_scale_codes(amax: torch.Tensor, element: ElementFormat, rule: str = "floor") -> torch.Tensor:
    """E8M0 codes (uint8) of MX block scales from float32 block amax.

    ``floor`` (OCP MX v1.0 section 6.3): e = floor(log2(amax)) - emax_elem.
    ``ceil``: e = ceil(log2(amax)) - emax_elem (never saturates, wastes up to a binade).
    ``even``: amax first rounded to the element's mantissa width (round half up on the float32
        bits), then ``floor`` (torchao ``ScaleCalculationMode.EVEN``).
    ``nearest``: e = round(log2(amax)) - emax_elem (log2 rounded to the nearest integer).
    ``rceil``: e = ceil(log2(amax / elem_max)) (cuBLAS / Transformer Engine MXFP8; no element
        ever exceeds elem_max).
    e is clamped to [-127, 127]; amax == 0 gives code 0 (2^-127); NaN amax gives 0xFF.
    """
    amax = amax.float()
    bits = amax.view(torch.int32)
    if rule == "rceil":
        ratio = true_divide(amax, element.max)
        rbits = ratio.view(torch.int32)
        exponent = ((rbits >> 23) - 127) + ((rbits & 0x7FFFFF) != 0).to(torch.int32)
        exponent = torch.where(ratio <= math.ldexp(1.0, -127), -127, exponent)
    else:
        if rule == "even":
            mbits = element.mbits
            bits = (bits + (1 << (23 - mbits - 1))) & 0x7F800000
        floor_log2 = (bits >> 23) - 127  # -127 for zero and float32 subnormals
        mantissa = bits & 0x7FFFFF
        if rule in ("floor", "even"):
            exponent = floor_log2
        elif rule == "ceil":
            exponent = floor_log2 + (mantissa != 0).to(torch.int32)
        elif rule == "nearest":
            exponent = floor_log2 + (mantissa >= _SQRT2_MANTISSA).to(torch.int32)
        else:
            raise LowbitError(f"unknown MX scale rule '{rule}'; valid: floor, ceil, even, nearest, rceil")
        exponent = exponent - element.emax
    codes = torch.clamp(exponent, -127, 127) + 127
    return torch.where(torch.isnan(amax), 255, codes).to(torch.uint8)


# ---- low-precision block scales (NVFP4 and single-level) -------------------------------------
# The formulas of the module doc, each once: the eager functions below and the compiled path
# (``_fast.compiled_block_scales``) call these with float32 tensors, so both run the same operations.
def _global_encode(amax: torch.Tensor, numerator: torch.Tensor) -> torch.Tensor:
    """g = numerator / amax, numerator = S.max * E.max: clamped to FLT_MAX (amax 0), 1 where that is 0 (amax Inf)."""
    g = torch.clamp(numerator / amax, max=FLT_MAX)
    return torch.where(g == 0, 1.0, g)


def _block_scale_target(block_amax: torch.Tensor, emax: torch.Tensor, g: torch.Tensor | None) -> torch.Tensor:
    """What each block scale encodes: block_amax * (g * (1 / E.max)) clamped to FLT_MAX, or block_amax / E.max
    without a global scale; ``emax``: E.max as a float32 tensor on block_amax's device (a correctly rounded divide)."""
    if g is None:
        return block_amax / emax
    return torch.clamp(block_amax * (g * torch.reciprocal(emax)), max=FLT_MAX)


def _element_encode_factor(scales: torch.Tensor, g: torch.Tensor | None) -> torch.Tensor:
    """Element encode factors min(1 / (s * (1/g)), FLT_MAX), or min(1 / s, FLT_MAX) without a global scale."""
    factor = torch.reciprocal(scales) if g is None else torch.reciprocal(scales * torch.reciprocal(g))
    return torch.clamp(factor, max=FLT_MAX)


def global_encode_scale(tensor_amax: torch.Tensor, element: ElementFormat, scale_format: ElementFormat) -> torch.Tensor:
    """NVFP4 global encode scale g = S.max * E.max / amax (TE): FLT_MAX for amax 0, 1 for Inf."""
    amax = tensor_amax.float()
    numerator = torch.tensor(scale_format.max, dtype=torch.float32) * torch.tensor(element.max, dtype=torch.float32)
    return _global_encode(amax, numerator.to(amax.device))


def lowp_block_scales(
    block_amax: torch.Tensor,
    element: ElementFormat,
    scale_format: ElementFormat,
    global_encode: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Block scales in a low-precision format: (codes, decoded scales, element encode factors).

    With ``global_encode`` g (NVFP4): s = S(amax * (g * (1/E.max))), factor = 1 / (s * (1/g)).
    Without: s = S(amax / E.max), factor = 1 / s. Factors are clamped to FLT_MAX (s == 0).
    """
    emax = torch.tensor(element.max, dtype=torch.float32, device=block_amax.device)
    codes = scale_format.encode(_block_scale_target(block_amax, emax, global_encode), rounding="rne", saturate=True)
    scales = scale_format.decode(codes)
    return codes, scales, _element_encode_factor(scales, global_encode)


# ---- FP32 scales -----------------------------------------------------------------------------
def fp32_scales(
    amax: torch.Tensor, element: ElementFormat, pow2: bool, target: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(decode scales, encode factors) for FP32 scales: factor = max / amax (TE current scaling;
    ``qmax`` for integers, so symmetric INT8 uses +-127; ``target`` instead of max when given),
    decode = 1 / factor."""
    factor = current_scale(amax, target or element.max, pow2=pow2)
    return torch.reciprocal(factor), factor


def int_asymmetric_scales(
    block_min: torch.Tensor, block_max: torch.Tensor, element: IntFormat
) -> tuple[torch.Tensor, torch.Tensor]:
    """(decode scales, zero points) for asymmetric integers: the range always includes 0,
    scale = (hi - lo) / (qmax - qmin) (1 for a constant-zero block), zero point =
    qmin - round(lo / scale) clamped to [qmin, qmax]; x ~= (code - zero_point) * scale."""
    lo = torch.clamp(block_min.float(), max=0.0)
    hi = torch.clamp(block_max.float(), min=0.0)
    scale = true_divide(hi - lo, float(element.qmax - element.qmin))
    scale = torch.where(scale > 0, scale, 1.0)
    zero_point = torch.clamp(element.qmin - torch.round(lo / scale), element.qmin, element.qmax)
    return scale, zero_point.to(torch.int32)
