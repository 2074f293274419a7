"""Shared pieces of the lowbit kernels: bit-exact minifloat encode/decode, E8M0 scale rules, the
random Hadamard transform of a tile, FP4 nibble packing and Philox bits, as ``@triton.jit``
helpers, plus the launchers' common checks.

Every helper reproduces a function of :mod:`lowbit.numerics` on float32 bit patterns with integer
arithmetic only (no float rounding mode, no denormal flushing, no libdevice), so the same bits
come out under ``TRITON_INTERPRET=1`` on a CPU and on any GPU:

  encode_float   FloatFormat.encode (saturating; RNE, or SR from 31 Philox bits)
  decode_float   FloatFormat.decode
  e8m0_code      lowbit.numerics.blocks.mx_scale_codes (floor, ceil, even, nearest, rceil)
  e8m0_factor    pow2_from_exponent(127 - code): the encode factor of an E8M0 scale
  e8m0_decode    E8M0.decode
"""

from __future__ import annotations

import functools
import struct

import torch
import triton
import triton.language as tl
from triton import knobs

from lowbit.errors import LowbitError
from lowbit.numerics import E2M1, E4M3, E5M2, UE5M3, random_hadamard

__all__ = [
    "ELEMENTS",
    "SCALE_FORMATS",
    "check_2d",
    "check_device",
    "check_rht",
    "check_rht_pair",
    "decode_float",
    "e8m0_code",
    "e8m0_decode",
    "e8m0_factor",
    "encode_float",
    "hadamard",
    "interpreting",
    "kernel_input",
    "pack_fp4",
    "quantize_tiles",
    "rht_matrices",
    "rht_tile",
    "scale_keeping_nan",
    "sr_bits",
    "store_codes",
    "to_float32",
    "unpack_fp4",
]

_FORMATS = {"e4m3": E4M3, "e5m2": E5M2, "e2m1": E2M1, "ue5m3": UE5M3}
ELEMENTS = ("e4m3", "e5m2", "e2m1")
"""Element formats the kernels encode and multiply."""
SCALE_FORMATS = ("e4m3", "ue5m3")
"""Low-precision (non power-of-two) block-scale formats the kernels encode, besides E8M0 and FP32."""
FLT_MAX = tl.constexpr(3.4028234663852886e38)
"""float32's largest finite value, a compile-time constant (a kernel reads only constexpr globals)."""


def _f32_bits(value: float) -> int:
    return struct.unpack("<i", struct.pack("<f", value))[0]


# Computed here, not inside ``fmt_const``: a constexpr function may call only other Triton functions.
_MAX_BITS = {name: _f32_bits(f.max) for name, f in _FORMATS.items()}


@triton.constexpr_function
def fmt_const(name, field):
    """A constant of float format ``name`` at compile time (mbits, emin, max_bits, max_code, ...)."""
    f = _FORMATS[name]
    if field == "max_bits":
        return _MAX_BITS[name]
    if field == "nan_code":
        return f.nan_code if f.has_nan else -1
    if field == "mag_bits":
        return f.ebits + f.mbits
    if field == "inf":
        return int(f.has_inf)
    if field == "fn":
        return int(f.special == "fn")
    if field == "signed":
        return int(f.signed)
    if field == "payload_shift":  # torch's float8 casts keep a NaN code's mantissa as the NaN payload
        return 23 - f.mbits if f.native else 32

    if field == "min_sub":
        return f.min_subnormal
    if field == "emax":
        return f.emax
    if field == "max":
        return f.max
    return getattr(f, field)


