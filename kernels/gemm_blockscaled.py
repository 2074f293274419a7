"""Block-scaled low-precision GEMM: C = A · Bᵀ (+ bias) with A (M, K) and B (N, K) given as codes and
scales (MXFP8, MXFP4, NVFP4, FP8 tensor/row, and mixes such as FP8 x FP4), FP32 accumulation,
BF16 / FP16 / FP32 output.

An operand is E4M3 / E5M2 codes (uint8, (rows, K)) or packed E2M1 codes ((rows, K/2), element
2i in the low nibble), with decode scales that are either per K-block (E8M0 for MX, E4M3 / UE5M3
for NVFP4, blocks of 1 x c or r x c) or constant along K (one FP32 scale per tensor or per row),
and an optional FP32 second-level scale (NVFP4) and ``sr_prescale`` to divide out. Reference:
``dequantize(A) @ dequantize(B).T`` in FP32, equal up to the order of the FP32 accumulation.

Three ways to run the MMAs, picked per GPU and operand pair (``mode``):
  ``scaled``  ``tl.dot_scaled`` (native MX tensor cores on Blackwell, capability >= 10): both
              operands MX (E8M0 scales, 32-element blocks).
  ``fp8``     FP8 tensor cores (Hopper, Ada): E2M1 codes are upcast to E4M3 in registers (exact),
              one FP8 MMA per K-block, scaled by the two blocks' scales into the FP32 accumulator;
              scales constant along K are applied once in the epilogue. Needs K-blocks of 32 or
              more (the FP8 MMA's K), the same on both operands. Hopper's FP8 MMA adds E4M3/E5M2
              products at reduced precision: on an H200 the error reached ~2^-14 of the sum of
              |products| (E2M1 x E2M1 stays exact), where the other paths stay within FP32 order.
  ``bf16``    codes decoded in registers and multiplied by their block scale into BF16 (exact for
              E2M1 x E4M3 / UE5M3 and FP8 x E8M0 values: at most 8 significant bits), BF16 MMAs.
              NVFP4's 16-element blocks run here on Hopper.
  ``scaled_mm`` ``torch._scaled_mm`` (cuBLASLt), the default for FP8 tensorwise / rowwise pairs on
              CUDA where it supports them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from lowbit.errors import LowbitError
from lowbit.kernels._common import check_device, decode_scale, e2m1_to_e4m3, expand_blocks, interpreting, unpack_fp4

__all__ = ["MODES", "Operand", "benchmark", "default_mode", "gemm_blockscaled", "pick_mode", "scaled_mm"]

MODES = ("scaled", "fp8", "bf16", "scaled_mm")
_SCALE_FORMATS = ("fp32", "e8m0", "e4m3", "ue5m3")
_OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@dataclass
class Operand:
    """One GEMM operand, blocked along its last dim K.

    codes: uint8 (rows, K), or (rows, K/2) packed for ``e2m1``. scales: decode scales, float32 for
    ``scale_format="fp32"`` else uint8 codes; shape (rows / block[0], K / block[1]), or (1, 1) /
    (rows, 1) with ``block[1] == 0`` (one scale along all of K: tensor / row). global_scale: 0-d
    float32 decode scale multiplying everything (NVFP4) or None. prescale: the ``sr_prescale``
    the codes were encoded with (divided out).
    """

    codes: torch.Tensor
    element: str
    scales: torch.Tensor
    scale_format: str
    block: tuple[int, int]
    global_scale: torch.Tensor | None = None
    prescale: float = 1.0

    @property
    def k(self) -> int:
        return self.codes.shape[1] * (2 if self.element == "e2m1" else 1)


# ---- loads ---------------------------------------------------------------------------------
@triton.jit
def _load_fp8(ptr, offs_r, k0, R, K, stride_r, FMT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """Codes of rows ``offs_r``, columns k0 .. k0 + BLOCK_K, as an FP8 tile [BLOCK_R, BLOCK_K] (E2M1
    upcast to E4M3, exact); out-of-range codes are 0."""
    if FMT == "e2m1":
        offs_b = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        mask = (offs_r[:, None] < R) & (offs_b[None, :] < K // 2)
        packed = tl.load(ptr + offs_r[:, None] * stride_r + offs_b[None, :], mask=mask, other=0)
        codes = e2m1_to_e4m3(unpack_fp4(packed, BLOCK_R, BLOCK_K))
        return codes.to(tl.uint8).to(tl.float8e4nv, bitcast=True)
    else:
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask = (offs_r[:, None] < R) & (offs_k[None, :] < K)
        raw = tl.load(ptr + offs_r[:, None] * stride_r + offs_k[None, :], mask=mask, other=0)
        if FMT == "e4m3":
            return raw.to(tl.float8e4nv, bitcast=True)
        else:
            return raw.to(tl.float8e5, bitcast=True)


@triton.jit
def _load_packed(ptr, offs_r, k0, R, K, stride_r, FMT: tl.constexpr, BLOCK_K: tl.constexpr):
    """Codes as stored (uint8; E2M1 still packed), for ``tl.dot_scaled``."""
    WIDTH: tl.constexpr = BLOCK_K // 2 if FMT == "e2m1" else BLOCK_K
    offs_b = (k0 // 2 if FMT == "e2m1" else k0) + tl.arange(0, WIDTH)
    mask = (offs_r[:, None] < R) & (offs_b[None, :] < (K // 2 if FMT == "e2m1" else K))
    return tl.load(ptr + offs_r[:, None] * stride_r + offs_b[None, :], mask=mask, other=0)


@triton.jit
def _scale_column(s_ptr, offs_r, col, R, n_cols, stride_sr, stride_sk, S_ROWS: tl.constexpr, SFMT: tl.constexpr):
    """Decoded scales of rows ``offs_r`` in scale column ``col`` -> [BLOCK_R] float32 (0 past the
    last column: the K step may run past K, where the codes are 0 too)."""
    mask = (offs_r < R) & (col < n_cols)
    raw = tl.load(s_ptr + (offs_r // S_ROWS) * stride_sr + col * stride_sk, mask=mask, other=0)
    return decode_scale(raw, SFMT)


@triton.jit
def _scale_tile(s_ptr, offs_r, k0, R, K, stride_sr, stride_sk, S_ROWS: tl.constexpr, S_COLS: tl.constexpr,
                SFMT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """Decoded scales of rows ``offs_r``, columns k0 .. k0 + BLOCK_K, one per element [BLOCK_R, BLOCK_K]."""
    cols = k0 // S_COLS + tl.arange(0, BLOCK_K // S_COLS)
    mask = (offs_r[:, None] < R) & (cols[None, :] < K // S_COLS)
    raw = tl.load(s_ptr + (offs_r // S_ROWS)[:, None] * stride_sr + cols[None, :] * stride_sk, mask=mask, other=0)
    return expand_blocks(decode_scale(raw, SFMT), BLOCK_R, BLOCK_K, 1, S_COLS)


@triton.jit
def _bf16_operand(ptr, s_ptr, offs_r, k0, R, K, stride_r, stride_sr, stride_sk, FMT: tl.constexpr,
                  SFMT: tl.constexpr, S_ROWS: tl.constexpr, S_COLS: tl.constexpr,
                  BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BF16_DOT: tl.constexpr):  # fmt: skip
    """Decoded codes times their K-block scale, in BF16 (exact for the formats this mode takes)."""
    values = _load_fp8(ptr, offs_r, k0, R, K, stride_r, FMT, BLOCK_R, BLOCK_K).to(tl.float32)
    if S_COLS > 0:
        values = values * _scale_tile(
            s_ptr, offs_r, k0, R, K, stride_sr, stride_sk, S_ROWS, S_COLS, SFMT, BLOCK_R, BLOCK_K
        )
    if BF16_DOT:
        return values.to(tl.bfloat16)
    else:
        return values


# ---- kernel --------------------------------------------------------------------------------
@triton.jit
def _gemm_kernel(
    a_ptr, b_ptr, sa_ptr, sb_ptr, ga_ptr, gb_ptr, bias_ptr, c_ptr,
    M, N, K,
    stride_am, stride_bn, stride_sam, stride_sak, stride_sbn, stride_sbk, stride_cm, stride_cn,
    inv_prescale,
    A_FMT: tl.constexpr, B_FMT: tl.constexpr, A_SFMT: tl.constexpr, B_SFMT: tl.constexpr,
    A_SROWS: tl.constexpr, A_SCOLS: tl.constexpr, B_SROWS: tl.constexpr, B_SCOLS: tl.constexpr,
    HAS_GA: tl.constexpr, HAS_GB: tl.constexpr, HAS_BIAS: tl.constexpr, MODE: tl.constexpr,
    BF16_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    # grouped tile order (Triton tutorial 03): GROUP_M row tiles share the B tiles they read from L2
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * num_n)
    first_m = group * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_n)) % group_size
    pid_n = (pid % (GROUP_M * num_n)) // group_size
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if MODE == "scaled":  # native MX: both operands E8M0 scales on 32-element blocks
        for k0 in range(0, K, BLOCK_K):
            a = _load_packed(a_ptr, offs_m, k0, M, K, stride_am, A_FMT, BLOCK_K)
            b = _load_packed(b_ptr, offs_n, k0, N, K, stride_bn, B_FMT, BLOCK_K)
            cols = k0 // 32 + tl.arange(0, BLOCK_K // 32)
            sa = tl.load(sa_ptr + offs_m[:, None] * stride_sam + cols[None, :] * stride_sak,
                         mask=(offs_m[:, None] < M) & (cols[None, :] < K // 32), other=0)  # fmt: skip
            sb = tl.load(sb_ptr + offs_n[:, None] * stride_sbn + cols[None, :] * stride_sbk,
                         mask=(offs_n[:, None] < N) & (cols[None, :] < K // 32), other=0)  # fmt: skip
            acc = tl.dot_scaled(a, sa, A_FMT, tl.trans(b), sb, B_FMT, acc)
    elif MODE == "fp8":
        if A_SCOLS == 0 and B_SCOLS == 0:  # scales constant along K: one MMA chain, scaled after
            for k0 in range(0, K, BLOCK_K):
                a = _load_fp8(a_ptr, offs_m, k0, M, K, stride_am, A_FMT, BLOCK_M, BLOCK_K)
                b = _load_fp8(b_ptr, offs_n, k0, N, K, stride_bn, B_FMT, BLOCK_N, BLOCK_K)
                acc = tl.dot(a, tl.trans(b), acc)
        else:
            KS: tl.constexpr = A_SCOLS if A_SCOLS > 0 else B_SCOLS  # the K-block: one MMA each
            for k0 in range(0, K, BLOCK_K):
                for kk in tl.static_range(BLOCK_K // KS):
                    k1 = k0 + kk * KS
                    a = _load_fp8(a_ptr, offs_m, k1, M, K, stride_am, A_FMT, BLOCK_M, KS)
                    b = _load_fp8(b_ptr, offs_n, k1, N, K, stride_bn, B_FMT, BLOCK_N, KS)
                    part = tl.dot(a, tl.trans(b))  # (BLOCK_M, BLOCK_N) of one K-block
                    col = k1 // KS
                    if A_SCOLS > 0:
                        sa = _scale_column(sa_ptr, offs_m, col, M, K // KS, stride_sam, stride_sak, A_SROWS, A_SFMT)
                        part = part * sa[:, None]
                    if B_SCOLS > 0:
                        sb = _scale_column(sb_ptr, offs_n, col, N, K // KS, stride_sbn, stride_sbk, B_SROWS, B_SFMT)
                        part = part * sb[None, :]
                    acc += part
    else:  # bf16: scales folded into the operands
        for k0 in range(0, K, BLOCK_K):
            a = _bf16_operand(a_ptr, sa_ptr, offs_m, k0, M, K, stride_am, stride_sam, stride_sak,
                              A_FMT, A_SFMT, A_SROWS, A_SCOLS, BLOCK_M, BLOCK_K, BF16_DOT)  # fmt: skip
            b = _bf16_operand(b_ptr, sb_ptr, offs_n, k0, N, K, stride_bn, stride_sbn, stride_sbk,
                              B_FMT, B_SFMT, B_SROWS, B_SCOLS, BLOCK_N, BLOCK_K, BF16_DOT)  # fmt: skip
            if BF16_DOT:
                acc = tl.dot(a, tl.trans(b), acc)
            else:
                acc = tl.dot(a, tl.trans(b), acc, input_precision="ieee")

    # epilogue: scales constant along K, second-level scales, 1 / (prescale_a * prescale_b), bias
    if MODE != "scaled":
        if A_SCOLS == 0:
            acc = acc * _scale_column(sa_ptr, offs_m, 0, M, 1, stride_sam, 0, A_SROWS, A_SFMT)[:, None]
        if B_SCOLS == 0:
            acc = acc * _scale_column(sb_ptr, offs_n, 0, N, 1, stride_sbn, 0, B_SROWS, B_SFMT)[None, :]
    if HAS_GA:
        acc = acc * tl.load(ga_ptr)
    if HAS_GB:
        acc = acc * tl.load(gb_ptr)
    acc = acc * inv_prescale
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(
        c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn, acc.to(c_ptr.dtype.element_ty), mask=mask
    )


def _configs() -> list[triton.Config]:
    """Hopper-sized tiles (128 x 128 / 128 x 256 with 64- or 128-wide K steps) and smaller ones for
    skinny GEMMs; autotuned per shape and operand formats."""
    shapes = [
        (128, 256, 64, 3, 8),
        (256, 128, 64, 3, 8),
        (128, 128, 128, 3, 8),
        (128, 128, 64, 4, 4),
        (128, 64, 128, 4, 4),
        (64, 128, 128, 4, 4),
        (64, 64, 128, 5, 4),
    ]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_stages=s, num_warps=w)
        for m, n, k, s, w in shapes
    ]


def _prune(configs, named_args, **kwargs):
    """Drop tiles whose K step is not a whole number of K-blocks, and 256-wide tiles in the per-block
    FP8 mode (a second FP32 tile per K-block would spill registers)."""
    scols = [kwargs.get(n, named_args.get(n, 0)) for n in ("A_SCOLS", "B_SCOLS")]
    mode = kwargs.get("MODE", named_args.get("MODE"))
    keep = []
    for c in configs:
        bk = c.kwargs["BLOCK_K"]
        if any(s and bk % s for s in scols):
            continue
        if mode == "fp8" and any(scols) and max(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) > 128:
            continue
        keep.append(c)
    return keep or configs[-1:]


_gemm_autotuned = triton.autotune(
    configs=_configs(),
    key=["M", "N", "K", "A_FMT", "B_FMT", "A_SCOLS", "B_SCOLS", "MODE"],
    prune_configs_by={"early_config_prune": _prune},
)(_gemm_kernel)


def pick_mode(a: Operand, b: Operand, device: torch.device) -> str:
    """The MMA path for this operand pair on ``device`` (see the module docstring)."""
    cap = torch.cuda.get_device_capability(device) if device.type == "cuda" else (9, 0)
    mx = all(op.scale_format == "e8m0" and op.block == (1, 32) for op in (a, b))
    if mx and cap[0] >= 10:
        return "scaled"
    ka, kb = a.block[1], b.block[1]
    blocks_fit = (ka == kb or 0 in (ka, kb)) and all(k == 0 or k % 32 == 0 for k in (ka, kb))
    exact_scales = all(op.scale_format != "fp32" or op.block[1] == 0 for op in (a, b))
    if cap >= (8, 9) and blocks_fit and exact_scales:
        return "fp8"
    return "bf16"


def default_mode(a: Operand, b: Operand, out_dtype: torch.dtype = torch.bfloat16) -> str:
    """What :func:`gemm_blockscaled` runs by default: ``scaled_mm`` for FP8 tensor/row pairs cuBLASLt
    takes, else :func:`pick_mode`'s Triton path."""
    return "scaled_mm" if _scaled_mm_fits(a, b, out_dtype) else pick_mode(a, b, a.codes.device)


