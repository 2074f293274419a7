"""FP8 training, "hybrid" as in Micikevicius et al. 2022 (FP8 Formats for Deep Learning) and
Transformer Engine: E4M3 for activations and weights, E5M2 for gradients, one FP32 scale per
tensor (or per row), from the current amax or from an amax history (delayed scaling)."""

from __future__ import annotations

from collections.abc import Sequence

from lowbit.errors import LowbitError
from lowbit.quant.convert import DEFAULT_KEEP
from lowbit.quant.precision import QuantPrecision

__all__ = ["FP8Precision", "fp8_recipe"]


def fp8_recipe(granularity: str = "tensor", forward_format: str = "e4m3", backward_format: str = "e5m2") -> dict:
    """The GemmRecipe mapping of FP8 training: ``granularity`` ``tensor`` or ``row`` scales."""
    if granularity not in ("tensor", "row"):
        raise LowbitError(f"fp8 granularity must be tensor or row, got '{granularity}'")
    fwd = {"element": forward_format, "block": granularity}
    bwd = {"element": backward_format, "block": granularity}
    return {"fprop": {"x": fwd, "w": fwd}, "dgrad": {"dy": bwd, "w": fwd}, "wgrad": {"dy": bwd, "x": fwd}}


class FP8Precision(QuantPrecision):
    """FP8 GEMMs everywhere but the kept layers.

    scaling: ``current`` (scale from this step's amax) or ``delayed`` (from the max of the last
    ``history_len`` amaxes, with ``margin``: scale = fmt_max / amax / 2^margin; tensor scales only).
    """

    lowbit_plugin_api = 1
    name = "fp8"

    def __init__(
        self,
        *,
        scaling: str = "current",
        granularity: str = "tensor",
        forward_format: str = "e4m3",
        backward_format: str = "e5m2",
        history_len: int = 16,
        amax_compute: str = "max",
        margin: int = 0,
        keep: Sequence[str] = DEFAULT_KEEP,
        keep_last_blocks: int | float = 0,
        backend: str = "auto",
        amax_reduction: str = "local",
        quantized_all_gather: bool = True,
        device_type: str | None = None,
        mode: str = "auto",
    ) -> None:
        if scaling not in ("current", "delayed"):
            raise LowbitError(f"fp8 scaling must be current or delayed, got '{scaling}'")
        if scaling == "delayed" and granularity != "tensor":
            raise LowbitError("fp8 delayed scaling keeps one amax history per tensor; use granularity=tensor with it")
        delayed = (
            {"history_len": history_len, "amax_compute": amax_compute, "margin": margin}
            if scaling == "delayed"
            else None
        )
        super().__init__(
            recipe=fp8_recipe(granularity, forward_format, backward_format),
            keep=keep,
            keep_last_blocks=keep_last_blocks,
            backend=backend,
            delayed_scaling=delayed,
            amax_reduction=amax_reduction,
            quantized_all_gather=quantized_all_gather,
            device_type=device_type,
            mode=mode,
        )
