"""The Walsh-Hadamard butterfly and a few eager loops as small C kernels on CPU (an implementation detail,
not an API).

Inductor writes the butterfly as one expression per output lane (``hadamard._butterfly_by_output``), and
so evaluates each lane's whole tree: n - 1 additions and n - 1 sign products an element where the
butterfly needs log2 n additions. That made the RHT the largest quantization cost of the FP4 recipes on
CPU (2048 x 768 BF16: 1.6 ms for n = 16 and 3.0 ms for n = 32, a compiled copy of it 0.2 ms). This kernel
runs the reference's butterfly stage by stage on a tile of blocks held in a buffer, its inner loop
across the tile's independent blocks (the columns of a column layout, the blocks of a row layout), so
the compiler vectorizes it: the same float32 operations in the same order as ``hadamard.rotate_blocks``
(signs, then the stages, then the 1/sqrt(n) product; the inverse: stages, product, signs), so the same
bits. It is built without FMA contraction or fast-math, so nothing is fused or reordered, and the tests
compare it to the eager reference bit for bit on adversarial inputs.

The library holds one more loop: the stochastic-rounding bits of a run of flat indices
(``rounding.hash_bits``: MurmurHash3's finalizer twice, integer arithmetic, so exactly the bits of the
int32 tensor ops), which ``RandomBits.bits`` takes on CPU: eagerly, the hash's ~20 tensor ops a chunk
were the largest cost of an eager SR quantization (the compiled kernels hash inside their own loops).
Eager minifloat codes come from two more loops: ``_fast.encode``'s arithmetic (clamp to max, the binade,
the scaled magnitude rounded to nearest even or stochastically by the given bits, the code's fields and
sign) in one vectorized pass instead of ~10 tensor ops, and the decode by the fields (normal codes' fields
moved into float32's, subnormals' mantissas times a power of two; Inf/NaN codes take the reference
decode's values from a table), so every code's value is the reference's, bit for bit (tested on every
code and on inputs around every grid point, both roundings).

And one more: the error sums of quantization health (``error._error_sums``: sum x², sum (q - x)², the
underflowed and non-zero counts, max |q - x|, in double) in one pass over x and q, where the tensor ops
make six float64 passes: each thread sums fixed chunks in 8 lanes and the chunks are added in order,
so the sums do not depend on the thread count (their order differs from torch's, as the compiled
kernel's does: the SNR may differ in its last digits; the counts and the max are exact).

Compiled once per machine with the system C compiler (the one inductor's CPU kernels need too) into
inductor's cache directory, keyed by the source, the flags and the CPU's feature flags, and loaded with
ctypes. Where it cannot be built or does not apply (no compiler, a dtype other than float32/BFloat16,
a non-contiguous input), the functions return None and the callers take the compiled path or the tensor
ops (``LOWBIT_NATIVE=0`` turns the library off).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

__all__ = ["decode_float", "encode_float", "error_sums", "rotate_blocks", "rotate_columns", "sr_bits"]

_SOURCE = r"""
#include <stdint.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#define TILE 64

