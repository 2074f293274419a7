"""lowbit numerics: every low-precision number format, bit-exact, in pure PyTorch.

The single source of truth for what a number is: element and scale formats (``formats``),
QuantSpec and presets (``spec``), block scales for MX / NVFP4 / integers (``blocks``), FP8
current and delayed scaling (``scaling``), the random Hadamard transform (``hadamard``),
``quantize`` / ``dequantize`` (``quantize``), nibble packing (``packing``), error statistics
(``error``). Pure functions over tensors: no modules, no autograd.
"""

from lowbit.numerics._chunks import contiguous as tiled_contiguous
from lowbit.numerics._fast import pow2_floor
from lowbit.numerics.blocks import BlockLayout, block_layout, mx_scale_codes
from lowbit.numerics.error import QuantError, quant_error, quant_error_and_codes, quant_error_and_scales
from lowbit.numerics.formats import (
    E2M1,
    E2M3,
    E3M2,
    E4M3,
    E5M2,
    E8M0,
    FLT_MAX,
    FP32,
    INT4,
    INT8,
    INT_WIDTHS,
    UE5M3,
    E8M0Format,
    ElementFormat,
    FloatFormat,
    FP32Format,
    IntFormat,
    format_names,
    get_format,
    set_format_resolver,
)
from lowbit.numerics.hadamard import fwht, hadamard_matrix, inverse_rht, random_hadamard, random_signs, rht
from lowbit.numerics.packing import pack_fp4, unpack_fp4, unpack_int4
from lowbit.numerics.qtensor import QTensor
from lowbit.numerics.quantize import (
    Kept,
    dequantize,
    fake_quantize,
    fake_quantize_columns,
    keep_columns,
    quantize,
    requantize,
)
from lowbit.numerics.rounding import ROUNDING_MODES, RandomBits, round_to_integer
from lowbit.numerics.scaling import (
    DelayedScaling,
    amax_from_history,
    current_scale,
    roll_amax_history,
    round_scale_to_pow2,
    tensor_amax,
)
from lowbit.numerics.spec import MX_SCALE_RULES, PRESETS, QuantSpec, get_spec, preset_names

__all__ = [
    "E2M1",
    "E2M3",
    "E3M2",
    "E4M3",
    "E5M2",
    "E8M0",
    "FLT_MAX",
    "FP32",
    "INT4",
    "INT8",
    "INT_WIDTHS",
    "MX_SCALE_RULES",
    "PRESETS",
    "ROUNDING_MODES",
    "UE5M3",
    "BlockLayout",
    "Kept",
    "DelayedScaling",
    "E8M0Format",
    "ElementFormat",
    "FP32Format",
    "FloatFormat",
    "IntFormat",
    "QTensor",
    "QuantError",
    "QuantSpec",
    "RandomBits",
    "amax_from_history",
    "block_layout",
    "current_scale",
    "dequantize",
    "fake_quantize",
    "fake_quantize_columns",
    "keep_columns",
    "format_names",
    "fwht",
    "get_format",
    "get_spec",
    "hadamard_matrix",
    "inverse_rht",
    "mx_scale_codes",
    "pack_fp4",
    "pow2_floor",
    "preset_names",
    "quant_error",
    "quant_error_and_codes",
    "quant_error_and_scales",
    "quantize",
    "random_hadamard",
    "random_signs",
    "requantize",
    "rht",
    "roll_amax_history",
    "round_scale_to_pow2",
    "round_to_integer",
    "set_format_resolver",
    "tensor_amax",
    "tiled_contiguous",
    "unpack_fp4",
    "unpack_int4",
]
