"""Fused MX quantization (OCP MX v1.0): BF16/FP16/FP32 (M, K) -> E4M3 / E5M2 / E2M1 codes with one
E8M0 scale per 32 elements, rowwise (blocks along K) and/or columnwise (blocks along M, the
transposed tensor's rows) from one read of the input, optionally through a fused random Hadamard
transform and with stochastic rounding.

The reference is ``lowbit.numerics.quantize(x, spec)`` for an MX spec (``mxfp8_e4m3``,
``mxfp8_e5m2``, ``mxfp4``, any ``scale_rule``, ``sr_prescale``, ``rht_size``): rowwise codes and
scale codes equal ``quantize(x, spec)``'s, columnwise ones ``quantize(x.t(), spec)``'s, bit for
bit with RNE. Per 32-block: amax -> E8M0 code (``mx_scale_codes``) -> factor 2^(127 - code)
(times ``sr_prescale``) -> element encode, saturating. FP4 codes come packed two per byte
(element 2i in the low nibble, as ``lowbit.numerics.pack_fp4``). Stochastic rounding draws
Philox bits (``tl.randint``) from a seed tensor and the element's index: deterministic for a
seed, unbiased, but not the CPU reference's random stream.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowbit.errors import LowbitError
from lowbit.kernels._common import (
    block_amax,
    check_2d,
    check_device,
    check_rht_pair,
    e8m0_code,
    e8m0_factor,
    encode_float,
    expand_blocks,
    kernel_input,
    quantize_tiles,
    rht_matrices,
    rht_tile,
    scale_keeping_nan,
    sr_bits,
    store_codes,
    to_float32,
)
from lowbit.numerics import MX_SCALE_RULES

__all__ = ["MX_ELEMENTS", "benchmark", "quantize_mx"]

MX_ELEMENTS = ("e4m3", "e5m2", "e2m1")
MX_BLOCK = 32


@triton.jit
def _mx_tile(
    y,
    seed,
    offsets,
    prescale,
    ELEM: tl.constexpr,
    RULE: tl.constexpr,
    SR: tl.constexpr,
    ROWS: tl.constexpr,
    COLS: tl.constexpr,
):
    """y [ROWS, COLS] float32 -> (int32 codes [ROWS, COLS], E8M0 codes [ROWS, COLS // 32]), blocks along COLS."""
    scale_codes = e8m0_code(block_amax(y, ROWS, COLS, 1, 32), RULE, ELEM)
    factor = e8m0_factor(scale_codes) * prescale  # as the reference: factor * sr_prescale, then x * factor
    scaled = scale_keeping_nan(y, expand_blocks(factor, ROWS, COLS, 1, 32))
    codes = encode_float(scaled, sr_bits(seed, offsets, SR), ELEM, SR)
    return codes, scale_codes


@triton.jit
def _quantize_mx_kernel(
    x_ptr,
    q_ptr,
    s_ptr,
    qt_ptr,
    st_ptr,
    r_row_ptr,
    r_col_ptr,
    seed_ptr,
    M,
    K,
    stride_xm,
    stride_xk,
    stride_qm,
    stride_sm,
    stride_qtk,
    stride_stk,
    row_prescale,
    col_prescale,
    ELEM: tl.constexpr,
    RULE: tl.constexpr,
    ROWWISE: tl.constexpr,
    COLWISE: tl.constexpr,
    ROW_RHT: tl.constexpr,
    COL_RHT: tl.constexpr,
    ROW_SR: tl.constexpr,
    COL_SR: tl.constexpr,
    BF16_BITS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk, mask=mask, other=0)
    x = to_float32(x, BF16_BITS)  # (BLOCK_M, BLOCK_K); out-of-range elements are 0 and change no amax
    seed = tl.load(seed_ptr)
    if ROWWISE:
        y = x
        if ROW_RHT > 0:
            y = rht_tile(y, r_row_ptr, BLOCK_M, BLOCK_K, ROW_RHT)
        offsets = offs_m[:, None] * K + offs_k[None, :]
        codes, scale_codes = _mx_tile(y, seed, offsets, row_prescale, ELEM, RULE, ROW_SR, BLOCK_M, BLOCK_K)
        store_codes(q_ptr, codes, offs_m, pid_k * BLOCK_K, M, K, stride_qm, ELEM, BLOCK_M, BLOCK_K)
        offs_sk = pid_k * (BLOCK_K // 32) + tl.arange(0, BLOCK_K // 32)
        s_mask = (offs_m[:, None] < M) & (offs_sk[None, :] < K // 32)
        tl.store(s_ptr + offs_m[:, None] * stride_sm + offs_sk[None, :], scale_codes.to(tl.uint8), mask=s_mask)
    if COLWISE:
        yt = tl.trans(x)  # (BLOCK_K, BLOCK_M): rows of x^T, blocks along M
        if COL_RHT > 0:
            yt = rht_tile(yt, r_col_ptr, BLOCK_K, BLOCK_M, COL_RHT)
        offsets = M * K + offs_k[:, None] * M + offs_m[None, :]  # a stream apart from the rowwise one
        codes, scale_codes = _mx_tile(yt, seed, offsets, col_prescale, ELEM, RULE, COL_SR, BLOCK_K, BLOCK_M)
        store_codes(qt_ptr, codes, offs_k, pid_m * BLOCK_M, K, M, stride_qtk, ELEM, BLOCK_K, BLOCK_M)
        offs_sm = pid_m * (BLOCK_M // 32) + tl.arange(0, BLOCK_M // 32)
        s_mask = (offs_k[:, None] < K) & (offs_sm[None, :] < M // 32)
        tl.store(st_ptr + offs_k[:, None] * stride_stk + offs_sm[None, :], scale_codes.to(tl.uint8), mask=s_mask)


def _outputs(rows: int, cols: int, element: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = cols // 2 if element == "e2m1" else cols
    codes = torch.empty(rows, width, dtype=torch.uint8, device=device)
    return codes, torch.empty(rows, cols // MX_BLOCK, dtype=torch.uint8, device=device)


def _empty(device: torch.device) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8, device=device)


def _check(x, element, scale_rule, rowwise, colwise, row_rht, col_rht) -> None:
    check_2d(x, "quantize_mx")
    if element not in MX_ELEMENTS:
        raise LowbitError(f"quantize_mx: unknown element format '{element}'; valid: {', '.join(MX_ELEMENTS)}")
    if scale_rule not in MX_SCALE_RULES:
        raise LowbitError(f"quantize_mx: unknown scale_rule '{scale_rule}'; valid: {', '.join(MX_SCALE_RULES)}")
    if not (rowwise or colwise):
        raise LowbitError("quantize_mx: ask for rowwise, colwise or both outputs, got neither")
    m, k = x.shape
    if rowwise and k % MX_BLOCK:
        raise LowbitError(f"quantize_mx: rowwise MX blocks need K divisible by 32, got shape {(m, k)}")
    if colwise and m % MX_BLOCK:
        raise LowbitError(f"quantize_mx: colwise MX blocks need M divisible by 32, got shape {(m, k)}")
    check_rht_pair("quantize_mx", row_rht, col_rht, (m, k))


@torch.library.custom_op("lowbit::quantize_mx", mutates_args=())
def _quantize_mx_op(
    x: torch.Tensor,
    seed: torch.Tensor,
    element: str,
    scale_rule: str,
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    m, k = x.shape
    device = x.device
    codes, scales = _outputs(m, k, element, device) if rowwise else (_empty(device), _empty(device))
    codes_t, scales_t = _outputs(k, m, element, device) if colwise else (_empty(device), _empty(device))
    r_row, r_col = rht_matrices(row_rht, row_rht_seed, col_rht, col_rht_seed, x)
    block_m, block_k, num_warps = quantize_tiles(row_rht, col_rht)
    grid = (triton.cdiv(m, block_m), triton.cdiv(k, block_k))
    xin, bf16_bits = kernel_input(x)
    _quantize_mx_kernel[grid](
        xin, codes, scales, codes_t, scales_t, r_row, r_col, seed,
        m, k,
        x.stride(0), x.stride(1),
        codes.stride(0) if rowwise else 0, scales.stride(0) if rowwise else 0,
        codes_t.stride(0) if colwise else 0, scales_t.stride(0) if colwise else 0,
        row_prescale, col_prescale,
        ELEM=element, RULE=scale_rule,
        ROWWISE=rowwise, COLWISE=colwise,
        ROW_RHT=row_rht, COL_RHT=col_rht,
        ROW_SR=row_sr, COL_SR=col_sr,
        BF16_BITS=bf16_bits, BLOCK_M=block_m, BLOCK_K=block_k, num_warps=num_warps,
    )  # fmt: skip
    return codes, scales, codes_t, scales_t


@_quantize_mx_op.register_fake
def _(x, seed, element, scale_rule, rowwise, colwise, row_rht, row_rht_seed, col_rht, col_rht_seed, row_sr, col_sr,
      row_prescale, col_prescale):  # fmt: skip
    m, k = x.shape
    empty = x.new_empty(0, dtype=torch.uint8)
    codes, scales = _outputs(m, k, element, x.device) if rowwise else (empty, empty.clone())
    codes_t, scales_t = _outputs(k, m, element, x.device) if colwise else (empty.clone(), empty.clone())
    return codes, scales, codes_t, scales_t


def quantize_mx(
    x: torch.Tensor,
    element: str = "e4m3",
    *,
    scale_rule: str = "floor",
    rowwise: bool = True,
    colwise: bool = False,
    rht: tuple[int, int] = (0, 0),
    rht_seed: tuple[int, int] = (0, 0),
    sr: tuple[bool, bool] = (False, False),
    prescale: tuple[float, float] = (1.0, 1.0),
    seed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """MX-quantize a 2-D tensor: (codes, E8M0 scale codes, codes_t, scale codes_t), unrequested outputs empty.

    Rowwise: codes (M, K) (FP4: (M, K/2) packed), scales (M, K/32); colwise: the same of x.t().
    ``rht``, ``rht_seed``, ``sr``, ``prescale``: (rowwise, colwise) Hadamard size, its seed, stochastic
    rounding, sr_prescale. ``seed``: int64 tensor (1,) on x's device for the Philox stream.
    """
    _check(x, element, scale_rule, rowwise, colwise, rht[0], rht[1])
    check_device(x, what="quantize_mx")
    if seed is None:
        seed = torch.zeros(1, dtype=torch.int64, device=x.device)
    return torch.ops.lowbit.quantize_mx(
        x, seed, element, scale_rule, rowwise, colwise, int(rht[0]), int(rht_seed[0]), int(rht[1]), int(rht_seed[1]),
        bool(sr[0]), bool(sr[1]), float(prescale[0]), float(prescale[1]),
    )  # fmt: skip


def benchmark(size: int = 8192, element: str = "e2m1", dtype: torch.dtype = torch.bfloat16) -> dict[str, float]:
    """GB/s (input read + outputs written) of rowwise and rowwise+colwise MX quantization against
    the numerics reference running on the same GPU; CUDA only."""
    from triton.testing import do_bench

    from lowbit.numerics import QuantSpec, quantize

    x = torch.randn(size, size, device="cuda", dtype=dtype)
    spec = QuantSpec(element=element, block=(1, 32), scale_format="e8m0")
    out_bytes = x.numel() * (0.5 if element == "e2m1" else 1) + x.numel() / 32
    row_ms = do_bench(lambda: quantize_mx(x, element))
    both_ms = do_bench(lambda: quantize_mx(x, element, colwise=True))
    ref_ms = do_bench(lambda: quantize(x, spec))
    one = x.numel() * x.element_size() + out_bytes
    return {
        "rowwise_gbs": one / row_ms / 1e6,
        "rowwise_colwise_gbs": (x.numel() * x.element_size() + 2 * out_bytes) / both_ms / 1e6,
        "torch_reference_gbs": one / ref_ms / 1e6,
    }
