"""HiFloat8 training (Luo et al., "Ascend HiFloat8 Format for Deep Learning", arXiv 2409.16626): one
8-bit format, HiF8, for every GEMM input — activations and weights in the forward, the output gradient
in both backward GEMMs — rounded ties-away (TA, the paper's only rounding in its LLM runs), with the
paper's per-tensor power-of-two scales ("PTS"); everything else (norms, softmax, the head) in high
precision.

Where the scale puts amax matters for a tapered format: HiF8 has 3 mantissa bits only for
|exponent| <= 3, 2 up to 7 and 1 up to 15, so mapping amax to the format's max (2^15, E4M3's habit)
leaves most values with 1 bit. The paper does not give its target; Huawei's training code (MindSpeed's
tensorwise HiF8 recipe) maps activations and weights to 15 and gradients to 224, the tops of the 3- and
2-bit bands, recomputed every step, and those are the defaults here (``forward_target``,
``backward_target``); with ``pow2_scale`` the scale is the largest power of two keeping amax at or under
the target. The paper refreshes its scales every 10 steps and adds adaptive loss scaling; with a scale
per gradient tensor every step, loss scaling has nothing left to rescue, and lowbit has none.
"""

from __future__ import annotations

from typing import Any

from lowbit.errors import LowbitError
from lowbit.quant.precision import GemmPrecision

__all__ = ["HiF8Precision", "hif8_gemms", "hif8_spec"]

FORWARD_TARGET = 15.0  # 1.875 * 2^3: the largest HiF8 value with 3 mantissa bits
BACKWARD_TARGET = 224.0  # 1.75 * 2^7: the largest with 2 mantissa bits


def hif8_spec(target: float, rounding: str = "ta", pow2_scale: bool = True) -> dict[str, Any]:
    """One HiF8 operand: a per-tensor FP32 scale mapping amax to ``target``."""
    return {"element": "hif8", "block": "tensor", "rounding": rounding, "pow2_scale": pow2_scale, "amax_target": target}


def hif8_gemms(
    forward_target: float = FORWARD_TARGET,
    backward_target: float = BACKWARD_TARGET,
    rounding: str = "ta",
    pow2_scale: bool = True,
) -> dict[str, dict[str, Any]]:
    """The three GEMMs' operand specs: x and w mapped to ``forward_target``, dy to ``backward_target``."""
    fwd = hif8_spec(forward_target, rounding, pow2_scale)
    bwd = hif8_spec(backward_target, rounding, pow2_scale)
    return {
        "fprop": {"x": fwd, "w": fwd, "rht": 0},
        "dgrad": {"dy": bwd, "w": fwd, "rht": 0},
        "wgrad": {"dy": bwd, "x": fwd, "rht": 0},
    }


class HiF8Precision(GemmPrecision):
    """fprop: x, w HiF8 (amax -> 15); dgrad: dy (amax -> 224), w; wgrad: dy, x. Per-tensor, TA, power-of-two scales.

    ``forward_target`` / ``backward_target`` / ``rounding`` / ``pow2_scale`` rebuild the three GEMMs' specs;
    ``fprop`` / ``dgrad`` / ``wgrad`` replace a GEMM's specs outright, as in every GemmPrecision.
    """

    lowbit_plugin_api = 1
    name = "hif8"
    defaults = hif8_gemms()

    @classmethod
    def config_defaults(cls) -> dict[str, Any]:
        """The config shows the targets, rounding and scale rule; ``fprop``/``dgrad``/``wgrad`` stay null
        (built from those) unless a config replaces one."""
        return {}

    def __init__(
        self,
        *,
        forward_target: float = FORWARD_TARGET,
        backward_target: float = BACKWARD_TARGET,
        rounding: str = "ta",
        pow2_scale: bool = True,
        fprop: dict | None = None,
        dgrad: dict | None = None,
        wgrad: dict | None = None,
        **kwargs: Any,
    ) -> None:
        if rounding not in ("ta", "rne", "sr"):
            raise LowbitError(f"hif8 rounding must be ta (the paper's), rne or sr, got {rounding!r}")
        built = hif8_gemms(forward_target, backward_target, rounding, pow2_scale)
        super().__init__(
            fprop=built["fprop"] if fprop is None else fprop,
            dgrad=built["dgrad"] if dgrad is None else dgrad,
            wgrad=built["wgrad"] if wgrad is None else wgrad,
            **kwargs,
        )
