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

The block kernels run eager quantization on CPU in whole-tensor passes (``quantize``, ``dequantize``,
``fake_quantize``; the chunked tensor ops made ~100 copies of a 2048 x 2048 tensor's chunks a call):
every block's max |x| or min and max, from the float bits (an integer max, which vectorizes; a block
with a NaN or an Inf is left to the tensor ops); the block scales from finite amax (E8M0 by each MX rule,
a minifloat scale format with NVFP4's global scale, FP32 current scaling); the elements times their
block's factor (plus a zero point) coded as above or as integers, with the SR bits hashed in place,
and optionally their decoded values unscaled; and the decode and unscale of codes. Each step over a
tile is its own loop without a flag tested inside (one such flag made the scale loop ten times slower).

Compiled once per machine with the system C compiler (the one inductor's CPU kernels need too) into
inductor's cache directory, keyed by the source, the flags and the CPU's feature flags, and loaded with
ctypes. Where it cannot be built or does not apply (no compiler, a dtype other than float32/BFloat16,
a non-contiguous input), the functions return None and the callers take the compiled path or the tensor
ops (``LOWBIT_NATIVE=0`` turns the library off).
"""

from __future__ import annotations

import ctypes
import functools
import getpass
import hashlib
import math
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import NamedTuple

import torch

__all__ = [
    "Codec",
    "block_extrema",
    "block_scales",
    "decode_blocks",
    "decode_float",
    "encode_float",
    "error_sums",
    "quantize_blocks",
    "quantize_fused",
    "rotate_blocks",
    "rotate_columns",
    "sr_bits",
]

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

/* The code of finite float32 v in a signed minifloat of `bits` bits (1 + ebits + mbits <= 8), saturating
   (_fast.encode): the magnitude clamped to max, its binade field (b + 127) << 23 with b = max(float32
   exponent, emin), the magnitude times 2^(mbits - b) rounded to an integer i (to nearest even; with `sr`, up
   where bit < floor(frac * 2^31)), the code ((b - emin) << mbits) + i with v's sign bit on top: the tensor
   ops' float32 operations in the same order, so the same codes. */
static inline uint8_t minifloat_code(float v, int bits, int mbits, int emin, float maxv, int sr, int32_t bit) {
    const int32_t emin_field = (emin + 127) << 23, offset = (emin + 127) << mbits;
    float m = fabsf(v);
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
    if (sr) {
        float f = floorf(y), frac = y - f;
        r = f + (bit < (int32_t)floorf(frac * 2147483648.0f) ? 1.0f : 0.0f);
    } else {
        r = rintf(y); /* the default rounding mode: to nearest, ties to even */
    }
    int32_t code = (field >> (23 - mbits)) + (int32_t)r - offset;
    return (uint8_t)((uint32_t)code | ((u >> (32 - bits)) & (1u << (bits - 1))));
}

/* The code (two's complement, in a byte) of finite float32 v in a signed integer format [qmin, qmax]
   (_fast._round's integer case): to nearest even, or with `sr` the magnitude clamped to -qmin rounded up
   where bit < floor(frac * 2^31) and v's sign put back; then clamped to [qmin, qmax]. */
static inline uint8_t integer_code(float v, int qmin, int qmax, int sr, int32_t bit) {
    float r;
    if (sr) {
        float m = fabsf(v), limit = (float)-qmin;
        m = m < limit ? m : limit;
        float f = floorf(m), frac = m - f;
        r = copysignf(f + (bit < (int32_t)floorf(frac * 2147483648.0f) ? 1.0f : 0.0f), v);
    } else {
        r = rintf(v);
    }
    r = r < (float)qmin ? (float)qmin : r;
    r = r > (float)qmax ? (float)qmax : r;
    return (uint8_t)(int8_t)(int32_t)r;
}

/* _fast.encode of a minifloat for finite float32 x (see minifloat_code); sr: the bits of each element, or NULL. */
void lowbit_encode_float(const float *x, int64_t n, int bits, int mbits, int emin, float maxv, const int32_t *sr,
                         uint8_t *out, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t k = 0; k < n; k++) out[k] = minifloat_code(x[k], bits, mbits, emin, maxv, sr != NULL, sr ? sr[k] : 0);
}

/* The value of a minifloat code (taken mod 2^bits) of `bits` bits (bias, mbits) that is not Inf or NaN: the
   exponent and mantissa fields moved into float32's, a subnormal's mantissa times 2^(1 - bias - mbits)
   (exact: a small integer times a power of two), the sign on top; without a branch, so loops vectorize. */
static inline float minifloat_value(uint32_t code, int bits, int mbits, int bias) {
    const uint32_t code_mask = bits >= 8 ? 0xFFu : (1u << bits) - 1, mag_mask = (1u << (bits - 1)) - 1;
    const uint32_t man_mask = (1u << mbits) - 1;
    float sub_scale, value;
    int32_t sub_bits = (127 + 1 - bias - mbits) << 23;
    memcpy(&sub_scale, &sub_bits, sizeof sub_scale);
    uint32_t c = code & code_mask, mag = c & mag_mask, e = mag >> mbits, m = mag & man_mask;
    uint32_t normal = ((e + 127 - bias) << 23) | (m << (23 - mbits)), sub;
    float subnormal = (float)(int32_t)m * sub_scale;
    memcpy(&sub, &subnormal, sizeof sub);
    uint32_t is_normal = 0u - (uint32_t)(e != 0);
    uint32_t vb = (normal & is_normal) | (sub & ~is_normal) | ((c >> (bits - 1)) << 31);
    memcpy(&value, &vb, sizeof value);
    return value;
}

/* The values of n codes of a minifloat (integer = 0: bits, mbits, bias; magnitudes from first_special on are
   Inf/NaN, 0: none) or of a signed integer's codes (integer = 1, two's complement bytes): minifloat_value,
   then the codes of Inf/NaN take their value from `table` (every code's value, the reference decode) in a
   second pass, which runs only where one occurs. */
static void decode_codes(const uint8_t *codes, int64_t n, int integer, int bits, int mbits, int bias, int first_special,
                         const float *table, float *out) {
    if (integer) {
        for (int64_t k = 0; k < n; k++) out[k] = (float)(int8_t)codes[k];
        return;
    }
    const uint32_t code_mask = bits >= 8 ? 0xFFu : (1u << bits) - 1, mag_mask = (1u << (bits - 1)) - 1;
    const uint32_t first = first_special ? (uint32_t)first_special : 256u; /* 256: no magnitude reaches it */
    int64_t special = 0;
    for (int64_t k = 0; k < n; k++) {
        out[k] = minifloat_value(codes[k], bits, mbits, bias);
        special += (codes[k] & mag_mask) >= first;
    }
    if (special)
        for (int64_t k = 0; k < n; k++) {
            uint32_t c = codes[k] & code_mask;
            if ((c & mag_mask) >= first) out[k] = table[c];
        }
}

/* Decode n codes of a signed minifloat (see decode_codes), in chunks across threads. */
void lowbit_decode_float(const uint8_t *codes, int64_t n, int bits, int mbits, int bias, int first_special,
                         const float *table, float *out, int threads) {
    int64_t chunks = (n + 65535) / 65536;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < chunks; t++) {
        int64_t lo = t * 65536, w = n - lo < 65536 ? n - lo : 65536;
        decode_codes(codes + lo, w, 0, bits, mbits, bias, first_special, table, out + lo);
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

/* Blocks of B block rows, each r rows of C = nb * c elements: element (b, i, j, k) lies at
   (b * r + i) * C + j * c + k, block (b, j)'s scale, encode factor and zero point at b * fb + j * fj
   (fb = fj = 0: one for the whole tensor). x float32 or BFloat16 (bf16 = 1). */

static inline uint32_t bits_at(const void *x, int bf16, int64_t k) {
    if (bf16) return (uint32_t)((const uint16_t *)x)[k] << 16;
    uint32_t u;
    memcpy(&u, (const float *)x + k, sizeof u);
    return u;
}

/* A negative float's bits with their low 31 flipped order as signed integers as the floats do (-0 just
   below +0); the map is its own inverse. */
static inline int32_t ordered(uint32_t u) { return (int32_t)(u ^ ((uint32_t)((int32_t)u >> 31) & 0x7FFFFFFFu)); }

/* The largest |x| bits of top and the c elements from at (one loop per dtype, no flag tested inside). */
static inline uint32_t absmax_bits(const void *x, int bf16, int64_t at, int64_t c, uint32_t top) {
    if (bf16)
        for (int64_t k = 0; k < c; k++) {
            uint32_t a = bits_at(x, 1, at + k) & 0x7FFFFFFFu;
            top = a > top ? a : top;
        }
    else
        for (int64_t k = 0; k < c; k++) {
            uint32_t a = bits_at(x, 0, at + k) & 0x7FFFFFFFu;
            top = a > top ? a : top;
        }
    return top;
}

/* Every block's max |x| (with minmax: min x into out0 and max x into out1), float32, from the bits: the bits
   of |x| order as its values, and ordered(x) as x. Into bad[0] the number of blocks holding a NaN or an
   Inf, whose results mean nothing (the caller takes the tensor ops for them, which say which NaN). */
void lowbit_block_extrema(const void *x, int bf16, int64_t B, int64_t r, int64_t C, int64_t c, int minmax,
                          float *out0, float *out1, int64_t *bad, int threads) {
    int64_t nb = C / c, nonfinite = 0;
#pragma omp parallel for num_threads(threads) schedule(static) reduction(+ : nonfinite)
    for (int64_t b = 0; b < B; b++)
        for (int64_t j = 0; j < nb; j++) {
            uint32_t top = 0;
            int32_t lo = INT32_MAX, hi = INT32_MIN;
            for (int64_t i = 0; i < r; i++) { /* one loop per case: a flag tested inside made it slower */
                int64_t at = (b * r + i) * C + j * c;
                if (bf16 && minmax)
                    for (int64_t k = 0; k < c; k++) {
                        uint32_t u = bits_at(x, 1, at + k), a = u & 0x7FFFFFFFu;
                        int32_t o = ordered(u);
                        top = a > top ? a : top;
                        lo = o < lo ? o : lo;
                        hi = o > hi ? o : hi;
                    }
                else if (minmax)
                    for (int64_t k = 0; k < c; k++) {
                        uint32_t u = bits_at(x, 0, at + k), a = u & 0x7FFFFFFFu;
                        int32_t o = ordered(u);
                        top = a > top ? a : top;
                        lo = o < lo ? o : lo;
                        hi = o > hi ? o : hi;
                    }
                else
                    top = absmax_bits(x, bf16, at, c, top);
            }
            nonfinite += top >= 0x7F800000u;
            uint32_t first = minmax ? (uint32_t)ordered((uint32_t)lo) : top, second = (uint32_t)ordered((uint32_t)hi);
            memcpy(out0 + b * nb + j, &first, sizeof first);
            if (minmax) memcpy(out1 + b * nb + j, &second, sizeof second);
        }
    bad[0] = nonfinite;
}

/* Block scales from n finite block amax (blocks.py, _fast.e8m0_scales): decode scales, encode factors and,
   but for FP32 scales, the scales' codes.
   kind 0, E8M0 (mx_scale_codes): rule 0 floor, 1 ceil, 2 even (amax rounded to the element's `mbits`
   first), 3 nearest (log2 rounded), 4 rceil (ceil log2 of amax / elem_max); the exponent less the element's
   `emax`, clamped to [-127, 127]; decode 2^e and factor 2^-e from the bits (2^-127 the subnormal 1 << 22).
   kind 1, a signed minifloat scale format (sbits, smbits, semin, sbias, smax; lowp_block_scales): the target
   amax / elem_max, or with a global encode scale g, amax * (g * (1 / elem_max)) clamped to FLT_MAX, coded
   to nearest even, saturating; factor 1 / s or 1 / (s * (1 / g)), clamped to FLT_MAX.
   kind 2, FP32 (fp32_scales, current_scale): factor target / amax clamped to FLT_MAX, 1 for amax 0, its
   mantissa cleared with pow2; decode 1 / factor. */
#define FLT_MAX_F 3.40282346638528859812e+38F
/* The E8M0 code of an exponent e (clamped to [-127, 127]), its decode scale 2^e and encode factor 2^-e. */
static inline void e8m0_of(int32_t e, int64_t k, float *decode, float *factor, uint8_t *codes) {
    e = e < -127 ? -127 : (e > 127 ? 127 : e);
    int32_t c = e + 127, db = c << 23, fb = (254 - c) << 23;
    db = db < (1 << 22) ? (1 << 22) : db;
    fb = fb < (1 << 22) ? (1 << 22) : fb;
    memcpy(decode + k, &db, sizeof db);
    memcpy(factor + k, &fb, sizeof fb);
    codes[k] = (uint8_t)c;
}

static inline int32_t bits_of(float v) {
    int32_t bits;
    memcpy(&bits, &v, sizeof bits);
    return bits;
}

/* One loop per rule (a rule chosen inside the loop made it ten times slower). */
static void e8m0_scales(const float *amax, int64_t n, int rule, int emax, int mbits, float elem_max, float *decode,
                        float *factor, uint8_t *codes) {
    const int32_t half = 1 << (23 - mbits - 1);
    switch (rule) {
    case 0: /* floor */
        for (int64_t k = 0; k < n; k++) e8m0_of((bits_of(amax[k]) >> 23) - 127 - emax, k, decode, factor, codes);
        break;
    case 1: /* ceil */
        for (int64_t k = 0; k < n; k++) {
            int32_t b = bits_of(amax[k]);
            e8m0_of((b >> 23) - 127 + ((b & 0x7FFFFF) != 0) - emax, k, decode, factor, codes);
        }
        break;
    case 2: /* even: amax rounded to the element's mantissa bits (half up on the bits) first */
        for (int64_t k = 0; k < n; k++)
            e8m0_of((((bits_of(amax[k]) + half) & 0x7F800000) >> 23) - 127 - emax, k, decode, factor, codes);
        break;
    case 3: /* nearest: log2 rounded */
        for (int64_t k = 0; k < n; k++) {
            int32_t b = bits_of(amax[k]);
            e8m0_of((b >> 23) - 127 + ((b & 0x7FFFFF) >= 3474676) - emax, k, decode, factor, codes);
        }
        break;
    default: /* rceil: ceil log2 of amax / elem_max; -127 for a ratio of 2^-127 or less */
        for (int64_t k = 0; k < n; k++) {
            int32_t rb = bits_of(amax[k] / elem_max);
            e8m0_of(rb <= (1 << 22) ? -127 : ((rb >> 23) - 127) + ((rb & 0x7FFFFF) != 0), k, decode, factor, codes);
        }
    }
}

/* The scale's code and value for target t, and its encode factor 1 / (d * inv_g) (inv_g = 1: 1 / d). */
static inline void minifloat_scale_of(float t, float inv_g, int global, int64_t k, int sbits, int smbits, int semin,
                                      int sbias, float smax, float *decode, float *factor, uint8_t *codes) {
    uint8_t c = minifloat_code(t, sbits, smbits, semin, smax, 0, 0);
    float d = minifloat_value(c, sbits, smbits, sbias);
    float f = global ? 1.0f / (d * inv_g) : 1.0f / d;
    decode[k] = d;
    factor[k] = f < FLT_MAX_F ? f : FLT_MAX_F;
    codes[k] = c;
}

static void minifloat_scales(const float *amax, int64_t n, float elem_max, int sbits, int smbits, int semin, int sbias,
                             float smax, int has_global, float g, float *decode, float *factor, uint8_t *codes) {
    const float inv_g = 1.0f / g, g_emax = g * (1.0f / elem_max);
    if (has_global)
        for (int64_t k = 0; k < n; k++) {
            float t = amax[k] * g_emax;
            t = t < FLT_MAX_F ? t : FLT_MAX_F;
            minifloat_scale_of(t, inv_g, 1, k, sbits, smbits, semin, sbias, smax, decode, factor, codes);
        }
    else
        for (int64_t k = 0; k < n; k++)
            minifloat_scale_of(amax[k] / elem_max, 1.0f, 0, k, sbits, smbits, semin, sbias, smax, decode, factor, codes);
}

static void fp32_scales(const float *amax, int64_t n, int pow2, float target, float *decode, float *factor) {
    for (int64_t k = 0; k < n; k++) {
        float f = target / amax[k];
        f = f < FLT_MAX_F ? f : FLT_MAX_F;
        f = amax[k] == 0.0f ? 1.0f : f;
        int32_t fb;
        memcpy(&fb, &f, sizeof fb);
        fb = pow2 ? fb & ~0x7FFFFF : fb;
        memcpy(&f, &fb, sizeof f);
        factor[k] = f;
        decode[k] = 1.0f / f;
    }
}

void lowbit_block_scales(const float *amax, int64_t n, int kind, int rule, int emax, int mbits, float elem_max,
                         int sbits, int smbits, int semin, int sbias, float smax, int has_global, float g, int pow2,
                         float target, float *decode, float *factor, uint8_t *codes, int threads) {
    int64_t chunks = (n + 65535) / 65536;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < chunks; t++) {
        int64_t lo = t * 65536, w = n - lo < 65536 ? n - lo : 65536;
        if (kind == 0)
            e8m0_scales(amax + lo, w, rule, emax, mbits, elem_max, decode + lo, factor + lo, codes + lo);
        else if (kind == 1)
            minifloat_scales(amax + lo, w, elem_max, sbits, smbits, semin, sbias, smax, has_global, g, decode + lo,
                             factor + lo, codes + lo);
        else
            fp32_scales(amax + lo, w, pow2, target, decode + lo, factor + lo);
    }
}

/* Walks flat elements a block's run at a time without a division per run (a run of 16 elements costs
   less than the divisions that would find its block): block row b, row i in it, block j in the row, and
   the offset of the next element within its block. */
typedef struct {
    int64_t b, i, j, off;
} Runs;

static inline Runs runs_at(int64_t p, int64_t r, int64_t C, int64_t c) {
    int64_t q = p / C, col = p % C;
    Runs at = {q / r, q % r, col / c, col % c};
    return at;
}

/* The length of the run from element p (before hi), and then on to the next block. */
static inline int64_t run_length(const Runs *at, int64_t c, int64_t p, int64_t hi) {
    return c - at->off < hi - p ? c - at->off : hi - p;
}

static inline void next_run(Runs *at, int64_t r, int64_t nb) {
    at->off = 0;
    if (++at->j == nb) {
        at->j = 0;
        if (++at->i == r) {
            at->i = 0;
            at->b++;
        }
    }
}

/* _fast.unscale of the decoded elements lo .. hi - 1 (v[0] is element lo), a block's run at a time:
   (v - zero point) * decode scale, times the global scale, over the prescale. */
static void unscale_run(float *v, int64_t lo, int64_t hi, int64_t r, int64_t C, int64_t c, int64_t fb, int64_t fj,
                        const float *scales, const int32_t *zp, int has_global, float global, int has_prescale,
                        float prescale) {
    Runs at = runs_at(lo, r, C, c);
    for (int64_t p = lo, w; p < hi; p += w, next_run(&at, r, C / c)) {
        int64_t blk = at.b * fb + at.j * fj;
        float *u = v + (p - lo), s = scales[blk];
        w = run_length(&at, c, p, hi);
        if (zp) {
            float z = (float)zp[blk];
            for (int64_t k = 0; k < w; k++) u[k] = u[k] - z;
        }
        if (has_global && !has_prescale) { /* NVFP4: both products in one loop */
            for (int64_t k = 0; k < w; k++) u[k] = (u[k] * s) * global;
            continue;
        }
        for (int64_t k = 0; k < w; k++) u[k] = u[k] * s;
        if (has_global)
            for (int64_t k = 0; k < w; k++) u[k] = u[k] * global;
        if (has_prescale)
            for (int64_t k = 0; k < w; k++) u[k] = u[k] / prescale;
    }
}

/* out[k] = x[at + k] * f for k < w (one loop per dtype). */
static inline void scale_run(const void *x, int bf16, int64_t at, int64_t w, float f, float *out) {
    if (bf16) {
        const uint16_t *in = (const uint16_t *)x + at;
        for (int64_t k = 0; k < w; k++) out[k] = from_bf16(in[k]) * f;
    } else {
        const float *in = (const float *)x + at;
        for (int64_t k = 0; k < w; k++) out[k] = in[k] * f;
    }
}

/* The codes of w scaled elements buf (flat indices first, first + 1, ...; see lowbit_quantize_blocks), SR bits
   (rbits: scratch of w) hashed from offset + index: one loop per case. */
static void code_tile(const float *buf, int64_t w, int64_t first, int integer, int bits, int mbits, int emin, float maxv,
                      int qmin, int qmax, int sr, int64_t offset, uint32_t k0, uint32_t k1, int32_t *rbits, uint8_t *out) {
    if (sr)
        for (int64_t k = 0; k < w; k++)
            rbits[k] = (int32_t)(fmix32(fmix32((uint32_t)(offset + first + k) + k0) ^ k1) & 0x7FFFFFFFu);
    if (integer && sr)
        for (int64_t k = 0; k < w; k++) out[k] = integer_code(buf[k], qmin, qmax, 1, rbits[k]);
    else if (integer)
        for (int64_t k = 0; k < w; k++) out[k] = integer_code(buf[k], qmin, qmax, 0, 0);
    else if (sr)
        for (int64_t k = 0; k < w; k++) out[k] = minifloat_code(buf[k], bits, mbits, emin, maxv, 1, rbits[k]);
    else
        for (int64_t k = 0; k < w; k++) out[k] = minifloat_code(buf[k], bits, mbits, emin, maxv, 0, 0);
}

/* Quantize finite blocks: each element times its block's encode factor (plus its zero point, zp not NULL),
   coded as a minifloat (minifloat_code: bits, mbits, emin, maxv) or an integer (integer_code: qmin, qmax,
   with `integer`), rounded to nearest even or (sr) stochastically by rounding.hash_bits of its flat index
   plus `offset` under the keys k0, k1. Into `codes` (not NULL) the codes; into `values` (not NULL) what
   dequantize makes of them (decode_codes, with `bias`; no code is Inf or NaN) unscaled by its block's
   decode scale. Tiles of QTILE elements, a step at a time over a tile (scale, bits, codes, values), each
   a loop without branches that the compiler vectorizes. */
#define QTILE 4096
void lowbit_quantize_blocks(const void *x, int bf16, int64_t B, int64_t r, int64_t C, int64_t c, const float *factor,
                            int64_t fb, int64_t fj, const int32_t *zp, int integer, int bits, int mbits, int emin,
                            int bias, float maxv, int qmin, int qmax, int sr, int64_t offset, uint32_t k0, uint32_t k1,
                            uint8_t *codes, const float *scales, int has_global, float global, int has_prescale,
                            float prescale, float *values, int threads) {
    int64_t n = B * r * C, tiles = (n + QTILE - 1) / QTILE;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < tiles; t++) {
        float buf[QTILE];
        int32_t rbits[QTILE];
        uint8_t tile_codes[QTILE];
        int64_t lo = t * QTILE, hi = lo + QTILE < n ? lo + QTILE : n, w = hi - lo;
        Runs at = runs_at(lo, r, C, c);
        for (int64_t p = lo, w; p < hi; p += w, next_run(&at, r, C / c)) { /* scaled elements, a run at a time */
            int64_t blk = at.b * fb + at.j * fj;
            float f = factor[blk], *out = buf + (p - lo);
            w = run_length(&at, c, p, hi);
            scale_run(x, bf16, p, w, f, out);
            if (zp) {
                float z = (float)zp[blk];
                for (int64_t k = 0; k < w; k++) out[k] = out[k] + z;
            }
        }
        uint8_t *out = codes ? codes + lo : tile_codes;
        code_tile(buf, w, lo, integer, bits, mbits, emin, maxv, qmin, qmax, sr, offset, k0, k1, rbits, out);
        if (values == NULL) continue;
        decode_codes(out, w, integer, bits, mbits, bias, 0, NULL, values + lo);
        unscale_run(values + lo, lo, hi, r, C, c, fb, fj, scales, zp, has_global, global, has_prescale, prescale);
    }
}

/* Dequantize blocks: decode_codes (Inf and NaN codes too) unscaled by the block's finite decode scale
   (unscale_run), float32, a tile at a time. */
void lowbit_decode_blocks(const uint8_t *codes, int integer, int bits, int mbits, int bias, int first_special,
                          const float *table, int64_t B, int64_t r, int64_t C, int64_t c, const float *scales,
                          int64_t fb, int64_t fj, const int32_t *zp, int has_global, float global, int has_prescale,
                          float prescale, float *out, int threads) {
    int64_t n = B * r * C, tiles = (n + QTILE - 1) / QTILE;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < tiles; t++) {
        int64_t lo = t * QTILE, hi = lo + QTILE < n ? lo + QTILE : n;
        decode_codes(codes + lo, hi - lo, integer, bits, mbits, bias, first_special, table, out + lo);
        unscale_run(out + lo, lo, hi, r, C, c, fb, fj, scales, zp, has_global, global, has_prescale, prescale);
    }
}

/* lowbit_quantize_blocks with the scales made on the way, for 1-D blocks of c <= QTILE elements and no zero
   point: a tile of whole blocks at a time, each block's max |x| from the bits, the tile's block scales
   (block_scales' kind 0 E8M0, 1 a signed minifloat, with NVFP4's global encode scale g where has_global, 2 FP32)
   into decode, factor and scale_codes, the
   factors times the prescale (with has_prescale, as _Plan.factor folds it), then the codes. One read of x
   where the two kernels make two. Into bad[0] the number of blocks holding a NaN or an Inf: where it is not
   0, the outputs mean nothing (the caller takes the general path). */
void lowbit_quantize_fused(const void *x, int bf16, int64_t nblocks, int64_t c, int kind, int rule, int emax,
                           int el_mbits, float elem_max, int sbits, int smbits, int semin, int sbias, float smax,
                           int has_global, float g, int pow2, float target, int has_prescale, float prescale,
                           int integer, int bits, int mbits, int emin,
                           float maxv, int qmin, int qmax, int sr, int64_t offset, uint32_t k0, uint32_t k1,
                           float *decode, float *factor, uint8_t *scale_codes, uint8_t *codes, int64_t *bad,
                           int threads) {
    int64_t per = QTILE / c, tiles = (nblocks + per - 1) / per, nonfinite = 0;
#pragma omp parallel for num_threads(threads) schedule(static) reduction(+ : nonfinite)
    for (int64_t t = 0; t < tiles; t++) {
        float buf[QTILE], amax[QTILE];
        int32_t rbits[QTILE];
        int64_t b0 = t * per, nb = b0 + per < nblocks ? per : nblocks - b0, lo = b0 * c;
        for (int64_t j = 0; j < nb; j++) {
            uint32_t top = absmax_bits(x, bf16, lo + j * c, c, 0);
            nonfinite += top >= 0x7F800000u;
            memcpy(amax + j, &top, sizeof top);
        }
        if (kind == 0)
            e8m0_scales(amax, nb, rule, emax, el_mbits, elem_max, decode + b0, factor + b0, scale_codes + b0);
        else if (kind == 1)
            minifloat_scales(amax, nb, elem_max, sbits, smbits, semin, sbias, smax, has_global, g, decode + b0,
                             factor + b0, scale_codes + b0);
        else
            fp32_scales(amax, nb, pow2, target, decode + b0, factor + b0);
        for (int64_t j = 0; j < nb; j++) {
            scale_run(x, bf16, lo + j * c, c, has_prescale ? factor[b0 + j] * prescale : factor[b0 + j], buf + j * c);
        }
        code_tile(buf, nb * c, lo, integer, bits, mbits, emin, maxv, qmin, qmax, sr, offset, k0, k1, rbits, codes + lo);
    }
    bad[0] = nonfinite;
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
    "lowbit_block_extrema": "pillllipppi",
    "lowbit_quantize_blocks": "pillllpllpiiiiifiiiluuppififpi",
    "lowbit_decode_blocks": "piiiiipllllpllpififpi",
    "lowbit_block_scales": "pliiiifiiiifififpppi",
    "lowbit_quantize_fused": "pilliiiifiiiififififiiiifiiiluupppppi",
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


def _inductor_cache() -> Path:
    """Inductor's cache directory (``TORCHINDUCTOR_CACHE_DIR``, else ``torchinductor_<user>`` in the temporary
    directory), found as inductor finds it but without importing ``torch._inductor``, whose package imports
    Triton: a CPU-only process that quantizes eagerly never loads it."""
    folder = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if folder is None:
        try:
            user = getpass.getuser()
        except (KeyError, ModuleNotFoundError, OSError):
            user = f"uid_{os.getuid()}" if hasattr(os, "getuid") else "unknown_user"
        folder = os.path.join(tempfile.gettempdir(), "torchinductor_" + re.sub(r'[\\/:*?"<>|]', "_", user))
    return Path(os.path.abspath(folder))


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The built kernel, or None where it cannot be built or loaded here."""
    if os.environ.get("LOWBIT_NATIVE", "1") == "0":
        return None
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        return None
    key = hashlib.sha256("\0".join((_SOURCE, *_FLAGS, compiler, _cpu_flags())).encode()).hexdigest()[:20]
    folder = _inductor_cache() / "lowbit"
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


_HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14  # linux/mman.h
_ADVISE_MIN_BYTES = 8 << 20


@functools.cache
def _madvise():
    """libc's madvise where transparent huge pages are on only for memory that asks (``madvise`` mode, the
    usual default), else None."""
    try:
        mode = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
        if "[madvise]" not in mode:
            return None
        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise


def _empty(shape: torch.Size | tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """``torch.empty`` for a kernel's output; a large one asks the kernel for transparent huge pages before
    its first write. A fresh allocation of many MiB is memory the process maps anew (glibc maps allocations
    over 32 MiB afresh each time), and touching it page by page costs more than the kernel's arithmetic
    (67 MiB: 50 ms of page faults in 4 KiB pages, ~8 ms in 2 MiB ones, on a 2-core VM). Advice only: the
    values and the layout are torch.empty's."""
    out = torch.empty(shape, dtype=dtype)
    size = out.numel() * out.element_size()
    madvise = _madvise() if size >= _ADVISE_MIN_BYTES else None
    if madvise is not None:
        start = -(-out.data_ptr() // _HUGE_PAGE) * _HUGE_PAGE
        end = (out.data_ptr() + size) // _HUGE_PAGE * _HUGE_PAGE
        if end > start:
            madvise(start, end - start, _MADV_HUGEPAGE)  # a refusal leaves 4 KiB pages: nothing to handle
    return out


def _run(x: torch.Tensor, signs: torch.Tensor, inverse: bool, layout: tuple[int, ...]) -> torch.Tensor | None:
    lib = _library() if x.device.type == "cpu" else None
    if lib is None or x.dtype not in (torch.float32, torch.bfloat16) or not x.is_contiguous():
        return None
    n = signs.numel()
    signs = signs.detach().to(torch.float32).contiguous()
    if signs.device.type != "cpu" or n > _MAX_LANES:
        return None
    x = x.detach()
    y = _empty(x.shape, torch.float32)
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
    out = _empty((n,), torch.int32)
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
    out = _empty(x.shape, torch.uint8)
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
    out = _empty(codes.shape, torch.float32)
    args = (codes.data_ptr(), codes.numel(), bits, mbits, bias, first_special, table.data_ptr(), out.data_ptr())
    lib.lowbit_decode_float(*args, torch.get_num_threads())
    return out


class Codec(NamedTuple):
    """A format as the block kernels code it: a signed minifloat (``bits``, ``mbits``, ``emin``, ``bias``,
    ``max``; magnitudes from ``first_special`` on are Inf/NaN, 0: none) or, with ``integer``, a signed
    integer in [``qmin``, ``qmax``]; ``table``: the float32 value of every code byte (256,), which
    Inf/NaN codes take."""

    integer: bool
    bits: int
    mbits: int
    emin: int
    bias: int
    first_special: int
    max: float
    qmin: int
    qmax: int
    table: torch.Tensor


# what the kernels read of a scale format where the scales are not a minifloat's (E8M0, FP32): unused
_NO_SCALE_FORMAT = Codec(False, 8, 0, 0, 0, 0, 1.0, 0, 0, torch.empty(0))


def _blocks(rows: torch.Tensor, cols: int, dtypes: tuple[torch.dtype, ...]) -> tuple[int, int, int, int] | None:
    """(B, r, C, c) of contiguous CPU block rows (B, r, C) of a dtype in ``dtypes`` with blocks c wide; None
    where the kernels do not apply."""
    if rows.device.type != "cpu" or rows.dim() != 3 or rows.dtype not in dtypes or not rows.is_contiguous():
        return None
    if cols < 1 or rows.shape[2] % cols:
        return None
    return (*rows.shape, cols)


def _per_block(t: torch.Tensor | None, shape: tuple[int, int, int, int], dtype: torch.dtype) -> tuple[int, int] | None:
    """The (block row, block) strides of a per-block tensor (B, C/c), or (0, 0) for one value of the whole
    tensor; None where ``t`` is neither (or not a contiguous CPU tensor of ``dtype``)."""
    if t is None or t.device.type != "cpu" or t.dtype != dtype or not t.is_contiguous():
        return None
    n_rows, _, width, cols = shape
    if t.numel() == 1:
        return 0, 0
    return (width // cols, 1) if t.shape == (n_rows, width // cols) else None


def block_extrema(rows: torch.Tensor, cols: int, signed: bool = False) -> tuple[torch.Tensor, ...] | None:
    """Every block's max |x| of float32 or BFloat16 block rows (B, r, C) with blocks r x ``cols`` as float32
    (B, C/cols), or with ``signed`` its (min x, max x); one pass. None where the kernel does not run or a
    block holds a NaN or an Inf (the tensor ops say which NaN)."""
    shape = _blocks(rows, cols, (torch.float32, torch.bfloat16))
    lib = None if shape is None else _library()
    if lib is None:
        return None
    n_rows, _, width, _ = shape
    out = [torch.empty(n_rows, width // cols, dtype=torch.float32) for _ in range(2 if signed else 1)]
    bad = torch.zeros(1, dtype=torch.int64)
    second = out[-1].data_ptr() if signed else None
    bf16 = int(rows.dtype == torch.bfloat16)
    lib.lowbit_block_extrema(
        rows.data_ptr(), bf16, *shape, int(signed), out[0].data_ptr(), second, bad.data_ptr(), torch.get_num_threads()
    )
    return None if int(bad) else tuple(out)


def _sr_args(sr: tuple[int, torch.Tensor] | None) -> tuple[int, int, int] | None:
    """(flat index offset, key 0, key 1) of SR bits given as (offset, int32 keys (2,) on CPU), zeros without
    SR; None where the keys are not that."""
    if sr is None:
        return 0, 0, 0
    if sr[1].device.type != "cpu" or sr[1].numel() != 2:
        return None
    k0, k1 = (int(k) & 0xFFFFFFFF for k in sr[1].tolist())
    return int(sr[0]), k0, k1


def _unscale_args(global_scale: torch.Tensor | None, prescale: float) -> tuple[int, float, int, float]:
    has_global = global_scale is not None
    return int(has_global), float(global_scale) if has_global else 0.0, int(prescale != 1.0), float(prescale)


def quantize_blocks(
    rows: torch.Tensor,
    cols: int,
    factor: torch.Tensor,
    zero_point: torch.Tensor | None,
    codec: Codec,
    sr: tuple[int, torch.Tensor] | None,
    *,
    codes: bool = True,
    unscale: tuple[torch.Tensor, torch.Tensor | None, float] | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None] | None:
    """One pass over finite float32 or BFloat16 block rows (B, r, C) with blocks r x ``cols``: each element
    times its block's encode ``factor`` (float32 (B, C/cols), or one for the tensor), plus its int32
    ``zero_point``, rounded into ``codec``'s codes, to nearest even or with ``sr`` (flat index offset,
    int32 keys (2,)) stochastically by ``rounding.hash_bits``. Returns (codes (B, r, C) uint8 bytes, or None
    without ``codes``; with ``unscale`` = (decode scales like ``factor``, global decode scale or None,
    prescale), the values dequantizing those codes gives, float32 (B, r, C)); None where the kernel does
    not run."""
    shape = _blocks(rows, cols, (torch.float32, torch.bfloat16))
    strides = None if shape is None else _per_block(factor, shape, torch.float32)
    lib = None if strides is None else _library()
    if lib is None or not (codes or unscale):
        return None
    if zero_point is not None and _per_block(zero_point, shape, torch.int32) != strides:
        return None
    if unscale is not None and _per_block(unscale[0], shape, torch.float32) != strides:
        return None
    if (sr_args := _sr_args(sr)) is None:
        return None
    offset, k0, k1 = sr_args
    out = _empty(rows.shape, torch.uint8) if codes else None
    values = _empty(rows.shape, torch.float32) if unscale is not None else None
    scales, global_scale, prescale = unscale if unscale is not None else (None, None, 1.0)
    lib.lowbit_quantize_blocks(
        rows.data_ptr(),
        int(rows.dtype == torch.bfloat16),
        *shape,
        factor.data_ptr(),
        *strides,
        None if zero_point is None else zero_point.data_ptr(),
        int(codec.integer),
        codec.bits,
        codec.mbits,
        codec.emin,
        codec.bias,
        codec.max,
        codec.qmin,
        codec.qmax,
        int(sr is not None),
        offset,
        k0,
        k1,
        None if out is None else out.data_ptr(),
        None if scales is None else scales.data_ptr(),
        *_unscale_args(global_scale, prescale),
        None if values is None else values.data_ptr(),
        torch.get_num_threads(),
    )
    return out, values


def decode_blocks(
    codes: torch.Tensor,
    cols: int,
    codec: Codec,
    scales: torch.Tensor,
    zero_point: torch.Tensor | None,
    global_scale: torch.Tensor | None,
    prescale: float,
) -> torch.Tensor | None:
    """Dequantized float32 (B, r, C) of one-byte block-row codes (B, r, C) of ``codec`` with blocks r x
    ``cols``: each code's value (Inf/NaN codes: ``codec.table``'s), minus its block's int32 ``zero_point``,
    times its finite decode scale (float32 (B, C/cols) or one), times the global scale, over the prescale;
    None where the kernel does not run."""
    shape = _blocks(codes, cols, (torch.uint8, torch.int8))
    strides = None if shape is None else _per_block(scales, shape, torch.float32)
    lib = None if strides is None else _library()
    table = codec.table
    if lib is None or table.dtype != torch.float32 or table.shape != (256,) or not table.is_contiguous():
        return None
    if zero_point is not None and _per_block(zero_point, shape, torch.int32) != strides:
        return None
    out = _empty(codes.shape, torch.float32)
    lib.lowbit_decode_blocks(
        codes.data_ptr(),
        int(codec.integer),
        codec.bits,
        codec.mbits,
        codec.bias,
        codec.first_special,
        table.data_ptr(),
        *shape,
        scales.data_ptr(),
        *strides,
        None if zero_point is None else zero_point.data_ptr(),
        *_unscale_args(global_scale, prescale),
        out.data_ptr(),
        torch.get_num_threads(),
    )
    return out


def block_scales(
    amax: torch.Tensor,
    kind: int,
    *,
    rule: int = 0,
    emax: int = 0,
    mbits: int = 0,
    elem_max: float = 1.0,
    scale: Codec | None = None,
    global_encode: torch.Tensor | None = None,
    pow2: bool = False,
    target: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
    """(decode scales, encode factors, scale codes or None) of finite float32 block ``amax`` in one pass:
    ``kind`` 0 E8M0 (``rule`` 0-4: floor, ceil, even, nearest, rceil; the element's ``emax``, ``mbits``,
    ``elem_max``), 1 the signed minifloat ``scale`` format (with NVFP4's ``global_encode``), 2 FP32
    (``target``, ``pow2``); see the C source. None where the kernel does not run."""
    lib = _library() if amax.device.type == "cpu" else None
    if lib is None or amax.dtype != torch.float32 or not amax.is_contiguous() or (kind == 1 and scale is None):
        return None
    decode, factor = torch.empty_like(amax), torch.empty_like(amax)
    codes = torch.empty(amax.shape, dtype=torch.uint8) if kind != 2 else None
    s = scale or _NO_SCALE_FORMAT
    g = 1.0 if global_encode is None else float(global_encode)
    lib.lowbit_block_scales(
        amax.data_ptr(), amax.numel(), kind, rule, emax, mbits, elem_max,
        s.bits, s.mbits, s.emin, s.bias, s.max, int(global_encode is not None), g, int(pow2), target,
        decode.data_ptr(), factor.data_ptr(), None if codes is None else codes.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    return decode, factor, codes


_QTILE = 4096  # the C source's QTILE: the widest block the fused kernel takes


def quantize_fused(
    x: torch.Tensor,
    cols: int,
    kind: int,
    codec: Codec,
    sr: tuple[int, torch.Tensor] | None,
    *,
    rule: int = 0,
    emax: int = 0,
    mbits: int = 0,
    elem_max: float = 1.0,
    scale: Codec | None = None,
    pow2: bool = False,
    target: float = 0.0,
    prescale: float = 1.0,
    global_encode: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
    """``block_scales`` and ``quantize_blocks`` in one read of contiguous float32 or BFloat16 ``x`` with 1-D
    blocks of ``cols`` (at most 4,096) elements along its flat order, without a zero point (a minifloat scale
    format may take NVFP4's ``global_encode``, finite and positive):
    (codes like x, decode scales, encode factors (before ``prescale``), scale codes or None for FP32), the
    per-block ones flat; None where the kernel does not run or a block holds a NaN or an Inf."""
    lib = _library() if x.device.type == "cpu" else None
    if lib is None or x.dtype not in (torch.float32, torch.bfloat16) or not x.is_contiguous():
        return None
    if not 1 <= cols <= _QTILE or x.numel() % cols or (kind == 1 and scale is None):
        return None
    if (sr_args := _sr_args(sr)) is None:
        return None
    n_blocks = x.numel() // cols
    codes = _empty(x.shape, torch.uint8)
    decode, factor = torch.empty(n_blocks, dtype=torch.float32), torch.empty(n_blocks, dtype=torch.float32)
    scale_codes = torch.empty(n_blocks, dtype=torch.uint8) if kind != 2 else None
    bad = torch.zeros(1, dtype=torch.int64)
    s = scale or _NO_SCALE_FORMAT
    g = 1.0 if global_encode is None else float(global_encode)
    offset, k0, k1 = sr_args
    lib.lowbit_quantize_fused(
        x.data_ptr(), int(x.dtype == torch.bfloat16), n_blocks, cols,
        kind, rule, emax, mbits, elem_max, s.bits, s.mbits, s.emin, s.bias, s.max, int(global_encode is not None), g,
        int(pow2), target,
        int(prescale != 1.0), prescale,
        int(codec.integer), codec.bits, codec.mbits, codec.emin, codec.max, codec.qmin, codec.qmax,
        int(sr is not None), offset, k0, k1,
        decode.data_ptr(), factor.data_ptr(), None if scale_codes is None else scale_codes.data_ptr(),
        codes.data_ptr(), bad.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    return None if int(bad) else (codes, decode, factor, scale_codes)
