"""NVFP4 training as NVIDIA's recipe does it ("Pretraining Large Language Models with NVFP4",
arXiv 2509.25149; Transformer Engine's NVFP4BlockScaling): E2M1 elements, 1x16 blocks with E4M3
scales under an FP32 tensor scale; weights in 16x16 blocks so the forward and backward GEMMs
see the same quantized weight; stochastic rounding on gradients; a 16-point random Hadamard
transform on the weight-gradient GEMM; the last ~15% of blocks (and the head) in high precision."""

from __future__ import annotations

from lowbit.quant.precision import GemmPrecision

__all__ = ["NVFP4Precision"]

_X = {"preset": "nvfp4"}
_W = {"preset": "nvfp4_2d"}
_DY_SR = {"preset": "nvfp4", "rounding": "sr"}


class NVFP4Precision(GemmPrecision):
    """fprop: x 1x16 RNE, w 16x16 RNE; dgrad: dy 1x16 SR, w 16x16; wgrad: dy SR and x, RHT-16."""

    lowbit_plugin_api = 1
    name = "nvfp4"
    defaults = {
        "fprop": {"x": _X, "w": _W, "rht": 0},
        "dgrad": {"dy": _DY_SR, "w": _W, "rht": 0},
        "wgrad": {"dy": _DY_SR, "x": _X, "rht": 16},
    }

    def __init__(self, *, keep_last_blocks: int | float = 0.15, **kwargs) -> None:
        super().__init__(keep_last_blocks=keep_last_blocks, **kwargs)