# ---- elements ------------------------------------------------------------------------------
@triton.jit
def encode_float(x, rbits, FMT: tl.constexpr, SR: tl.constexpr):
    """float32 -> int32 codes of minifloat ``FMT``, saturating, bit-exact with ``FloatFormat.encode``.

    Rounds the float32 significand with integers: RNE, or up with probability rem / 2^shift when
    ``SR`` (compared with ``rbits``, 31 uniform random bits; exactly unbiased down to 2^-31).
    NaN gives the format's NaN (sign kept) or +0 where it has none; |x| > max and Inf give +-max.
    """
    MBITS: tl.constexpr = fmt_const(FMT, "mbits")
    EMIN: tl.constexpr = fmt_const(FMT, "emin")
    MAX_BITS: tl.constexpr = fmt_const(FMT, "max_bits")
    MAX_CODE: tl.constexpr = fmt_const(FMT, "max_code")
    NAN_CODE: tl.constexpr = fmt_const(FMT, "nan_code")
    SIGN_SHIFT: tl.constexpr = fmt_const(FMT, "mag_bits")
    SIGNED: tl.constexpr = fmt_const(FMT, "signed")
    bits = x.to(tl.int32, bitcast=True)
    sign = (bits >> 31) & 1
    mag = bits & 0x7FFFFFFF
    is_nan = mag > 0x7F800000
    mag = tl.minimum(mag, MAX_BITS)  # saturate: |x| > max and Inf become max (integer order = float order)
    field = mag >> 23
    exponent = tl.maximum(field, 1) - 127  # float32 subnormals: exponent -126, no implicit bit
    significand = (mag & 0x7FFFFF) | tl.where(field > 0, 0x800000, 0)
    binade = tl.maximum(exponent, EMIN)
    # value = significand * 2^(exponent - 23); in units of the binade's step 2^(binade - MBITS) it
    # is significand / 2^shift, shift >= 23 - MBITS
    shift = (23 - MBITS) + binade - exponent
    s = tl.minimum(shift, 30)  # significand < 2^24: any shift >= 24 leaves q = 0, rem = significand
    q = significand >> s
    rem = significand & ((1 << s) - 1)
    if SR:
        # P(up) = rem / 2^shift = threshold / 2^31
        threshold = (rem << tl.maximum(31 - shift, 0)) >> tl.minimum(tl.maximum(shift - 31, 0), 31)
        up = rbits < threshold
    else:
        half = 1 << (s - 1)
        up = (rem > half) | ((rem == half) & ((q & 1) == 1))
    code = ((binade - EMIN) << MBITS) + q + up.to(tl.int32)
    code = tl.minimum(code, MAX_CODE)
    if NAN_CODE >= 0:
        code = tl.where(is_nan, NAN_CODE, code)
    if SIGNED:
        code = code | (sign << SIGN_SHIFT)
    else:
        code = tl.where((sign == 1) & ~is_nan, 0, code)  # negative input to an unsigned format
    if NAN_CODE < 0:
        code = tl.where(is_nan, 0, code)
    return code


@triton.jit
def scale_keeping_nan(x, factor):
    """x * factor, with a NaN of ``x`` passed through as it is: a GPU's multiply returns its canonical
    NaN (positive), the reference's CPU multiply the NaN operand, whose sign the NaN code keeps (an
    H200 encoded a negative BFloat16 NaN as E4M3 0x7F instead of 0xFF before this)."""
    return tl.where(x != x, x, x * factor)


