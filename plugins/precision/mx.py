"""OCP Microscaling recipes: MXFP8 everywhere, and MXFP4 as Tseng et al. train it
("Training LLMs with MXFP4", arXiv 2502.20586): stochastic rounding with 3/4 pre-scaling on the
gradients and a random Hadamard transform on the backward GEMMs' contraction dims."""

from __future__ import annotations

from lowbit.quant.precision import GemmPrecision

__all__ = ["MXFP4BackwardPrecision", "MXFP4Precision", "MXFP8Precision"]

_MXFP8 = {"preset": "mxfp8_e4m3"}
_MXFP4 = {"preset": "mxfp4"}
_MXFP4_SR = {"preset": "mxfp4", "rounding": "sr", "sr_prescale": 0.75}


class MXFP8Precision(GemmPrecision):
    """MXFP8 (E4M3 elements, 32-element blocks, E8M0 scales) for every operand of every GEMM."""

    lowbit_plugin_api = 1
    name = "mxfp8"
    defaults = {
        "fprop": {"x": _MXFP8, "w": _MXFP8},
        "dgrad": {"dy": _MXFP8, "w": _MXFP8},
        "wgrad": {"dy": _MXFP8, "x": _MXFP8},
    }


class MXFP4Precision(GemmPrecision):
    """MXFP4 in all three GEMMs: forward RNE; gradients SR with 3/4 pre-scaling; RHT-32 on dgrad and wgrad."""

    lowbit_plugin_api = 1
    name = "mxfp4"
    defaults = {
        "fprop": {"x": _MXFP4, "w": _MXFP4, "rht": 0},
        "dgrad": {"dy": _MXFP4_SR, "w": _MXFP4, "rht": 32},
        "wgrad": {"dy": _MXFP4_SR, "x": _MXFP4, "rht": 32},
    }


class MXFP4BackwardPrecision(GemmPrecision):
    """Tseng et al.'s exact recipe: forward in high precision, backward GEMMs MXFP4 with SR and RHT-32."""

    lowbit_plugin_api = 1
    name = "mxfp4_bwd"
    defaults = {
        "fprop": {"x": None, "w": None, "rht": 0},
        "dgrad": {"dy": _MXFP4_SR, "w": _MXFP4, "rht": 32},
        "wgrad": {"dy": _MXFP4_SR, "x": _MXFP4, "rht": 32},
    }
