"""Fused NVFP4 quantization: BF16/FP16/FP32 (M, K) -> E2M1 codes (packed two per byte) with E4M3
block scales under an FP32 per-tensor scale, 1x16 blocks (activations, gradients) or 16x16 blocks
(weights), rowwise and/or colwise (the transposed tensor) from one read, with a fused random
Hadamard transform and stochastic rounding.

The reference is ``lowbit.numerics.quantize(x, spec)`` for ``nvfp4`` / ``nvfp4_2d`` and their
variants (UE5M3 scales, no global scale, 1x32 blocks, ``sr_prescale``, ``rht_size``); the formulas
are ``lowbit.numerics.blocks``'s, evaluated in the same float32 operations:
  g = S.max * E.max / amax(x)          (clamped to FLT_MAX; 1 when amax is Inf; the amax kernel first)
  s = S(RNE, saturating)(block_amax * (g * (1 / E.max)))
  q = E(RNE or SR, saturating)(x * min(1 / (s * (1 / g)), FLT_MAX))
and the stored global scale is 1 / g. Rowwise outputs equal ``quantize(x, spec)``'s codes, scale
codes and global scale bit for bit with RNE, colwise ones ``quantize(x.t(), spec)``'s.
Stochastic rounding draws Philox bits: deterministic for a seed, unbiased, not the CPU stream.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowbit.errors import LowbitError
from lowbit.kernels._common import (
    FLT_MAX,
    SCALE_FORMATS,
    block_amax,
    check_2d,
    check_device,
    check_rht_pair,
    decode_float,
    encode_float,
    expand_blocks,
    fmt_const,
    kernel_input,
    quantize_tiles,
    rht_matrices,
    rht_tile,
    sr_bits,
    store_codes,
    to_float32,
)
from lowbit.kernels.amax import launch_amax

__all__ = ["BLOCKS", "benchmark", "quantize_nvfp4"]

BLOCKS = ((1, 16), (16, 16), (1, 32))
"""Block shapes (rows, cols) the kernel quantizes; cols run along the contraction dim."""


_RECIPROCAL_6 = tl.constexpr(torch.reciprocal(torch.tensor(6.0)).item())
"""float32(1 / 6), the reference's ``torch.reciprocal(emax)`` for E2M1's max 6 (exact as a float32 constant)."""


@triton.jit
def _global_encode(amax_ptr, SFMT: tl.constexpr):
    """NVFP4 global encode scale g = S.max * E.max / amax: FLT_MAX for amax 0, 1 for Inf, NaN for NaN."""
    amax = tl.load(amax_ptr)
    g = tl.math.div_rn(fmt_const(SFMT, "max") * 6.0, amax)  # S.max * E2M1.max, exact in float32
    g = tl.where(g > FLT_MAX, FLT_MAX, g)
    return tl.where(g == 0.0, 1.0, g)


@triton.jit
def _lowp_tile(
    y,
    g,
    seed,
    offsets,
    prescale,
    SFMT: tl.constexpr,
    GLOBAL: tl.constexpr,
    SR: tl.constexpr,
    ROWS: tl.constexpr,
    COLS: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
):
    """y [ROWS, COLS] float32 -> (E2M1 codes [ROWS, COLS], scale codes [ROWS // BLOCK_ROWS, COLS // BLOCK_COLS])."""
    amax = block_amax(y, ROWS, COLS, BLOCK_ROWS, BLOCK_COLS)
    if GLOBAL:
        target = amax * (g * _RECIPROCAL_6)
        target = tl.where(target > FLT_MAX, FLT_MAX, target)  # keeps NaN, as torch.clamp
    else:
        target = tl.math.div_rn(amax, 6.0)
    scale_codes = encode_float(target, offsets * 0, SFMT, False)
    scales = decode_float(scale_codes, SFMT)
    if GLOBAL:
        factor = tl.math.div_rn(1.0, scales * tl.math.div_rn(1.0, g))
    else:
        factor = tl.math.div_rn(1.0, scales)
    factor = tl.where(factor > FLT_MAX, FLT_MAX, factor) * prescale
    scaled = y * expand_blocks(factor, ROWS, COLS, BLOCK_ROWS, BLOCK_COLS)
    codes = encode_float(scaled, sr_bits(seed, offsets, SR), "e2m1", SR)
    return codes, scale_codes


@triton.jit
def _quantize_nvfp4_kernel(
    x_ptr, q_ptr, s_ptr, g_ptr, qt_ptr, st_ptr, gt_ptr, amax_ptr, r_row_ptr, r_col_ptr, seed_ptr,
    M, K,
    stride_xm, stride_xk,
    stride_qm, stride_sm, stride_qtk, stride_stk,
    row_prescale, col_prescale,
    SFMT: tl.constexpr, GLOBAL: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
    ROWWISE: tl.constexpr, COLWISE: tl.constexpr,
    ROW_RHT: tl.constexpr, COL_RHT: tl.constexpr,
    ROW_SR: tl.constexpr, COL_SR: tl.constexpr,
    BF16_BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk, mask=mask, other=0)
    x = to_float32(x, BF16_BITS)  # (BLOCK_M, BLOCK_K)
    seed = tl.load(seed_ptr)
    first = (pid_m == 0) & (pid_k == 0)
    if ROWWISE:
        y = x
        if ROW_RHT > 0:
            y = rht_tile(y, r_row_ptr, BLOCK_M, BLOCK_K, ROW_RHT)
        g = 1.0
        if GLOBAL:
            g = _global_encode(amax_ptr, SFMT)
            if first:
                tl.store(g_ptr, tl.math.div_rn(1.0, g))  # the decode scale 1 / g
        elif first:
            tl.store(g_ptr, 1.0)  # no second level: 1, so dequantization can always multiply by it
        offsets = offs_m[:, None] * K + offs_k[None, :]
        codes, scale_codes = _lowp_tile(
            y, g, seed, offsets, row_prescale, SFMT, GLOBAL, ROW_SR, BLOCK_M, BLOCK_K, BLOCK_ROWS, BLOCK_COLS
        )
        store_codes(q_ptr, codes, offs_m, pid_k * BLOCK_K, M, K, stride_qm, "e2m1", BLOCK_M, BLOCK_K)
        rows = pid_m * (BLOCK_M // BLOCK_ROWS) + tl.arange(0, BLOCK_M // BLOCK_ROWS)
        cols = pid_k * (BLOCK_K // BLOCK_COLS) + tl.arange(0, BLOCK_K // BLOCK_COLS)
        s_mask = (rows[:, None] < tl.cdiv(M, BLOCK_ROWS)) & (cols[None, :] < K // BLOCK_COLS)
        tl.store(s_ptr + rows[:, None] * stride_sm + cols[None, :], scale_codes.to(tl.uint8), mask=s_mask)
    if COLWISE:
        yt = tl.trans(x)  # (BLOCK_K, BLOCK_M): rows of x^T
        if COL_RHT > 0:
            yt = rht_tile(yt, r_col_ptr, BLOCK_K, BLOCK_M, COL_RHT)
        g = 1.0
        if GLOBAL:
            g = _global_encode(amax_ptr + 1, SFMT)
            if first:
                tl.store(gt_ptr, tl.math.div_rn(1.0, g))
        elif first:
            tl.store(gt_ptr, 1.0)  # no second level: 1, so dequantization can always multiply by it
        offsets = M * K + offs_k[:, None] * M + offs_m[None, :]
        codes, scale_codes = _lowp_tile(
            yt, g, seed, offsets, col_prescale, SFMT, GLOBAL, COL_SR, BLOCK_K, BLOCK_M, BLOCK_ROWS, BLOCK_COLS
        )
        store_codes(qt_ptr, codes, offs_k, pid_m * BLOCK_M, K, M, stride_qtk, "e2m1", BLOCK_K, BLOCK_M)
        rows = pid_k * (BLOCK_K // BLOCK_ROWS) + tl.arange(0, BLOCK_K // BLOCK_ROWS)
        cols = pid_m * (BLOCK_M // BLOCK_COLS) + tl.arange(0, BLOCK_M // BLOCK_COLS)
        s_mask = (rows[:, None] < tl.cdiv(K, BLOCK_ROWS)) & (cols[None, :] < M // BLOCK_COLS)
        tl.store(st_ptr + rows[:, None] * stride_stk + cols[None, :], scale_codes.to(tl.uint8), mask=s_mask)


def _outputs(rows: int, cols: int, block: tuple[int, int], device: torch.device):
    codes = torch.empty(rows, cols // 2, dtype=torch.uint8, device=device)
    scales = torch.empty(rows // block[0], cols // block[1], dtype=torch.uint8, device=device)
    return codes, scales, torch.empty((), dtype=torch.float32, device=device)


def _empties(x: torch.Tensor):
    return x.new_empty(0, dtype=torch.uint8), x.new_empty(0, dtype=torch.uint8), x.new_empty(0, dtype=torch.float32)


def _check(x, block, scale_format, rowwise, colwise, row_rht, col_rht) -> None:
    check_2d(x, "quantize_nvfp4")
    if tuple(block) not in BLOCKS:
        raise LowbitError(f"quantize_nvfp4: block {tuple(block)} is not one of {', '.join(map(str, BLOCKS))}")
    if scale_format not in SCALE_FORMATS:
        raise LowbitError(f"quantize_nvfp4: scale_format '{scale_format}' is not one of {', '.join(SCALE_FORMATS)}")
    if not (rowwise or colwise):
        raise LowbitError("quantize_nvfp4: ask for rowwise, colwise or both outputs, got neither")
    m, k = x.shape
    rows, cols = block
    if rowwise and (k % cols or m % rows):
        raise LowbitError(f"quantize_nvfp4: rowwise {block} blocks do not divide shape {(m, k)}; pad it")
    if colwise and (m % cols or k % rows):
        raise LowbitError(f"quantize_nvfp4: colwise {block} blocks do not divide the transposed shape {(k, m)}; pad it")
    check_rht_pair("quantize_nvfp4", row_rht, col_rht, (m, k))


@torch.library.custom_op("lowbit::quantize_nvfp4", mutates_args=())
def _quantize_nvfp4_op(
    x: torch.Tensor,
    seed: torch.Tensor,
    block_rows: int,
    block_cols: int,
    scale_format: str,
    global_scale: bool,
    rowwise: bool,
    colwise: bool,
    row_rht: int,
    row_rht_seed: int,
    col_rht: int,
    col_rht_seed: int,
    row_sr: bool,
    col_sr: bool,
    row_prescale: float,
    col_prescale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    m, k = x.shape
    device = x.device
    block = (block_rows, block_cols)
    codes, scales, g = _outputs(m, k, block, device) if rowwise else _empties(x)
    codes_t, scales_t, g_t = _outputs(k, m, block, device) if colwise else _empties(x)
    if global_scale:
        amax = launch_amax(x, rowwise, colwise, row_rht, row_rht_seed, col_rht, col_rht_seed)
    else:
        amax = torch.zeros(2, dtype=torch.float32, device=device)
    r_row, r_col = rht_matrices(row_rht, row_rht_seed, col_rht, col_rht_seed, amax)
    block_m, block_k, num_warps = quantize_tiles(row_rht, col_rht)
    xin, bf16_bits = kernel_input(x)
    grid = (triton.cdiv(m, block_m), triton.cdiv(k, block_k))
    _quantize_nvfp4_kernel[grid](
        xin, codes, scales, g, codes_t, scales_t, g_t, amax, r_row, r_col, seed,
        m, k,
        x.stride(0), x.stride(1),
        codes.stride(0) if rowwise else 0, scales.stride(0) if rowwise else 0,
        codes_t.stride(0) if colwise else 0, scales_t.stride(0) if colwise else 0,
        row_prescale, col_prescale,
        SFMT=scale_format, GLOBAL=global_scale, BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols,
        ROWWISE=rowwise, COLWISE=colwise,
        ROW_RHT=row_rht, COL_RHT=col_rht,
        ROW_SR=row_sr, COL_SR=col_sr,
        BF16_BITS=bf16_bits, BLOCK_M=block_m, BLOCK_K=block_k, num_warps=num_warps,
    )  # fmt: skip
    return codes, scales, g, codes_t, scales_t, g_t


@_quantize_nvfp4_op.register_fake
def _(x, seed, block_rows, block_cols, scale_format, global_scale, rowwise, colwise, row_rht, row_rht_seed, col_rht,
      col_rht_seed, row_sr, col_sr, row_prescale, col_prescale):  # fmt: skip
    m, k = x.shape
    block = (block_rows, block_cols)
    row = _outputs(m, k, block, x.device) if rowwise else _empties(x)
    col = _outputs(k, m, block, x.device) if colwise else _empties(x)
    return (*row, *col)


def quantize_nvfp4(
    x: torch.Tensor,
    *,
    block: tuple[int, int] = (1, 16),
    scale_format: str = "e4m3",
    global_scale: bool = True,
    rowwise: bool = True,
    colwise: bool = False,
    rht: tuple[int, int] = (0, 0),
    rht_seed: tuple[int, int] = (0, 0),
    sr: tuple[bool, bool] = (False, False),
    prescale: tuple[float, float] = (1.0, 1.0),
    seed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """NVFP4-quantize a 2-D tensor: (codes, scale codes, global decode scale, and the same three colwise).

    Rowwise: codes (M, K/2) packed E2M1, scale codes (M/r, K/c) for block (r, c), global 0-d float32
    (1.0 without ``global_scale``); colwise: the same of x.t(); unrequested outputs are empty.
    ``rht``, ``rht_seed``, ``sr``, ``prescale``: per (rowwise, colwise). ``seed``: int64 (1,) tensor.
    """
    _check(x, block, scale_format, rowwise, colwise, rht[0], rht[1])
    check_device(x, what="quantize_nvfp4")
    if seed is None:
        seed = torch.zeros(1, dtype=torch.int64, device=x.device)
    return torch.ops.lowbit.quantize_nvfp4(
        x, seed, int(block[0]), int(block[1]), scale_format, bool(global_scale), rowwise, colwise,
        int(rht[0]), int(rht_seed[0]), int(rht[1]), int(rht_seed[1]),
        bool(sr[0]), bool(sr[1]), float(prescale[0]), float(prescale[1]),
    )  # fmt: skip


def benchmark(size: int = 8192, dtype: torch.dtype = torch.bfloat16) -> dict[str, float]:
    """GB/s of NVFP4 quantization (amax pass included) rowwise, rowwise+colwise, and with RHT-16 and SR
    colwise (the wgrad operand), against the numerics reference on the same GPU; CUDA only."""
    from triton.testing import do_bench

    from lowbit.numerics import quantize

    x = torch.randn(size, size, device="cuda", dtype=dtype)
    out_bytes = x.numel() / 2 + x.numel() / 16
    one = x.numel() * x.element_size() + out_bytes
    two = x.numel() * x.element_size() + 2 * out_bytes
    return {
        "rowwise_gbs": one / do_bench(lambda: quantize_nvfp4(x)) / 1e6,
        "rowwise_colwise_gbs": two / do_bench(lambda: quantize_nvfp4(x, colwise=True)) / 1e6,
        "colwise_rht16_sr_gbs": one
        / do_bench(lambda: quantize_nvfp4(x, rowwise=False, colwise=True, rht=(0, 16), sr=(False, True)))
        / 1e6,
        "torch_reference_gbs": one / do_bench(lambda: quantize(x, "nvfp4")) / 1e6,
    }
