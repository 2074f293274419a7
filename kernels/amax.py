"""Tensor amax, the reduction per-tensor scales need (NVFP4's global scale, FP8 tensorwise scaling),
optionally of the random-Hadamard-transformed tensor, rowwise (transform along K) and colwise
(along M) in one read.

The reference is ``lowbit.numerics.tensor_amax`` (of ``rht(x)`` / ``rht(x.t())`` with a
transform): max |x| as float32, +0 for all zeros, NaN when any element is NaN. Each program
reduces its tile on the float32 bit patterns (non-negative floats order as integers, NaN above
Inf) and merges with one ``atomic_max`` on int32, so the result needs no second pass and NaN
propagates (a float max drops NaN on a GPU).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowbit.kernels._common import (
    check_2d,
    check_device,
    check_rht,
    interpreting,
    kernel_input,
    rht_matrices,
    rht_tile,
    to_float32,
)

__all__ = ["amax", "benchmark"]


@triton.jit
def _amax_kernel(
    x_ptr, amax_ptr, r_row_ptr, r_col_ptr,
    M, K, stride_xm, stride_xk,
    ROWWISE: tl.constexpr, COLWISE: tl.constexpr, ROW_RHT: tl.constexpr, COL_RHT: tl.constexpr,
    BF16_BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk, mask=mask, other=0)
    x = to_float32(x, BF16_BITS)  # (BLOCK_M, BLOCK_K); padding is 0, which no amax notices
    if ROWWISE:
        y = x
        if ROW_RHT > 0:
            y = rht_tile(y, r_row_ptr, BLOCK_M, BLOCK_K, ROW_RHT)
        mag = y.to(tl.int32, bitcast=True) & 0x7FFFFFFF
        tl.atomic_max(amax_ptr, tl.max(tl.max(mag, axis=1), axis=0))
    if COLWISE:
        yt = tl.trans(x)  # (BLOCK_K, BLOCK_M)
        if COL_RHT > 0:
            yt = rht_tile(yt, r_col_ptr, BLOCK_K, BLOCK_M, COL_RHT)
        mag = yt.to(tl.int32, bitcast=True) & 0x7FFFFFFF
        tl.atomic_max(amax_ptr + 1, tl.max(tl.max(mag, axis=1), axis=0))


def launch_amax(
    x: torch.Tensor, rowwise: bool, colwise: bool, row_rht: int, row_rht_seed: int, col_rht: int, col_rht_seed: int
) -> torch.Tensor:
    """(2,) float32 [amax of the rowwise tensor, amax of the colwise one] (0 where not asked); no checks."""
    m, k = x.shape
    out = torch.zeros(2, dtype=torch.int32, device=x.device)
    r_row, r_col = rht_matrices(row_rht, row_rht_seed, col_rht, col_rht_seed, out)
    block = 64 if interpreting() else 128
    block = max(block, row_rht, col_rht)
    xin, bf16_bits = kernel_input(x)
    grid = (triton.cdiv(m, block), triton.cdiv(k, block))
    _amax_kernel[grid](
        xin, out, r_row, r_col, m, k, x.stride(0), x.stride(1),
        ROWWISE=rowwise, COLWISE=colwise, ROW_RHT=row_rht, COL_RHT=col_rht,
        BF16_BITS=bf16_bits, BLOCK_M=block, BLOCK_K=block, num_warps=8,
    )  # fmt: skip
    return out.view(torch.float32)


@torch.library.custom_op("lowbit::amax", mutates_args=())
def _amax_op(x: torch.Tensor, rht: int, rht_seed: int) -> torch.Tensor:
    return launch_amax(x, True, False, rht, rht_seed, 0, 0)[0].clone()


@_amax_op.register_fake
def _(x, rht, rht_seed):
    return x.new_empty((), dtype=torch.float32)


def amax(x: torch.Tensor, *, rht: int = 0, rht_seed: int = 0) -> torch.Tensor:
    """max |x| of a 2-D tensor as a float32 0-d tensor (of the RHT-transformed rows with ``rht``), as
    ``lowbit.numerics.tensor_amax``: NaN if any element is NaN."""
    check_2d(x, "amax")
    check_device(x, what="amax")
    check_rht(rht, "amax")
    return torch.ops.lowbit.amax(x, int(rht), int(rht_seed))


def benchmark(size: int = 8192, dtype: torch.dtype = torch.bfloat16) -> dict[str, float]:
    """GB/s read by the amax kernel against ``x.abs().amax()``; CUDA only."""
    from triton.testing import do_bench

    x = torch.randn(size, size, device="cuda", dtype=dtype)
    nbytes = x.numel() * x.element_size()
    return {
        "amax_gbs": nbytes / do_bench(lambda: amax(x)) / 1e6,
        "torch_gbs": nbytes / do_bench(lambda: x.abs().amax()) / 1e6,
    }
