"""Nibble packing for 4-bit codes (FP4 E2M1, INT4): two codes per byte along the last dim.

Element 2i goes in the low nibble and element 2i+1 in the high nibble, the layout of OCP MX
FP4 storage, torch's ``float4_e2m1fn_x2`` and torchao's ``pack_uint4``.
"""

from __future__ import annotations

import torch

from lowbit.errors import LowbitError

__all__ = ["pack_fp4", "unpack_fp4", "unpack_int4"]


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """(..., 2n) 4-bit codes (uint8 FP4 codes, or int8 INT4 codes in two's complement) -> (..., n) uint8."""
    if codes.dtype not in (torch.uint8, torch.int8):
        raise LowbitError(f"pack_fp4 needs uint8 or int8 codes, got {codes.dtype}")
    if codes.ndim == 0 or codes.shape[-1] % 2:
        raise LowbitError(f"pack_fp4 needs an even last dim, got shape {tuple(codes.shape)}; pad it to a multiple of 2")
    nibbles = codes.view(torch.uint8) & 0xF
    return nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """(..., n) uint8 -> (..., 2n) uint8 codes in 0..15 (inverse of ``pack_fp4``)."""
    if packed.dtype != torch.uint8:
        raise LowbitError(f"unpack_fp4 needs uint8 packed bytes, got {packed.dtype}")
    if packed.ndim == 0:
        raise LowbitError("unpack_fp4 needs at least one dimension, got a 0-d tensor")
    low, high = packed & 0xF, packed >> 4
    return torch.stack((low, high), dim=-1).view(*packed.shape[:-1], 2 * packed.shape[-1])


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """(..., n) uint8 -> (..., 2n) int8 INT4 codes in -8..7 (sign-extended nibbles)."""
    nibbles = unpack_fp4(packed).to(torch.int8)
    return (nibbles ^ 8) - 8