@triton.jit
def decode_float(code, FMT: tl.constexpr):
    """int32 codes of minifloat ``FMT`` -> float32, bit-exact with ``FloatFormat.decode``."""
    MBITS: tl.constexpr = fmt_const(FMT, "mbits")
    BIAS: tl.constexpr = fmt_const(FMT, "bias")
    MAG_BITS: tl.constexpr = fmt_const(FMT, "mag_bits")
    MIN_SUB: tl.constexpr = fmt_const(FMT, "min_sub")
    PAYLOAD_SHIFT: tl.constexpr = fmt_const(FMT, "payload_shift")
    mag = code & ((1 << MAG_BITS) - 1)
    e = mag >> MBITS
    m = mag & ((1 << MBITS) - 1)
    normal = ((e - BIAS + 127) << 23) | (m << (23 - MBITS))
    subnormal = (m.to(tl.float32) * MIN_SUB).to(tl.int32, bitcast=True)  # exact: m times a power of two
    bits = tl.where(e == 0, subnormal, normal)
    # NaN: quiet, with the code's mantissa as payload where torch's native float8 cast keeps it
    nan = 0x7FC00000 | ((m << PAYLOAD_SHIFT) & 0x3FFFFF) if PAYLOAD_SHIFT < 32 else 0x7FC00000
    if fmt_const(FMT, "fn"):
        bits = tl.where(mag == fmt_const(FMT, "nan_code"), nan, bits)
    if fmt_const(FMT, "inf"):
        top = e == (1 << fmt_const(FMT, "ebits")) - 1
        bits = tl.where(top, tl.where(m == 0, 0x7F800000, nan), bits)
    if fmt_const(FMT, "signed"):
        bits = bits | (((code >> MAG_BITS) & 1) << 31)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def e2m1_to_e4m3(code):
    """E2M1 codes (int32, 0..15) -> the E4M3 codes of the same values (exact: every E2M1 value is one)."""
    e = (code >> 1) & 3
    m = code & 1
    mag = tl.where(e == 0, m * 0x30, ((e + 6) << 3) | (m << 2))  # 0.5 = E4M3 0x30
    return mag | ((code & 8) << 4)


# ---- E8M0 (MX) scales ----------------------------------------------------------------------
@triton.jit
def e8m0_code(amax, RULE: tl.constexpr, ELEM: tl.constexpr):
    """E8M0 codes (int32) of MX block scales from float32 block amax, as ``mx_scale_codes``."""
    EMAX: tl.constexpr = fmt_const(ELEM, "emax")
    amax_bits = amax.to(tl.int32, bitcast=True)
    bits = amax_bits
    if RULE == "rceil":
        ratio = tl.math.div_rn(amax, fmt_const(ELEM, "max"))  # true division, as torch on CPU
        rbits = ratio.to(tl.int32, bitcast=True)
        exponent = ((rbits >> 23) - 127) + ((rbits & 0x7FFFFF) != 0).to(tl.int32)
        exponent = tl.where(rbits <= 0x00400000, -127, exponent)  # ratio <= 2^-127 (ratio >= 0)
    else:
        if RULE == "even":
            bits = (bits + (1 << (22 - fmt_const(ELEM, "mbits")))) & 0x7F800000
        floor_log2 = (bits >> 23) - 127
        mantissa = bits & 0x7FFFFF
        if RULE == "ceil":
            floor_log2 += (mantissa != 0).to(tl.int32)
        elif RULE == "nearest":
            floor_log2 += (mantissa >= 3474676).to(tl.int32)  # 1 + m / 2^23 > sqrt(2)
        exponent = floor_log2 - EMAX
    code = tl.minimum(tl.maximum(exponent, -127), 127) + 127
    return tl.where((amax_bits & 0x7FFFFFFF) > 0x7F800000, 255, code)  # NaN amax: NaN scale


@triton.jit
def e8m0_factor(code):
    """Encode factor 2^(127 - code) of E8M0 codes (2^-127 for code 254 and for NaN 255), float32."""
    return tl.where(code >= 254, 0x00400000, (254 - code) << 23).to(tl.float32, bitcast=True)


@triton.jit
def e8m0_decode(code):
    """E8M0 codes -> float32 2^(code - 127); code 0 is the float32 subnormal 2^-127, 255 is NaN."""
    bits = tl.where(code == 0, 0x00400000, code << 23)
    return tl.where(code == 255, 0x7FC00000, bits).to(tl.float32, bitcast=True)


@triton.jit
def decode_scale(raw, SFMT: tl.constexpr):
    """Block scales as stored (float32 values, or uint8 E8M0 / E4M3 / UE5M3 codes) -> float32."""
    if SFMT == "fp32":
        return raw.to(tl.float32)
    elif SFMT == "e8m0":
        return e8m0_decode(raw.to(tl.int32))
    else:
        return decode_float(raw.to(tl.int32), SFMT)


