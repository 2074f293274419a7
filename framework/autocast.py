"""Autocast precision: BF16 autocast where the device runs it fast, FP32 otherwise.

The base of every lowbit precision plugin (the ``bf16`` baseline and the quantized ones):
master weights stay FP32, ``forward_context`` enters ``torch.autocast`` and leaves it on exit,
exceptions included.
"""

from __future__ import annotations

from collections.abc import Generator
from contextlib import contextmanager

import torch
from lightning.pytorch.plugins.precision import Precision

from lowbit.errors import LowbitError

__all__ = ["AUTOCAST_MODES", "AutocastPrecision", "bf16_is_fast"]

AUTOCAST_MODES = ("auto", "bf16", "fp32")


def bf16_is_fast(device_type: str) -> bool:
    """True on CUDA GPUs with BF16 support and on CPUs with native BF16 (AVX512-BF16 / AMX)."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device_type == "cpu":
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


class AutocastPrecision(Precision):
    """BF16 mixed precision: FP32 master weights, compute under ``torch.autocast(bfloat16)``.

    ``mode``: ``auto`` (BF16 where fast, else FP32, and ``description`` says which), ``bf16``, ``fp32``.
    """

    def __init__(self, *, device_type: str = "cpu", mode: str = "auto") -> None:
        super().__init__()
        if mode not in AUTOCAST_MODES:
            raise LowbitError(f"precision.mode must be one of {', '.join(AUTOCAST_MODES)}, got '{mode}'")
        self.device_type = device_type
        self.enabled = mode == "bf16" or (mode == "auto" and bf16_is_fast(device_type))
        self.precision = "bf16-mixed" if self.enabled else "32-true"
        why = (
            ""
            if mode != "auto"
            else (" (native BF16 on this device)" if self.enabled else " (this device has no fast BF16)")
        )
        self.compute = f"{'BF16 autocast' if self.enabled else 'FP32'} on {device_type}{why}"

    @property
    def description(self) -> str:
        return self.compute

    @contextmanager
    def forward_context(self) -> Generator[None, None, None]:
        # the context manager restores the previous autocast state on exit, exceptions included
        with torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.enabled):
            yield
