"""Any GemmRecipe written out in YAML: ``precision=custom precision.fprop.x.preset=mxfp8_e4m3 ...``."""

from __future__ import annotations

from lowbit.quant.precision import GemmPrecision

__all__ = ["CustomPrecision"]


class CustomPrecision(GemmPrecision):
    """Every operand as the config says (a preset name or QuantSpec fields; null = high precision)."""

    lowbit_plugin_api = 1
    name = "custom"
    defaults = {}
