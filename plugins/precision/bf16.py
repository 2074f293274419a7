"""The high-precision baseline: BF16 autocast where the device runs it fast, FP32 otherwise."""

from __future__ import annotations

from lowbit.autocast import AutocastPrecision

__all__ = ["BF16Precision"]


class BF16Precision(AutocastPrecision):
    """No quantization: every GEMM in BF16 (autocast) or FP32. The baseline every recipe is measured against."""

    lowbit_plugin_api = 1

    def __init__(self, *, device_type: str | None = None, mode: str = "auto") -> None:
        super().__init__(device_type=device_type, mode=mode)