static inline float from_bf16(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* Element (g, i, c) of x and y lies at g * gs + i * ls + c * cs: G groups of n lanes (a block is the n
   lanes of one (g, c)) and C blocks side by side. y = butterfly over the lanes of (x * signs) * scale,
   or with inverse, (butterfly of x * scale) * signs: rotate_blocks / unrotate_blocks of every block. */
void lowbit_fwht(const void *x, int bf16, const float *signs, float *y, int64_t G, int64_t n, int64_t C,
                 int64_t gs, int64_t ls, int64_t cs, float scale, int inverse, int threads) {
    int64_t chunks = (C + TILE - 1) / TILE;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < G * chunks; t++) {
        float buf[n * TILE];
        int64_t g = t / chunks, c0 = (t % chunks) * TILE;
        int64_t w = C - c0 < TILE ? C - c0 : TILE;
        int64_t at = g * gs + c0 * cs;
        if (ls == 1) { /* a row layout: each block's lanes are contiguous, read them in order */
            if (bf16) {
                const uint16_t *p = (const uint16_t *)x + at;
                for (int64_t c = 0; c < w; c++)
                    for (int64_t i = 0; i < n; i++) buf[i * TILE + c] = from_bf16(p[c * cs + i]);
            } else {
                const float *p = (const float *)x + at;
                for (int64_t c = 0; c < w; c++)
                    for (int64_t i = 0; i < n; i++) buf[i * TILE + c] = p[c * cs + i];
            }
        } else {
            for (int64_t i = 0; i < n; i++) {
                float *row = buf + i * TILE;
                if (bf16) {
                    const uint16_t *p = (const uint16_t *)x + at + i * ls;
                    for (int64_t c = 0; c < w; c++) row[c] = from_bf16(p[c * cs]);
                } else {
                    const float *p = (const float *)x + at + i * ls;
                    for (int64_t c = 0; c < w; c++) row[c] = p[c * cs];
                }
            }
        }
        if (!inverse)
            for (int64_t i = 0; i < n; i++) {
                float s = signs[i], *row = buf + i * TILE;
                for (int64_t c = 0; c < w; c++) row[c] = row[c] * s;
            }
        for (int64_t h = 1; h < n; h *= 2)
            for (int64_t start = 0; start < n; start += 2 * h)
                for (int64_t i = start; i < start + h; i++) {
                    float *a = buf + i * TILE, *b = buf + (i + h) * TILE;
                    for (int64_t c = 0; c < w; c++) {
                        float u = a[c], v = b[c];
                        a[c] = u + v;
                        b[c] = u - v;
                    }
                }
        for (int64_t i = 0; i < n; i++) {
            float s = inverse ? signs[i] : 1.0f, *row = buf + i * TILE;
            if (inverse)
                for (int64_t c = 0; c < w; c++) row[c] = (row[c] * scale) * s;
            else
                for (int64_t c = 0; c < w; c++) row[c] = row[c] * scale;
        }
        if (ls == 1) {
            for (int64_t c = 0; c < w; c++)
                for (int64_t i = 0; i < n; i++) y[at + c * cs + i] = buf[i * TILE + c];
        } else {
            for (int64_t i = 0; i < n; i++)
                for (int64_t c = 0; c < w; c++) y[at + i * ls + c * cs] = buf[i * TILE + c];
        }
    }
}

static inline uint32_t fmix32(uint32_t h) {
    h ^= h >> 16;
    h *= 0x85EBCA6Bu;
    h ^= h >> 13;
    h *= 0xC2B2AE35u;
    return h ^ (h >> 16);
}

/* rounding.hash_bits of the int32 indices offset, offset + 1, ..., offset + n - 1 (each index taken mod
   2^32, as torch's int64 -> int32 cast): the SR bits of n elements, unsigned arithmetic mod 2^32 as the
   int32 tensor ops compute it (their shifts masked to be logical). */
void lowbit_sr_bits(int64_t offset, int64_t n, uint32_t k0, uint32_t k1, int32_t *out, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t i = 0; i < n; i++)
        out[i] = (int32_t)(fmix32(fmix32((uint32_t)(offset + i) + k0) ^ k1) & 0x7FFFFFFFu);
}

/* _fast.encode of a signed minifloat of `bits` bits (1 + ebits + mbits <= 8) for finite float32 x, saturating:
   the magnitude clamped to max, its binade field (b + 127) << 23 with b = max(float32 exponent, emin), the
   magnitude times 2^(mbits - b) rounded to an integer i (to nearest even; with `sr`, up where
   sr[k] < floor(frac * 2^31)), the code ((b - emin) << mbits) + i with x's sign bit on top: the tensor ops'
   float32 operations in the same order, so the same codes. */
