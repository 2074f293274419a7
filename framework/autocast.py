"""Autocast precision: BF16 autocast where the device runs it fast, FP32 otherwise.

The base of every lowbit precision plugin (the ``bf16`` baseline and the quantized ones):
master weights stay FP32, ``forward_context`` enters ``torch.autocast`` and leaves it on exit,
exceptions included. The autocast device follows the model: left unset, it is CUDA when a GPU is
visible and is settled when Lightning connects the plugin to the model on its device, so
``Trainer(plugins=[NVFP4Precision()])`` autocasts on whatever accelerator the Trainer picked.
"""

from __future__ import annotations

from collections.abc import Generator
from contextlib import contextmanager
from typing import Any

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

    ``device_type``: the autocast device (``cpu``, ``cuda``); None (the default) follows the model's
    device once Lightning has moved it there, and until then guesses ``cuda`` if one is visible.
    ``mode``: ``auto`` (BF16 where fast, else FP32, and ``description`` says which), ``bf16``, ``fp32``.
    """

    # Lightning's precision string sizes the model in its summary by the dtype parameters are stored
    # in: FP32 master weights here, whatever the GEMMs compute in (``compute`` says that). Lightning's
    # summary knows no ``*-mixed`` string and warns that its estimate is wrong for one.
    precision = "32-true"

    def __init__(self, *, device_type: str | None = None, mode: str = "auto") -> None:
        super().__init__()
        if mode not in AUTOCAST_MODES:
            raise LowbitError(f"precision.mode must be one of {', '.join(AUTOCAST_MODES)}, got '{mode}'")
        self.mode = mode
        self._follow_model = device_type is None
        self._set_device_type(device_type or ("cuda" if torch.cuda.is_available() else "cpu"))

    def _set_device_type(self, device_type: str) -> None:
        mode = self.mode
        self.device_type = device_type
        self.enabled = mode == "bf16" or (mode == "auto" and bf16_is_fast(device_type))
        why = (
            ""
            if mode != "auto"
            else (" (native BF16 on this device)" if self.enabled else " (this device has no fast BF16)")
        )
        self.compute = f"{'BF16 autocast' if self.enabled else 'FP32'} on {device_type}{why}"

    def connect(self, model: Any, optimizers: Any, lr_schedulers: Any) -> Any:
        """Lightning calls this once the model is on its device: autocast there, unless told otherwise."""
        device = next((t.device for t in (*model.parameters(), *model.buffers())), None)
        if device is not None and device.type != "meta" and device.type != self.device_type:
            if not self._follow_model:
                raise LowbitError(
                    f"precision device_type='{self.device_type}' but the model is on {device.type}: autocast would "
                    f"not reach its GEMMs; leave device_type unset (None) to follow the model, or set '{device.type}'"
                )
            self._set_device_type(device.type)
        return super().connect(model, optimizers, lr_schedulers)

    @property
    def description(self) -> str:
        return self.compute

    @contextmanager
    def forward_context(self) -> Generator[None, None, None]:
        # the context manager restores the previous autocast state on exit, exceptions included
        with torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.enabled):
            yield
