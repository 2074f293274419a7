"""``QTensor``: the result of :func:`lowbit.numerics.quantize` — codes, scales, and their spec."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.numerics.spec import QuantSpec

__all__ = ["QTensor"]


@dataclass
class QTensor:
    """A quantized tensor, unpacked (one code per element; see ``pack_fp4`` for FP4/INT4 storage).

    codes: ``shape``; uint8 for float formats (sign in the top bit of the format's width),
        int8 for integer formats. With a Hadamard transform these encode the transformed tensor.
    scales: float32 *decode* block scales, shaped like the tensor with each blocked dim divided
        by its block size (see :mod:`lowbit.numerics.blocks`).
    scale_codes: the same scales in the scale format's codes (uint8 for E8M0/E4M3/UE5M3, the
        int32 bit pattern for FP32).
    global_scale: NVFP4's second-level float32 decode scale (0-d), or None.
    zero_points: int32 zero points for asymmetric integers (shape of ``scales``), or None.
    spec, shape, dtype: how it was quantized, and the original shape and dtype.
    Decode: x ~= (decode(codes) - zero_point) * scales * global_scale / spec.sr_prescale, then
    the inverse Hadamard transform.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    scale_codes: torch.Tensor
    global_scale: torch.Tensor | None
    zero_points: torch.Tensor | None
    spec: QuantSpec
    shape: tuple[int, ...]
    dtype: torch.dtype

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Same as ``lowbit.numerics.dequantize(self, dtype)``."""
        from lowbit.numerics.quantize import dequantize

        return dequantize(self, dtype)

    @property
    def device(self) -> torch.device:
        return self.codes.device

    def storage_bits(self) -> int:
        """Bits this tensor occupies packed: elements at the format's width plus scale codes."""
        from lowbit.numerics.formats import get_format

        element_bits = get_format(self.spec.element).bits * self.codes.numel()
        scale_bits = get_format(self.spec.scale_format).bits * self.scale_codes.numel()
        return element_bits + scale_bits + (32 if self.global_scale is not None else 0)
