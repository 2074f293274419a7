"""Fused FP8 quantization with FP32 scales (Transformer Engine current scaling): BF16/FP16/FP32
(M, K) -> E4M3 / E5M2 codes with one scale per tensor (amax reduction included; or a given scale,
for delayed scaling) or one per row, rowwise and/or colwise (the transposed tensor).

The reference is ``lowbit.numerics.quantize(x, spec)`` for ``fp8_e4m3_tensor``,
``fp8_e4m3_row``, ``fp8_e5m2_tensor`` and variants (``pow2_scale``, ``sr_prescale``, SR; saturating
only): encode factor = fmt_max / amax (clamped to FLT_MAX; 1 for amax 0, Inf or NaN; rounded down
to a power of two with ``pow2``), decode scale = 1 / factor, codes = encode(x * factor). Codes
and the float32 decode scales equal the reference's bit for bit with RNE (the reference's
``scale_codes`` are the scales' int32 bit pattern). Colwise row scales are the rows of x.t()
(a second, strided launch); tensor scales give both outputs from one read.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowbit.errors import LowbitError
from lowbit.kernels._common import (
    FLT_MAX,
    check_2d,
    check_device,
    encode_float,
    fmt_const,
    interpreting,
    kernel_input,
    scale_keeping_nan,
    sr_bits,
    store_codes,
    to_float32,
)
from lowbit.kernels.amax import launch_amax

__all__ = ["FP8_ELEMENTS", "benchmark", "quantize_fp8"]

FP8_ELEMENTS = ("e4m3", "e5m2")


@triton.jit
def _encode_factor(amax, FMT: tl.constexpr, POW2: tl.constexpr):
    """TE current scaling (``lowbit.numerics.current_scale``): fmt_max / amax, FLT_MAX at most, 1 for
    amax 0 / Inf / NaN, optionally rounded down to a power of two."""
    factor = tl.math.div_rn(fmt_const(FMT, "max"), amax)
    factor = tl.where(factor > FLT_MAX, FLT_MAX, factor)
    amax_bits = amax.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    factor = tl.where((amax_bits == 0) | (amax_bits >= 0x7F800000), 1.0, factor)
    if POW2:
        factor = (factor.to(tl.int32, bitcast=True) & ~0x7FFFFF).to(tl.float32, bitcast=True)
    return factor


@triton.jit
def _quantize_fp8_tensor_kernel(
    x_ptr, q_ptr, qt_ptr, scale_ptr, amax_ptr, given_ptr, seed_ptr,
    M, K, stride_xm, stride_xk, stride_qm, stride_qtk,
    row_prescale, col_prescale,
    FMT: tl.constexpr, POW2: tl.constexpr, GIVEN: tl.constexpr,
    ROWWISE: tl.constexpr, COLWISE: tl.constexpr, ROW_SR: tl.constexpr, COL_SR: tl.constexpr,
    BF16_BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    x = to_float32(
        tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk, mask=mask, other=0), BF16_BITS
    )
    if GIVEN:
        factor = tl.load(given_ptr)  # delayed scaling: the encode scale from earlier steps' amaxes
    else:
        factor = _encode_factor(tl.load(amax_ptr), FMT, POW2)
    if (pid_m == 0) & (pid_k == 0):
        tl.store(scale_ptr, tl.math.div_rn(1.0, factor))  # decode scale
    seed = tl.load(seed_ptr)
    if ROWWISE:
        offsets = offs_m[:, None] * K + offs_k[None, :]
        codes = encode_float(scale_keeping_nan(x, factor * row_prescale), sr_bits(seed, offsets, ROW_SR), FMT, ROW_SR)
        store_codes(q_ptr, codes, offs_m, pid_k * BLOCK_K, M, K, stride_qm, FMT, BLOCK_M, BLOCK_K)
    if COLWISE:
        offsets = M * K + offs_k[:, None] * M + offs_m[None, :]
        codes = encode_float(
            scale_keeping_nan(tl.trans(x), factor * col_prescale), sr_bits(seed, offsets, COL_SR), FMT, COL_SR
        )
        store_codes(qt_ptr, codes, offs_k, pid_m * BLOCK_M, K, M, stride_qtk, FMT, BLOCK_K, BLOCK_M)


@triton.jit
def _quantize_fp8_row_kernel(
    x_ptr, q_ptr, scale_ptr, seed_ptr,
    M, K, stride_xm, stride_xk, stride_qm, prescale, stream,
    FMT: tl.constexpr, POW2: tl.constexpr, SR: tl.constexpr,
    BF16_BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = offs_m[:, None] < M
    amax_bits = tl.zeros((BLOCK_M,), dtype=tl.int32)
    for k in range(0, K, BLOCK_K):  # pass 1: row amax on the bit patterns (NaN wins)
        offs_k = k + tl.arange(0, BLOCK_K)
        mask = row_mask & (offs_k[None, :] < K)
        x = to_float32(
            tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk, mask=mask, other=0), BF16_BITS
        )
        amax_bits = tl.maximum(amax_bits, tl.max(x.to(tl.int32, bitcast=True) & 0x7FFFFFFF, axis=1))
    factor = _encode_factor(amax_bits.to(tl.float32, bitcast=True), FMT, POW2)
    tl.store(scale_ptr + offs_m, tl.math.div_rn(1.0, factor), mask=offs_m < M)
    factor = factor * prescale
    seed = tl.load(seed_ptr)
    for k in range(0, K, BLOCK_K):  # pass 2: encode (the rows are still in L2)
        offs_k = k + tl.arange(0, BLOCK_K)
        mask = row_mask & (offs_k[None, :] < K)
        x = to_float32(
            tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk, mask=mask, other=0), BF16_BITS
        )
        offsets = stream + offs_m[:, None] * K + offs_k[None, :]
        codes = encode_float(scale_keeping_nan(x, factor[:, None]), sr_bits(seed, offsets, SR), FMT, SR)
        store_codes(q_ptr, codes, offs_m, k, M, K, stride_qm, FMT, BLOCK_M, BLOCK_K)


def _launch_rows(x, codes, scales, seed, element, pow2, sr, prescale, stream) -> None:
    m, k = x.shape
    block_m, block_k = (16, 64) if interpreting() else (32, 256)
    xin, bf16_bits = kernel_input(x)
    _quantize_fp8_row_kernel[(triton.cdiv(m, block_m),)](
        xin, codes, scales, seed, m, k, x.stride(0), x.stride(1), codes.stride(0), prescale, stream,
        FMT=element, POW2=pow2, SR=sr, BF16_BITS=bf16_bits, BLOCK_M=block_m, BLOCK_K=block_k, num_warps=4,
    )  # fmt: skip


@torch.library.custom_op("lowbit::quantize_fp8", mutates_args=())
def _quantize_fp8_op(
    x: torch.Tensor,
    seed: torch.Tensor,
    scale: torch.Tensor | None,
    element: str,
    block: str,
    pow2: bool,
    rowwise: bool,
    colwise: bool,
    row_sr: bool,
    col_sr: bool,
    row_prescale: float,
    col_prescale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    m, k = x.shape
    device = x.device
    empty = lambda dtype: torch.empty(0, dtype=dtype, device=device)
    codes = torch.empty(m, k, dtype=torch.uint8, device=device) if rowwise else empty(torch.uint8)
    codes_t = torch.empty(k, m, dtype=torch.uint8, device=device) if colwise else empty(torch.uint8)
    if block == "row":
        scales = torch.empty(m, 1, dtype=torch.float32, device=device) if rowwise else empty(torch.float32)
        scales_t = torch.empty(k, 1, dtype=torch.float32, device=device) if colwise else empty(torch.float32)
        if rowwise:
            _launch_rows(x, codes, scales, seed, element, pow2, row_sr, row_prescale, 0)
        if colwise:
            _launch_rows(x.t(), codes_t, scales_t, seed, element, pow2, col_sr, col_prescale, m * k)
        return codes, scales, codes_t, scales_t, empty(torch.float32)
    scales = torch.empty(1, 1, dtype=torch.float32, device=device)
    amax = launch_amax(x, True, False, 0, 0, 0, 0)[:1]
    block_m, block_k = (32, 64) if interpreting() else (64, 128)
    xin, bf16_bits = kernel_input(x)
    _quantize_fp8_tensor_kernel[(triton.cdiv(m, block_m), triton.cdiv(k, block_k))](
        xin, codes, codes_t, scales, amax, scale if scale is not None else amax, seed,
        m, k, x.stride(0), x.stride(1), codes.stride(0) if rowwise else 0, codes_t.stride(0) if colwise else 0,
        row_prescale, col_prescale,
        FMT=element, POW2=pow2, GIVEN=scale is not None, ROWWISE=rowwise, COLWISE=colwise, ROW_SR=row_sr, COL_SR=col_sr,
        BF16_BITS=bf16_bits, BLOCK_M=block_m, BLOCK_K=block_k, num_warps=4,
    )  # fmt: skip
    return codes, scales, codes_t, scales.clone() if colwise else empty(torch.float32), amax.reshape(())


@_quantize_fp8_op.register_fake
def _(x, seed, scale, element, block, pow2, rowwise, colwise, row_sr, col_sr, row_prescale, col_prescale):
    m, k = x.shape
    empty = lambda dtype: x.new_empty(0, dtype=dtype)
    codes = x.new_empty(m, k, dtype=torch.uint8) if rowwise else empty(torch.uint8)
    codes_t = x.new_empty(k, m, dtype=torch.uint8) if colwise else empty(torch.uint8)
    rows = (m, 1) if block == "row" else (1, 1)
    cols = (k, 1) if block == "row" else (1, 1)
    scales = x.new_empty(rows, dtype=torch.float32) if rowwise or block == "tensor" else empty(torch.float32)
    scales_t = x.new_empty(cols, dtype=torch.float32) if colwise else empty(torch.float32)
    amax = x.new_empty((), dtype=torch.float32) if block == "tensor" else empty(torch.float32)
    return codes, scales, codes_t, scales_t, amax


def quantize_fp8(
    x: torch.Tensor,
    element: str = "e4m3",
    *,
    block: str = "tensor",
    pow2: bool = False,
    rowwise: bool = True,
    colwise: bool = False,
    sr: tuple[bool, bool] = (False, False),
    prescale: tuple[float, float] = (1.0, 1.0),
    scale: torch.Tensor | None = None,
    seed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """FP8-quantize a 2-D tensor: (codes, decode scales, codes_t, decode scales_t, tensor amax).

    Codes (M, K) uint8 (colwise: of x.t(), (K, M)); decode scales float32 (1, 1) for ``block="tensor"``,
    (rows, 1) for ``block="row"``; amax: the measured 0-d tensor amax (tensor scales only; empty for
    rows). ``scale``: a given encode scale (delayed scaling, tensor only). ``seed``: int64 (1,) tensor.
    """
    check_2d(x, "quantize_fp8")
    check_device(x, what="quantize_fp8")
    if element not in FP8_ELEMENTS:
        raise LowbitError(f"quantize_fp8: unknown element format '{element}'; valid: {', '.join(FP8_ELEMENTS)}")
    if block not in ("tensor", "row"):
        raise LowbitError(f"quantize_fp8: block must be 'tensor' or 'row', got {block!r}")
    if scale is not None and block != "tensor":
        raise LowbitError("quantize_fp8: a given scale (delayed scaling) needs block='tensor'")
    if not (rowwise or colwise):
        raise LowbitError("quantize_fp8: ask for rowwise, colwise or both outputs, got neither")
    if seed is None:
        seed = torch.zeros(1, dtype=torch.int64, device=x.device)
    if scale is not None:
        scale = torch.as_tensor(scale, dtype=torch.float32, device=x.device).reshape(1)
    return torch.ops.lowbit.quantize_fp8(
        x, seed, scale, element, block, bool(pow2), rowwise, colwise, bool(sr[0]), bool(sr[1]),
        float(prescale[0]), float(prescale[1]),
    )  # fmt: skip


def benchmark(size: int = 8192, dtype: torch.dtype = torch.bfloat16) -> dict[str, float]:
    """GB/s of FP8 tensorwise (amax pass included; rowwise and rowwise+colwise) and rowwise quantization
    against torch's ``(x * scale).to(float8)`` with the amax; CUDA only."""
    from triton.testing import do_bench

    x = torch.randn(size, size, device="cuda", dtype=dtype)
    one = x.numel() * (x.element_size() + 1)
    two = x.numel() * (x.element_size() + 2)

    def torch_fp8():
        factor = 448.0 / x.abs().amax().float()
        return (x.float() * factor).clamp(-448, 448).to(torch.float8_e4m3fn)

    return {
        "tensor_gbs": one / do_bench(lambda: quantize_fp8(x)) / 1e6,
        "tensor_rowwise_colwise_gbs": two / do_bench(lambda: quantize_fp8(x, colwise=True)) / 1e6,
        "row_gbs": one / do_bench(lambda: quantize_fp8(x, block="row")) / 1e6,
        "torch_gbs": one / do_bench(torch_fp8) / 1e6,
    }