def _check(a: Operand, b: Operand, bias: torch.Tensor | None, out_dtype: torch.dtype, mode: str) -> None:
    for name, op in (("a", a), ("b", b)):
        if op.element not in ("e4m3", "e5m2", "e2m1"):
            raise LowbitError(f"gemm_blockscaled: operand {name} element '{op.element}' is not e4m3, e5m2 or e2m1")
        if op.scale_format not in _SCALE_FORMATS:
            raise LowbitError(
                f"gemm_blockscaled: operand {name} scale_format '{op.scale_format}' is not one of {', '.join(_SCALE_FORMATS)}"
            )
        if op.codes.dtype != torch.uint8 or op.codes.ndim != 2 or op.codes.stride(1) != 1:
            raise LowbitError(
                f"gemm_blockscaled: operand {name} codes must be 2-D uint8 with contiguous rows, got {op.codes.dtype} {tuple(op.codes.shape)}"
            )
        rows, cols = op.block
        if cols == 0:
            expect = [(1, 1), (op.codes.shape[0], 1)]
        else:
            expect = [(-(-op.codes.shape[0] // rows), op.k // cols)]
        if tuple(op.scales.shape) not in expect or (cols and op.k % cols):
            raise LowbitError(
                f"gemm_blockscaled: operand {name} scales have shape {tuple(op.scales.shape)}, expected {expect[-1]} for block {op.block} and codes {tuple(op.codes.shape)}"
            )
    if a.k != b.k:
        raise LowbitError(f"gemm_blockscaled: A has K={a.k} and B has K={b.k}; they must match")
    if out_dtype not in _OUT_DTYPES:
        raise LowbitError(f"gemm_blockscaled: out_dtype must be bfloat16, float16 or float32, got {out_dtype}")
    if bias is not None and tuple(bias.shape) != (b.codes.shape[0],):
        raise LowbitError(f"gemm_blockscaled: bias must have shape ({b.codes.shape[0]},), got {tuple(bias.shape)}")
    if mode not in MODES:
        raise LowbitError(f"gemm_blockscaled: unknown mode '{mode}'; valid: {', '.join(MODES)}")
    if mode == "scaled" and not all(op.scale_format == "e8m0" and op.block == (1, 32) for op in (a, b)):
        raise LowbitError(
            "gemm_blockscaled: mode 'scaled' (tl.dot_scaled) needs MX operands: E8M0 scales on 1x32 blocks"
        )
    if mode == "fp8" and not all(op.block[1] % 32 == 0 for op in (a, b)):
        raise LowbitError(
            f"gemm_blockscaled: mode 'fp8' needs K-blocks of 32 or a multiple (one FP8 MMA each), got {a.block} and {b.block}; use mode 'bf16'"
        )


def _scaled_mm_fits(a: Operand, b: Operand, out_dtype: torch.dtype) -> bool:
    """FP8 tensor/row-scaled pairs cuBLASLt runs (not E5M2 x E5M2; row scales need E4M3 and BF16 out)."""
    if a.codes.device.type != "cuda" or torch.cuda.get_device_capability(a.codes.device) < (8, 9):
        return False
    if any(op.element == "e2m1" or op.scale_format != "fp32" or op.block[1] != 0 for op in (a, b)):
        return False
    if a.element == b.element == "e5m2" or a.prescale != 1.0 or b.prescale != 1.0:
        return False
    m, k = a.codes.shape
    n = b.codes.shape[0]
    if m % 16 or n % 16 or k % 16:
        return False
    rowwise = a.scales.numel() > 1 or b.scales.numel() > 1
    return not rowwise or (a.element == b.element == "e4m3" and out_dtype == torch.bfloat16)


def scaled_mm(a: Operand, b: Operand, bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """An FP8 tensorwise / rowwise pair through ``torch._scaled_mm`` (cuBLASLt), the ``scaled_mm`` mode."""
    fp8 = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
    rowwise = a.scales.numel() > 1 or b.scales.numel() > 1
    sa = a.scales.expand(a.codes.shape[0], 1).contiguous() if rowwise else a.scales.reshape(())
    sb = b.scales.reshape(1, -1).expand(1, b.codes.shape[0]).contiguous() if rowwise else b.scales.reshape(())
    return torch._scaled_mm(
        a.codes.view(fp8[a.element]),
        b.codes.view(fp8[b.element]).t(),
        scale_a=sa,
        scale_b=sb,
        bias=None if bias is None else bias.to(out_dtype),
        out_dtype=out_dtype,
    )


def _flatten(op: Operand) -> tuple:
    g = op.global_scale
    return (op.codes, op.scales, g, op.element, op.scale_format, op.block[0], op.block[1], op.prescale)


@torch.library.custom_op("lowbit::gemm_blockscaled", mutates_args=())
def _gemm_op(
    a_codes: torch.Tensor,
    a_scales: torch.Tensor,
    a_global: torch.Tensor | None,
    a_element: str,
    a_scale_format: str,
    a_block_rows: int,
    a_block_cols: int,
    a_prescale: float,
    b_codes: torch.Tensor,
    b_scales: torch.Tensor,
    b_global: torch.Tensor | None,
    b_element: str,
    b_scale_format: str,
    b_block_rows: int,
    b_block_cols: int,
    b_prescale: float,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    mode: str,
) -> torch.Tensor:
    a = Operand(a_codes, a_element, a_scales, a_scale_format, (a_block_rows, a_block_cols), a_global, a_prescale)
    b = Operand(b_codes, b_element, b_scales, b_scale_format, (b_block_rows, b_block_cols), b_global, b_prescale)
    if mode == "scaled_mm":
        return scaled_mm(a, b, bias, out_dtype)
    m, n, k = a.codes.shape[0], b.codes.shape[0], a.k
    c = torch.empty(m, n, dtype=out_dtype, device=a.codes.device)

    def scale_strides(op: Operand) -> tuple[int, int]:
        if op.block[1] == 0 and op.scales.numel() == 1:
            return 0, 0  # one scale for the tensor
        return op.scales.stride(0), op.scales.stride(1)

    (sam, sak), (sbn, sbk) = scale_strides(a), scale_strides(b)
    args = (
        a.codes, b.codes, a.scales, b.scales,
        a.global_scale if a.global_scale is not None else a.scales,
        b.global_scale if b.global_scale is not None else b.scales,
        bias if bias is not None else a.scales, c,
        m, n, k,
        a.codes.stride(0), b.codes.stride(0), sam, sak, sbn, sbk, c.stride(0), c.stride(1),
        1.0 / (a.prescale * b.prescale),
    )  # fmt: skip
    meta = dict(
        A_FMT=a.element, B_FMT=b.element, A_SFMT=a.scale_format, B_SFMT=b.scale_format,
        A_SROWS=a.block[0] if a.block[1] else 1, A_SCOLS=a.block[1],
        B_SROWS=b.block[0] if b.block[1] else 1, B_SCOLS=b.block[1],
        HAS_GA=a.global_scale is not None, HAS_GB=b.global_scale is not None, HAS_BIAS=bias is not None, MODE=mode,
        # the interpreter has no bfloat16 matmul: float32 there (the values are exact in both)
        BF16_DOT=not interpreting(),
    )  # fmt: skip
    if interpreting():
        grid = (triton.cdiv(m, 32) * triton.cdiv(n, 32),)
        _gemm_kernel[grid](*args, **meta, BLOCK_M=32, BLOCK_N=32, BLOCK_K=64, GROUP_M=4)
    else:
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)
        _gemm_autotuned[grid](*args, **meta)
    return c


@_gemm_op.register_fake
def _(a_codes, a_scales, a_global, a_element, a_scale_format, a_block_rows, a_block_cols, a_prescale, b_codes,
      b_scales, b_global, b_element, b_scale_format, b_block_rows, b_block_cols, b_prescale, bias, out_dtype, mode):  # fmt: skip
    return a_codes.new_empty(a_codes.shape[0], b_codes.shape[0], dtype=out_dtype)


def gemm_blockscaled(
    a: Operand,
    b: Operand,
    *,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
    mode: str | None = None,
) -> torch.Tensor:
    """C = dequantize(a) @ dequantize(b).T (+ bias): (M, N) of ``out_dtype``, FP32 accumulation.

    ``mode``: ``scaled``, ``fp8``, ``bf16`` or ``scaled_mm``; by default FP8 tensor/row pairs run
    ``torch._scaled_mm`` on CUDA where it supports them, anything else :func:`pick_mode`'s path.
    """
    check_device(a.codes, b.codes, what="gemm_blockscaled")
    mode = mode or default_mode(a, b, out_dtype)
    _check(a, b, bias, out_dtype, mode)
    if mode == "scaled_mm" and not _scaled_mm_fits(a, b, out_dtype):
        raise LowbitError(
            "gemm_blockscaled: mode 'scaled_mm' needs FP8 tensor/row-scaled operands on a CUDA GPU with FP8"
        )
    return torch.ops.lowbit.gemm_blockscaled(*_flatten(a), *_flatten(b), bias, out_dtype, mode)


def benchmark(size: int = 8192) -> dict[str, float]:
    """TFLOP/s of MXFP8, MXFP4, NVFP4 and FP8 x FP4 GEMMs (size^3) against BF16 ``torch.matmul`` and
    tensorwise FP8 ``torch._scaled_mm``; CUDA only."""
    from triton.testing import do_bench

    from lowbit.kernels.quantize_fp8 import quantize_fp8
    from lowbit.kernels.quantize_mx import quantize_mx
    from lowbit.kernels.quantize_nvfp4 import quantize_nvfp4

    x = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)

    def mx(t, element):
        codes, scales, _, _ = quantize_mx(t, element)
        return Operand(codes, element, scales, "e8m0", (1, 32))

    def nvfp4(t):
        codes, scales, g, *_ = quantize_nvfp4(t)
        return Operand(codes, "e2m1", scales, "e4m3", (1, 16), g)

    def fp8(t):
        codes, scales, *_ = quantize_fp8(t)
        return Operand(codes, "e4m3", scales, "fp32", (1, 0))

    flop = 2 * size**3
    tflops = lambda fn: flop / do_bench(fn) / 1e9
    pairs = {
        "mxfp8": (mx(x, "e4m3"), mx(w, "e4m3")),
        "mxfp4": (mx(x, "e2m1"), mx(w, "e2m1")),
        "nvfp4": (nvfp4(x), nvfp4(w)),
        "mxfp8_x_mxfp4": (mx(x, "e4m3"), mx(w, "e2m1")),
    }
    out = {name: tflops(lambda a=a, b=b: gemm_blockscaled(a, b)) for name, (a, b) in pairs.items()}
    a8, b8 = fp8(x), fp8(w)
    out["fp8_tensor_triton"] = tflops(lambda: gemm_blockscaled(a8, b8, mode="fp8"))
    out["torch_bf16"] = tflops(lambda: torch.matmul(x, w.t()))
    out["torch_scaled_mm_fp8"] = tflops(lambda: scaled_mm(a8, b8, None, torch.bfloat16))
    return out
