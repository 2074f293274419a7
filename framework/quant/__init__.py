"""Quantized linear layers: ``GemmRecipe`` (a QuantSpec per GEMM operand), ``QuantLinear``
(the autograd function that applies it), the in-place converter, and ``QuantPrecision``
(the Lightning precision plugin base every quantized recipe is built on)."""

from lowbit.quant.convert import DEFAULT_KEEP, ConversionReport, block_prefixes, convert_linears, quant_layers
from lowbit.quant.linear import BACKENDS, QuantLinear, operand_health
from lowbit.quant.recipe import GEMMS, OPERANDS, GemmRecipe, GemmSpecs

__all__ = [
    "BACKENDS",
    "DEFAULT_KEEP",
    "GEMMS",
    "OPERANDS",
    "ConversionReport",
    "GemmRecipe",
    "GemmSpecs",
    "QuantLinear",
    "block_prefixes",
    "convert_linears",
    "operand_health",
    "quant_layers",
]