void lowbit_encode_float(const float *x, int64_t n, int bits, int mbits, int emin, float maxv, const int32_t *sr,
                         uint8_t *out, int threads) {
    const int32_t emin_field = (emin + 127) << 23, offset = (emin + 127) << mbits;
    const uint32_t sign_mask = 1u << (bits - 1);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t k = 0; k < n; k++) {
        float v = x[k], m = fabsf(v);
        m = m < maxv ? m : maxv;
        uint32_t u, mu;
        memcpy(&u, &v, sizeof u);
        memcpy(&mu, &m, sizeof mu);
        int32_t field = (int32_t)(mu & 0x7F800000u);
        field = field < emin_field ? emin_field : field;
        int32_t inv_bits = ((mbits + 254) << 23) - field;
        float inv, r;
        memcpy(&inv, &inv_bits, sizeof inv);
        float y = m * inv;
        if (sr != NULL) {
            float f = floorf(y), frac = y - f;
            r = f + (sr[k] < (int32_t)floorf(frac * 2147483648.0f) ? 1.0f : 0.0f);
        } else {
            r = rintf(y); /* the default rounding mode: to nearest, ties to even */
        }
        int32_t code = (field >> (23 - mbits)) + (int32_t)r - offset;
        out[k] = (uint8_t)((uint32_t)code | ((u >> (32 - bits)) & sign_mask));
    }
}

/* Decode codes (taken mod 2^bits) of a signed minifloat of `bits` bits (bias, mbits): a normal code's exponent
   and mantissa fields moved into float32's, a subnormal's mantissa times 2^(1 - bias - mbits) (exact), x's
   sign on top; codes whose magnitude is first_special or above (Inf, NaN; 0: none) take their value from
   `table` (every code's value, the reference decode) in a second pass, which runs only where one occurs. */
void lowbit_decode_float(const uint8_t *codes, int64_t n, int bits, int mbits, int bias, int first_special,
                         const float *table, float *out, int threads) {
    const uint32_t code_mask = bits >= 8 ? 0xFFu : (1u << bits) - 1, mag_mask = (1u << (bits - 1)) - 1;
    const uint32_t man_mask = (1u << mbits) - 1;
    float sub_scale;
    int32_t sub_bits = (127 + 1 - bias - mbits) << 23;
    memcpy(&sub_scale, &sub_bits, sizeof sub_scale);
    const uint32_t first = first_special ? (uint32_t)first_special : 256u; /* 256: no magnitude reaches it */
    int64_t special = 0;
#pragma omp parallel for num_threads(threads) schedule(static) reduction(+ : special) firstprivate(sub_scale)
    for (int64_t k = 0; k < n; k++) {
        uint32_t c = codes[k] & code_mask, mag = c & mag_mask, e = mag >> mbits, m = mag & man_mask;
        uint32_t normal = ((e + 127 - bias) << 23) | (m << (23 - mbits)), sub;
        float subnormal = (float)(int32_t)m * sub_scale; /* exact: a small integer times a power of two */
        memcpy(&sub, &subnormal, sizeof sub);
        uint32_t is_normal = 0u - (uint32_t)(e != 0); /* select without a branch, so the loop vectorizes */
        uint32_t vb = (normal & is_normal) | (sub & ~is_normal) | ((c >> (bits - 1)) << 31);
        memcpy(out + k, &vb, sizeof vb);
        special += mag >= first;
    }
    if (special)
        for (int64_t k = 0; k < n; k++) {
            uint32_t c = codes[k] & code_mask;
            if ((c & mag_mask) >= first) out[k] = table[c];
        }
}

/* error.py's _error_sums of n elements: sum x^2 and sum (q - x)^2 in double, the counts of non-zero x and
   of non-zero x whose q is zero (x + (q - x) == 0 in double, as the tensor ops test it), max |q - x| (NaN
   where any difference is NaN); x float32 or BFloat16, q float32. Fixed chunks, each summed in 8 lanes,
   the chunks' partial sums then added in order: the same result for any number of threads. */
