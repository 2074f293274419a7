"""INT5 with a symmetric ("narrow") range: codes -15..15, no -16.

Two's-complement INT5 spans [-16, 15]; dropping -16 makes the grid symmetric, so +x and -x
quantize to mirror images and a symmetric scale (amax / 15) uses the whole range on both sides
(the "narrow range" of TensorFlow's fake-quant ops and TensorRT's INT8 calibration).

Built on lowbit's ``IntFormat``: encoding scales nothing (the quantizer has already divided by
the block scale), rounds the magnitude to an integer with the requested rounding (``rne``: ties to
even, ``sr``: stochastic), restores the sign and clamps to [qmin, qmax]; NaN encodes as 0.
Only ``qmin`` changes here. Codes are int8 tensors holding the integer itself.
"""

from __future__ import annotations

from dataclasses import dataclass

from lowbit.numerics.formats import IntFormat

__all__ = ["TPL_INT5", "NarrowIntFormat"]


@dataclass(frozen=True, repr=False)
class NarrowIntFormat(IntFormat):
    """Signed integer of ``bits`` bits with the symmetric range [-(2^(bits-1) - 1), 2^(bits-1) - 1]."""

    lowbit_plugin_api = 1  # the plugin API this targets; lowbit refuses a mismatch with a clear error

    @property
    def qmin(self) -> int:
        return -self.qmax


TPL_INT5 = NarrowIntFormat("tpl_int5", bits=5)
"""The registered object (entry point ``lowbit.formats: tpl_int5``): values -15, -14, ..., 15."""
