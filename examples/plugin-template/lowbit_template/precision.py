"""W5A5G5: every operand of every GEMM of a Linear layer in narrow-range INT5 (``tpl_int5``).

Blocks of 32 along each GEMM's contraction dim with one FP32 scale each (amax / 15), as lowbit's
``int4_group32`` preset does for INT4. The forward GEMM rounds to nearest even; the gradient
``dy`` in both backward GEMMs rounds stochastically, so its quantization error is unbiased.
The ``element`` names the format by its registry name: lowbit resolves it through the
``lowbit.formats`` entry point of this distribution.
"""

from __future__ import annotations

from lowbit.plugins.precision.custom import CustomPrecision

__all__ = ["Int5Precision"]

_INT5 = {"element": "tpl_int5", "block": [1, 32], "scale_format": "fp32"}
_INT5_SR = {**_INT5, "rounding": "sr"}


class Int5Precision(CustomPrecision):
    """INT5 (narrow range, 1x32 blocks, FP32 scales) in fprop, dgrad and wgrad; SR on gradients.

    Options (each overridable from the command line, e.g. ``precision.keep=[lm_head,'*.qkv']``):
    ``fprop``/``dgrad``/``wgrad`` (operand specs), ``keep`` (globs kept in high precision),
    ``keep_last_blocks``, ``backend`` (``auto``, ``emulate``, ``triton``), ``mode`` (autocast).
    """

    lowbit_plugin_api = 1
    name = "tpl_int5"
    defaults = {
        "fprop": {"x": _INT5, "w": _INT5},
        "dgrad": {"dy": _INT5_SR, "w": _INT5},
        "wgrad": {"dy": _INT5_SR, "x": _INT5},
    }