@triton.jit
def to_float32(raw, BF16_BITS: tl.constexpr):
    """Loaded input -> float32. BFloat16 arrives as its int16 bits and widens by a shift (exact,
    subnormals included; the interpreter's own bfloat16 cast flushes them)."""
    if BF16_BITS:
        return (raw.to(tl.int32) << 16).to(tl.float32, bitcast=True)
    else:
        return raw.to(tl.float32)


def kernel_input(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(the tensor a kernel loads, whether it is bfloat16 bits): see :func:`to_float32`."""
    if x.dtype == torch.bfloat16:
        return x.view(torch.int16), True
    return x, False


# ---- tiles ---------------------------------------------------------------------------------
@triton.jit
def block_amax(y, ROWS: tl.constexpr, COLS: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    """max |y| of each BLOCK_ROWS x BLOCK_COLS block of y [ROWS, COLS] -> [ROWS // BLOCK_ROWS, COLS // BLOCK_COLS].

    Reduced on the float32 bit patterns: non-negative floats order as integers and NaN (above
    Inf) wins, so NaN propagates as torch.amax does (a float max would drop it on a GPU)."""
    mag = y.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    if BLOCK_ROWS == 1:
        amax = tl.max(tl.reshape(mag, (ROWS, COLS // BLOCK_COLS, BLOCK_COLS)), axis=2)
    else:
        blocks = tl.reshape(mag, (ROWS // BLOCK_ROWS, BLOCK_ROWS, COLS // BLOCK_COLS, BLOCK_COLS))
        amax = tl.max(tl.max(blocks, axis=3), axis=1)
    return amax.to(tl.float32, bitcast=True)


@triton.jit
def expand_blocks(s, ROWS: tl.constexpr, COLS: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    """Per-block values [ROWS // BLOCK_ROWS, COLS // BLOCK_COLS] broadcast to every element, [ROWS, COLS]."""
    if BLOCK_ROWS == 1:
        full = tl.broadcast_to(s[:, :, None], (ROWS, COLS // BLOCK_COLS, BLOCK_COLS))
    else:
        full = tl.broadcast_to(s[:, None, :, None], (ROWS // BLOCK_ROWS, BLOCK_ROWS, COLS // BLOCK_COLS, BLOCK_COLS))
    return tl.reshape(full, (ROWS, COLS))


@triton.jit
def rht_tile(y, r_ptr, ROWS: tl.constexpr, COLS: tl.constexpr, SIZE: tl.constexpr):
    """The random Hadamard transform of every length-SIZE block of y's rows: y_blocks @ R (R = diag(s) H,
    SIZE x SIZE float32 at ``r_ptr``), in float32 FMAs (``input_precision="ieee"``)."""
    offs = tl.arange(0, SIZE)
    r = tl.load(r_ptr + offs[:, None] * SIZE + offs[None, :])
    out = tl.dot(tl.reshape(y, (ROWS * COLS // SIZE, SIZE)), r, input_precision="ieee")
    return tl.reshape(out, (ROWS, COLS))


@triton.jit
def pack_fp4(codes, ROWS: tl.constexpr, COLS: tl.constexpr):
    """[ROWS, COLS] 4-bit codes -> [ROWS, COLS // 2] uint8, element 2i in the low nibble (``pack_fp4``)."""
    low, high = tl.split(tl.reshape(codes & 0xF, (ROWS, COLS // 2, 2)))
    return (low | (high << 4)).to(tl.uint8)


@triton.jit
def store_codes(
    ptr, codes, rows, col_start, n_rows, n_cols, stride, ELEM: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr
):
    """Store a [ROWS, COLS] code tile at rows ``rows``, columns from ``col_start``, of a row-major uint8
    tensor with ``n_cols`` elements a row (FP4: packed two a byte, n_cols / 2 bytes)."""
    if ELEM == "e2m1":
        cols = col_start // 2 + tl.arange(0, COLS // 2)
        mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols // 2)
        tl.store(ptr + rows[:, None] * stride + cols[None, :], pack_fp4(codes, ROWS, COLS), mask=mask)
    else:
        cols = col_start + tl.arange(0, COLS)
        mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
        tl.store(ptr + rows[:, None] * stride + cols[None, :], codes.to(tl.uint8), mask=mask)


@triton.jit
def unpack_fp4(packed, ROWS: tl.constexpr, COLS: tl.constexpr):
    """[ROWS, COLS // 2] uint8 -> [ROWS, COLS] int32 codes (inverse of ``pack_fp4``)."""
    p = packed.to(tl.int32)
    return tl.reshape(tl.join(p & 0xF, (p >> 4) & 0xF), (ROWS, COLS))


@triton.jit
def sr_bits(seed, offsets, SR: tl.constexpr):
    """31 uniform random bits per offset from Philox (``tl.randint``), or 0 without SR."""
    if SR:
        return tl.randint(seed, offsets).to(tl.int32, bitcast=True) & 0x7FFFFFFF
    else:
        return offsets * 0


# ---- launchers' checks ---------------------------------------------------------------------
def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return bool(knobs.runtime.interpret)


def check_device(*tensors: torch.Tensor, what: str) -> None:
    """Kernels run on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1``."""
    for t in tensors:
        if t.device.type == "cuda" or (t.device.type == "cpu" and interpreting()):
            continue
        raise LowbitError(
            f"{what} runs on CUDA tensors (or on CPU with TRITON_INTERPRET=1), got a tensor on {t.device}"
        )


def check_2d(x: torch.Tensor, what: str, dtypes=(torch.float32, torch.bfloat16, torch.float16)) -> None:
    """A 2-D, non-empty tensor of one of ``dtypes``."""
    if not isinstance(x, torch.Tensor) or x.ndim != 2 or x.numel() == 0:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise LowbitError(f"{what} needs a non-empty 2-D tensor, got {shape}; reshape to (rows, cols) first")
    if x.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise LowbitError(f"{what} needs a tensor of dtype {names}, got {x.dtype}")


@functools.lru_cache(maxsize=64)
def hadamard(size: int, seed: int, device: torch.device) -> torch.Tensor:
    """R = diag(s) H of ``lowbit.numerics.random_hadamard`` (same signs from the same seed), float32, cached."""
    return random_hadamard(size, seed, device=device).contiguous()


def rht_matrices(
    row_rht: int, row_rht_seed: int, col_rht: int, col_rht_seed: int, unused: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The (rowwise, colwise) Hadamard matrices a fused kernel reads; a transform that is off gets
    ``unused``, any tensor on the device (the kernel never reads that pointer)."""
    device = unused.device
    r_row = hadamard(row_rht, row_rht_seed, device) if row_rht else unused
    r_col = hadamard(col_rht, col_rht_seed, device) if col_rht else unused
    return r_row, r_col


def quantize_tiles(row_rht: int, col_rht: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_K, num_warps) of a rowwise + colwise block-quantize kernel: 64 x 128 tiles (32 x 64
    in the interpreter), or square tiles of at least 64 that hold whole Hadamard blocks of the transform;
    8 warps where the transform holds a 64 x 64 or larger matrix."""
    block_m = 32 if interpreting() else 64
    block_k = 64 if interpreting() else 128
    if row_rht or col_rht:
        block_m = block_k = max(64, row_rht, col_rht)
    return block_m, block_k, 8 if max(row_rht, col_rht) >= 64 else 4


def check_rht(size: int, what: str) -> None:
    if size not in (0, 16, 32, 64, 128):
        raise LowbitError(f"{what}: fused Hadamard sizes are 16, 32, 64 or 128 (0 = off), got {size}")


def check_rht_pair(op: str, row_rht: int, col_rht: int, shape: tuple[int, int]) -> None:
    """The fused transforms of a rowwise + colwise quantize: valid sizes that divide the blocked dim
    (K for the rowwise output, M for the colwise one)."""
    m, k = shape
    for size, name, dim in ((row_rht, "row_rht", k), (col_rht, "col_rht", m)):
        check_rht(size, f"{op} {name}")
        if size and dim % size:
            raise LowbitError(f"{op}: {name}={size} must divide the blocked dim {dim} of shape {(m, k)}")