#define ECHUNK 32768
void lowbit_error_sums(const void *x, int bf16, const float *q, int64_t n, double *sums, int64_t *counts,
                       int threads) {
    int64_t chunks = (n + ECHUNK - 1) / ECHUNK;
    double (*part)[3] = malloc(sizeof(double[3]) * (chunks > 0 ? chunks : 1));
    int64_t (*cnt)[3] = malloc(sizeof(int64_t[3]) * (chunks > 0 ? chunks : 1));
    if (part == NULL || cnt == NULL) {
        free(part);
        free(cnt);
        sums[0] = NAN; /* the caller takes the tensor ops */
        counts[0] = -1;
        return;
    }
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t k = 0; k < chunks; k++) {
        double s[8] = {0}, e2[8] = {0}, m[8] = {0};
        int64_t z[8] = {0}, u[8] = {0}, bad = 0;
        int64_t lo = k * ECHUNK, hi = lo + ECHUNK < n ? lo + ECHUNK : n;
        for (int64_t i = lo; i < hi; i += 8) {
            int64_t w = hi - i < 8 ? hi - i : 8;
            for (int64_t j = 0; j < w; j++) {
                double r = bf16 ? (double)from_bf16(((const uint16_t *)x)[i + j]) : (double)((const float *)x)[i + j];
                double e = (double)q[i + j] - r;
                double a = e < 0 ? -e : e;
                int64_t nz = r != 0;
                s[j] += r * r;
                e2[j] += e * e;
                z[j] += nz;
                u[j] += nz & (r + e == 0);
                m[j] = a > m[j] ? a : m[j];
                bad |= a != a;
            }
        }
        double ss = 0, ee = 0, mm = 0;
        int64_t zz = 0, uu = 0;
        for (int j = 0; j < 8; j++) {
            ss += s[j];
            ee += e2[j];
            zz += z[j];
            uu += u[j];
            mm = m[j] > mm ? m[j] : mm;
        }
        part[k][0] = ss;
        part[k][1] = ee;
        part[k][2] = mm;
        cnt[k][0] = zz;
        cnt[k][1] = uu;
        cnt[k][2] = bad;
    }
    double ss = 0, ee = 0, mm = 0;
    int64_t zz = 0, uu = 0, bad = 0;
    for (int64_t k = 0; k < chunks; k++) {
        ss += part[k][0];
        ee += part[k][1];
        mm = part[k][2] > mm ? part[k][2] : mm;
        zz += cnt[k][0];
        uu += cnt[k][1];
        bad |= cnt[k][2];
    }
    free(part);
    free(cnt);
    sums[0] = ss;
    sums[1] = ee;
    sums[2] = bad ? (double)NAN : mm;
    counts[0] = uu;
    counts[1] = zz;
}
"""

_FLAGS = ("-O3", "-march=native", "-fPIC", "-shared", "-ffp-contract=off", "-fno-fast-math", "-std=c11")
_MAX_LANES = 256  # the largest RHT size: the tile buffer is lanes x 64 floats on the stack
# Blocks along rows are transposed into the tile and back, which costs more than inductor's kernel saves
# for 16 lanes (2048 x 768 BF16: 0.7 ms against 0.6 ms); from 32 lanes on the kernel is faster (0.8 against 1.9)
_MIN_ROW_LANES = 32


# each function's argument types, a letter an argument: p pointer, l int64, i int, f float, u uint32
_CTYPES = {"p": ctypes.c_void_p, "l": ctypes.c_int64, "i": ctypes.c_int, "f": ctypes.c_float, "u": ctypes.c_uint32}
_SIGNATURES = {
    "lowbit_fwht": "pippllllllfii",
    "lowbit_sr_bits": "lluupi",
    "lowbit_encode_float": "pliiifppi",
    "lowbit_decode_float": "pliiiippi",
    "lowbit_error_sums": "piplppi",
}


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return ""


def _build(compiler: str, openmp: bool, target: Path) -> bool:
    """Compile the source into ``target`` (written whole or not at all); whether it worked."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src, out = Path(tmp) / "fwht.c", Path(tmp) / "fwht.so"
        src.write_text(_SOURCE)
        cmd = [compiler, *_FLAGS, *(("-fopenmp",) if openmp else ()), str(src), "-o", str(out)]
        if subprocess.run(cmd, capture_output=True, check=False).returncode != 0:
            return False
        os.replace(out, target)  # atomic: a concurrent process sees the old file or the whole new one
    return True


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The built kernel, or None where it cannot be built or loaded here."""
    if os.environ.get("LOWBIT_NATIVE", "1") == "0":
        return None
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        return None
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    key = hashlib.sha256("\0".join((_SOURCE, *_FLAGS, compiler, _cpu_flags())).encode()).hexdigest()[:20]
    folder = Path(cache_dir()) / "lowbit"
    for openmp in (True, False):  # a compiler without OpenMP: one thread, the same numbers
        path = folder / f"fwht-{key}-{'omp' if openmp else 'serial'}.so"
        try:
            if path.is_file() or _build(compiler, openmp, path):
                lib = ctypes.CDLL(str(path))
                break
        except OSError:
            continue
    else:
        return None
    for name, signature in _SIGNATURES.items():
        function = getattr(lib, name)
        function.restype = None
        function.argtypes = [_CTYPES[letter] for letter in signature]
    return lib


def _run(x: torch.Tensor, signs: torch.Tensor, inverse: bool, layout: tuple[int, ...]) -> torch.Tensor | None:
    lib = _library() if x.device.type == "cpu" else None
    if lib is None or x.dtype not in (torch.float32, torch.bfloat16) or not x.is_contiguous():
        return None
    n = signs.numel()
    signs = signs.detach().to(torch.float32).contiguous()
    if signs.device.type != "cpu" or n > _MAX_LANES:
        return None
    x = x.detach()
    y = torch.empty(x.shape, dtype=torch.float32)
    scale = 1.0 / math.sqrt(n)  # the Python float ``_hadamard`` multiplies by (ctypes rounds it to float32)
    args = (x.data_ptr(), int(x.dtype == torch.bfloat16), signs.data_ptr(), y.data_ptr(), *layout)
    lib.lowbit_fwht(*args, scale, int(inverse), torch.get_num_threads())
    return y


def rotate_columns(x: torch.Tensor, signs: torch.Tensor, inverse: bool = False) -> torch.Tensor | None:
    """``hadamard.rotate_columns`` (``unrotate_columns`` with ``inverse``) of contiguous (N, C) float32 or
    BFloat16 ``x``, float32 (N, C), same bits; None where the kernel does not apply."""
    n = signs.numel()
    if x.dim() != 2 or x.shape[0] % n:
        return None
    rows, cols = x.shape
    return _run(x, signs, inverse, (rows // n, n, cols, n * cols, cols, 1))


def rotate_blocks(
    blocks: torch.Tensor, signs: torch.Tensor, inverse: bool = False, narrow: bool = False
) -> torch.Tensor | None:
    """``hadamard.rotate_blocks`` (``unrotate_blocks`` with ``inverse``) of contiguous (M, n) float32 or
    BFloat16 blocks, float32 (M, n), same bits; None where the kernel does not apply (or, below 32
    lanes, is not faster than the compiled kernel; ``narrow``: there too, for a caller that would
    otherwise run the eager butterfly)."""
    n = signs.numel()
    if blocks.dim() != 2 or blocks.shape[1] != n or (n < _MIN_ROW_LANES and not narrow):
        return None
    return _run(blocks, signs, inverse, (1, n, blocks.shape[0], 0, 1, n))


def sr_bits(offset: int, n: int, keys: torch.Tensor) -> torch.Tensor | None:
    """``rounding.hash_bits`` of the flat indices offset .. offset + n - 1 under ``keys`` (int32 (2,)), an
    int32 tensor (n,) with the same bits; None where the kernel does not run (not CPU, not built)."""
    lib = _library() if keys.device.type == "cpu" else None
    if lib is None:
        return None
    k0, k1 = (int(k) & 0xFFFFFFFF for k in keys.tolist())
    out = torch.empty(n, dtype=torch.int32)
    lib.lowbit_sr_bits(int(offset), int(n), k0, k1, out.data_ptr(), torch.get_num_threads())
    return out


def error_sums(x: torch.Tensor, q: torch.Tensor) -> tuple[float, float, int, int, float] | None:
    """``error._error_sums`` of flat ``x`` (float32 or BFloat16) against flat float32 ``q``: sum x², sum
    (q - x)², the underflowed and non-zero counts, max |q - x|, as Python numbers (the counts and the max
    exact, the sums in the kernel's fixed order); None where the kernel does not run."""
    lib = _library() if x.device.type == "cpu" and q.device.type == "cpu" else None
    if lib is None or x.dtype not in (torch.float32, torch.bfloat16) or q.dtype != torch.float32:
        return None
    if x.dim() != 1 or q.shape != x.shape or not (x.is_contiguous() and q.is_contiguous()):
        return None
    sums, counts = torch.empty(3, dtype=torch.float64), torch.empty(2, dtype=torch.int64)
    x, q = x.detach(), q.detach()
    lib.lowbit_error_sums(
        x.data_ptr(),
        int(x.dtype == torch.bfloat16),
        q.data_ptr(),
        x.numel(),
        sums.data_ptr(),
        counts.data_ptr(),
        torch.get_num_threads(),
    )
    signal, noise, max_abs = sums.tolist()
    underflowed, nonzero = counts.tolist()
    if underflowed < 0:  # the kernel could not allocate its partial sums
        return None
    return signal, noise, underflowed, nonzero, max_abs


def encode_float(x: torch.Tensor, bits: int, mbits: int, emin: int, max_value: float, sr: torch.Tensor | None):
    """``_fast.encode``'s codes (uint8, x's shape) of finite float32 ``x`` for a signed minifloat of
    ``bits`` bits, ``mbits`` mantissa bits and minimum exponent ``emin``, saturating at ``max_value``,
    rounded to nearest even or, with ``sr`` (int32 bits of x's elements), stochastically; None where
    the kernel does not run."""
    lib = _library() if x.device.type == "cpu" else None
    if lib is None or x.dtype != torch.float32 or not x.is_contiguous() or bits > 8:
        return None
    if sr is not None and (sr.dtype != torch.int32 or sr.shape != x.shape or not sr.is_contiguous()):
        return None
    out = torch.empty(x.shape, dtype=torch.uint8)
    sr_ptr = None if sr is None else sr.data_ptr()
    lib.lowbit_encode_float(
        x.data_ptr(), x.numel(), bits, mbits, emin, max_value, sr_ptr, out.data_ptr(), torch.get_num_threads()
    )
    return out


def decode_float(codes: torch.Tensor, bits: int, mbits: int, bias: int, first_special: int, table: torch.Tensor):
    """float32 values of uint8 ``codes`` of a signed minifloat (``bits``, ``mbits``, exponent ``bias``;
    magnitudes from ``first_special`` on are Inf/NaN, 0: none), one pass; ``table``: every code's float32
    value (256: code mod 2^bits), which the Inf/NaN codes take; None where the kernel does not run."""
    lib = _library() if codes.device.type == "cpu" else None
    if lib is None or codes.dtype != torch.uint8 or not codes.is_contiguous() or not 2 <= bits <= 8:
        return None
    if table.dtype != torch.float32 or table.shape != (256,) or not table.is_contiguous():
        return None
    out = torch.empty(codes.shape, dtype=torch.float32)
    args = (codes.data_ptr(), codes.numel(), bits, mbits, bias, first_special, table.data_ptr(), out.data_ptr())
    lib.lowbit_decode_float(*args, torch.get_num_threads())
    return out
