"""Quantization-aware training presets: fake quantization in the forward, straight-through
gradients, master weights in high precision; ``lowbit export`` turns the result into real low-bit
weights (see ``lowbit.quant.qat`` for the quantizers and their gradients).

  qat_int8   W8A8 (Krishnamoorthi 2018): INT8 weights per output channel, INT8 inputs per token
             (dynamic) or per tensor (static, calibrated); ``lsq`` learns the step sizes.
  qat_int4   W4A8 as torchao's 8da4w: INT4 weights in groups of 32, INT8 dynamic per-token inputs;
             ``activations=none`` for weight-only W4; learned step sizes (LSQ) by default.
  qat_fixed  trainable fixed point (QFX): power-of-two scales with a learned binary point per
             tensor, weights and inputs, ``bits``-bit words (8, 6, 4).
  qat_nvfp4  NVFP4 weights (E2M1, 1x16 blocks, E4M3 scales, FP32 tensor scale), inputs optionally.
  qat_mxfp4  MXFP4 weights (E2M1, 1x32 blocks, E8M0 scales), inputs optionally.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

from torch import nn

from lowbit.errors import LowbitError
from lowbit.quant.convert import DEFAULT_KEEP
from lowbit.quant.qat import QATPrecision

__all__ = ["QATFixedPrecision", "QATInt4Precision", "QATInt8Precision", "QATMXFP4Precision", "QATNVFP4Precision"]

_INT8_TOKEN = {"element": "int8", "block": "row"}  # one scale per token (a row of the (N, in) input)
_INT8_TENSOR = {"element": "int8", "block": "tensor"}
_ACTIVATIONS = ("dynamic", "static", "none")


def _check_bits(bits: Any, what: str) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise LowbitError(f"{what} must be an integer from 2 to 8, got {bits!r}")
    return bits


def _check_choice(value: str, valid: Sequence[str], what: str) -> str:
    if value not in valid:
        raise LowbitError(f"{what} must be one of {', '.join(valid)}, got {value!r}")
    return value


class _StrictQAT(QATPrecision):
    """A QAT preset: layers whose width the blocks do not divide stay in high precision with one
    warning (as torchao's 8da4w skips them), but a group size that divides no layer's width is the
    user's error, not a silently high-precision model."""

    def convert_module(self, module: nn.Module) -> nn.Module:
        first = not self.report.converted
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            super().convert_module(module)
        r = self.report
        if r.misfit and not r.converted:
            widths = ", ".join(sorted({m.rpartition("x")[2].rstrip(")") for m in r.misfit}, key=int))
            raise LowbitError(
                f"precision '{self.name}': block size {self.multiples()['in']} divides no Linear layer's in_features "
                f"({widths}); pick a group_size that divides them (such as 32 or 16)"
            )
        for w in caught if first else ():  # a second call (Lightning's, after build's) repeats nothing
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        return module


class QATInt8Precision(_StrictQAT):
    """W8A8: INT8 per-channel weights; INT8 inputs per token (``dynamic``), per tensor (``static``,
    calibrated over ``calibration_steps`` forwards, or learned with ``lsq``), or ``none``.
    ``weight_mode`` overrides where the weight scales come from (``static``: stored, as
    ``lowbit quantize`` writes them; default: ``lsq`` if lsq else ``minmax``); ``scale_dtype=fp16`` keeps
    learned scales on FP16's grid."""

    lowbit_plugin_api = 1
    name = "qat_int8"

    def __init__(
        self,
        *,
        activations: str = "dynamic",
        lsq: bool = False,
        weight_mode: str | None = None,
        scale_dtype: str = "fp32",
        calibration_steps: int = 32,
        keep: Sequence[str] = DEFAULT_KEEP,
        keep_last_blocks: int | float = 0,
        device_type: str | None = None,
        mode: str = "auto",
    ) -> None:
        _check_choice(activations, _ACTIVATIONS, "qat_int8 activations")
        activation_spec = {"dynamic": _INT8_TOKEN, "static": _INT8_TENSOR, "none": None}[activations]
        activation_mode = "minmax" if activations == "dynamic" else ("lsq" if lsq else "static")
        self.activations, self.lsq = activations, lsq
        super().__init__(
            weight={"element": "int8", "block": "row"},
            weight_mode=weight_mode or ("lsq" if lsq else "minmax"),
            activation=activation_spec,
            activation_mode=activation_mode,
            calibration_steps=calibration_steps,
            scale_dtype=scale_dtype,
            keep=keep,
            keep_last_blocks=keep_last_blocks,
            device_type=device_type,
            mode=mode,
        )


class QATInt4Precision(_StrictQAT):
    """W4A8 (torchao's 8da4w): ``bits``-bit weights in groups of ``group_size`` along the input dim,
    learned step sizes (``lsq``) and optionally zero points (``zero_point``, LSQ+); INT8 dynamic
    per-token inputs, or ``activations=none`` for weight-only. ``weight_mode`` as qat_int8's.
    ``scale_dtype``: the learned scales on FP16's grid (default; an export stores 4.5 bits per weight
    at groups of 32, 0.28x BF16) or ``fp32`` (5 bits per weight)."""

    lowbit_plugin_api = 1
    name = "qat_int4"

    def __init__(
        self,
        *,
        group_size: int = 32,
        bits: int = 4,
        activations: str = "dynamic",
        lsq: bool = True,
        zero_point: bool = False,
        weight_mode: str | None = None,
        scale_dtype: str = "fp16",
        keep: Sequence[str] = DEFAULT_KEEP,
        keep_last_blocks: int | float = 0,
        device_type: str | None = None,
        mode: str = "auto",
    ) -> None:
        _check_bits(bits, "qat_int4 bits")
        _check_choice(activations, ("dynamic", "none"), "qat_int4 activations")
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise LowbitError(f"qat_int4 group_size must be a positive integer such as 32, got {group_size!r}")
        self.group_size, self.bits, self.activations, self.lsq = group_size, bits, activations, lsq
        super().__init__(
            weight={"element": f"int{bits}", "block": [1, group_size], "asymmetric": zero_point},
            weight_mode=weight_mode or ("lsq" if lsq else "minmax"),
            activation=_INT8_TOKEN if activations == "dynamic" else None,
            learn_zero_point=zero_point and lsq,
            scale_dtype=scale_dtype,
            keep=keep,
            keep_last_blocks=keep_last_blocks,
            device_type=device_type,
            mode=mode,
        )


class QATFixedPrecision(_StrictQAT):
    """Trainable fixed point (QFX): ``bits``-bit words, one power-of-two scale per weight and per
    input tensor, its binary point learned (``activations=false``: weights only)."""

    lowbit_plugin_api = 1
    name = "qat_fixed"

    def __init__(
        self,
        *,
        bits: int = 8,
        activations: bool = True,
        keep: Sequence[str] = DEFAULT_KEEP,
        keep_last_blocks: int | float = 0,
        device_type: str | None = None,
        mode: str = "auto",
    ) -> None:
        spec = {"element": f"int{_check_bits(bits, 'qat_fixed bits')}", "block": "tensor"}
        self.bits, self.activations = bits, activations
        super().__init__(
            weight=spec,
            weight_mode="fixed",
            activation=spec if activations else None,
            activation_mode="fixed",
            keep=keep,
            keep_last_blocks=keep_last_blocks,
            device_type=device_type,
            mode=mode,
        )


class QATNVFP4Precision(_StrictQAT):
    """NVFP4 weights for FP4 inference (E2M1 in 1x16 blocks along the input dim, E4M3 block scales,
    FP32 tensor scale; min/max ranges), and the inputs too with ``activations=true``."""

    lowbit_plugin_api = 1
    name = "qat_nvfp4"
    preset = "nvfp4"

    def __init__(
        self,
        *,
        activations: bool = False,
        keep: Sequence[str] = DEFAULT_KEEP,
        keep_last_blocks: int | float = 0,
        device_type: str | None = None,
        mode: str = "auto",
    ) -> None:
        self.activations = activations
        super().__init__(
            weight=self.preset,
            activation=self.preset if activations else None,
            keep=keep,
            keep_last_blocks=keep_last_blocks,
            device_type=device_type,
            mode=mode,
        )


class QATMXFP4Precision(QATNVFP4Precision):
    """MXFP4 weights for FP4 inference (E2M1 in 1x32 blocks, E8M0 scales), and the inputs with
    ``activations=true``."""

    lowbit_plugin_api = 1
    name = "qat_mxfp4"
    preset = "mxfp4"
