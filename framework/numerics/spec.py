"""``QuantSpec``: what one quantized tensor looks like, as plain YAML-friendly fields; presets.

A spec names the element format, how elements are grouped into blocks that share a scale,
the scale format and the rule that turns a block's amax into its scale, an optional
second-level FP32 tensor scale (NVFP4), the rounding, and an optional random Hadamard
transform. Every field is a str/int/float/bool/tuple, so a spec round-trips through YAML with
``to_dict`` / ``from_dict``.

Blocks are always along the last dimension (``(1, k)``) or over the last two (``(r, c)``).
To block along another dimension, move it last first, e.g. ``quantize(w.t().contiguous(), spec)``
for a weight used as ``x @ w.t()`` blocked along the contraction dim; QuantLinear does this.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lowbit.errors import LowbitError
from lowbit.numerics.rounding import ROUNDING_MODES

__all__ = ["MX_SCALE_RULES", "PRESETS", "QuantSpec", "get_spec", "preset_names"]

MX_SCALE_RULES = ("floor", "ceil", "even", "nearest", "rceil")
"""Rules for power-of-two (E8M0) block scales; see :func:`lowbit.numerics.blocks.mx_scale_exponent`."""
_BLOCK_NAMES = ("tensor", "row")


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize one tensor.

    element: element format name (``e4m3``, ``e2m1``, ``int8``, ``hif8``, ... any installed format).
    block: ``"tensor"`` (one scale), ``"row"`` (one scale per row of the last dim), or
        ``(r, c)``: blocks of r x c over the last two dims; ``(1, k)`` blocks the last dim.
    scale_format: ``fp32``, ``e8m0`` (MX), ``e4m3`` (NVFP4), ``ue5m3``, ... any installed format.
    scale_rule: ``auto`` (``floor`` for e8m0 scales, ``amax`` otherwise), one of
        ``MX_SCALE_RULES`` for e8m0 scales, or ``amax`` (scale = amax / element max).
    global_scale: add a second-level per-tensor FP32 scale (NVFP4; needs a non-fp32 scale format).
    rounding: ``rne`` (round to nearest even), ``sr`` (stochastic rounding), or ``ta`` (ties
        away from zero; HiFloat8's conversion rounding).
    rht_size: random Hadamard transform block size along the last dim (0 = off; power of two).
    rht_seed: seed of the transform's random signs.
    sr_prescale: multiply elements by this before encoding and divide after decoding; 0.75 is
        Tseng et al.'s 3/4 (arXiv 2502.20586) that keeps MXFP4 stochastic rounding from clipping.
    pow2_scale: round FP32 scales to powers of two (encode scale rounded down, as TE).
    amax_target: FP32 scales map amax to this value instead of the element format's max (0: the max).
        For tapered formats, where precision depends on the magnitude: HiFloat8 training maps
        activations and weights to 15 and gradients to 224, the tops of its 3- and 2-bit mantissa bands.
    asymmetric: integer formats only: min/max scaling with a zero point.
    saturate: clamp overflow to +-max (MX and NVFP4 always saturate).
    """

    element: str = "e4m3"
    block: str | tuple[int, int] = "tensor"
    scale_format: str = "fp32"
    scale_rule: str = "auto"
    global_scale: bool = False
    rounding: str = "rne"
    rht_size: int = 0
    rht_seed: int = 0
    sr_prescale: float = 1.0
    pow2_scale: bool = False
    amax_target: float = 0.0
    asymmetric: bool = False
    saturate: bool = True

    def __post_init__(self) -> None:
        from lowbit.numerics.formats import get_format

        for field in ("element", "scale_format", "scale_rule", "rounding"):
            if not isinstance(getattr(self, field), str):
                raise LowbitError(f"QuantSpec.{field} must be a string, got {getattr(self, field)!r}")
        block = _normalize_block(self.block)
        object.__setattr__(self, "block", block)
        element = get_format(self.element)  # unknown names: the registry's error lists installed ones
        scale = get_format(self.scale_format)
        if element.bits > 16:
            raise LowbitError(
                f"element format '{self.element}' has {element.bits} bits; use a format of 16 bits or fewer"
            )
        rule = self.scale_rule
        if rule == "auto":
            rule = "floor" if scale.name == "e8m0" else "amax"
            object.__setattr__(self, "scale_rule", rule)
        valid_rules = MX_SCALE_RULES if scale.name == "e8m0" else ("amax",)
        if rule not in valid_rules:
            raise LowbitError(
                f"scale_rule '{rule}' does not fit scale_format '{self.scale_format}'; valid: auto, {', '.join(valid_rules)}"
            )
        if self.global_scale and block == "tensor":
            raise LowbitError(
                "global_scale adds a tensor scale above block scales; it needs blocks, got block='tensor'"
            )
        if self.global_scale and scale.name in ("fp32", "e8m0"):
            raise LowbitError(
                f"global_scale needs a low-precision, non-power-of-two scale format such as e4m3, got '{self.scale_format}'"
            )
        if self.rounding not in ROUNDING_MODES:
            raise LowbitError(f"unknown rounding '{self.rounding}'; valid: {', '.join(ROUNDING_MODES)}")
        if self.rht_size and (self.rht_size < 2 or self.rht_size & (self.rht_size - 1)):
            raise LowbitError(f"rht_size must be 0 (off) or a power of two >= 2, got {self.rht_size}")
        if not 0.0 < self.sr_prescale <= 1.0:
            raise LowbitError(f"sr_prescale must be in (0, 1] (0.75 for Tseng et al.'s 3/4), got {self.sr_prescale}")
        if self.asymmetric and not element.is_integer:
            raise LowbitError(f"asymmetric needs an integer element format (int8, int4), got '{self.element}'")
        if self.amax_target:
            if scale.name != "fp32" or self.asymmetric:
                raise LowbitError(
                    f"amax_target applies to symmetric FP32 scales; got scale_format '{self.scale_format}'"
                    + (", asymmetric" if self.asymmetric else "")
                )
            if not (isinstance(self.amax_target, (int, float)) and 0 < self.amax_target <= element.max):
                raise LowbitError(
                    f"amax_target must be in (0, {element.max:g}] (the '{self.element}' max; 0 means the max), "
                    f"got {self.amax_target!r}"
                )
        if self.pow2_scale and scale.name != "fp32":
            raise LowbitError(f"pow2_scale applies to fp32 scales; scale_format '{self.scale_format}' is already fixed")

    @property
    def saturating(self) -> bool:
        """Whether encoding clamps overflow to +-max: ``saturate`` for FP32 scales; MX and NVFP4
        (block scales in E8M0, E4M3, ...) always saturate."""
        return self.saturate or self.scale_format != "fp32"

    # ---- YAML ----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain dict (block tuples become lists), loadable with ``from_dict``."""
        out = dataclasses.asdict(self)
        if isinstance(out["block"], tuple):
            out["block"] = list(out["block"])
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> QuantSpec:
        """Build from a mapping; an optional ``preset`` key names the base the others override."""
        options = dict(d)
        base = options.pop("preset", None)
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in options if k not in valid]
        if unknown:
            raise LowbitError(f"QuantSpec has no field '{unknown[0]}'; valid: preset, {', '.join(valid)}")
        if base is not None:
            return dataclasses.replace(cls.preset(str(base)), **options)
        return cls(**options)

    @classmethod
    def preset(cls, name: str) -> QuantSpec:
        """A named preset (see ``preset_names()``)."""
        if name not in PRESETS:
            raise LowbitError(f"unknown quantization preset '{name}'; valid: {', '.join(preset_names())}")
        if name not in _PRESET_CACHE:
            _PRESET_CACHE[name] = cls(**PRESETS[name])
        return _PRESET_CACHE[name]

    def replace(self, **changes: Any) -> QuantSpec:
        """A copy with some fields changed (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)


def _normalize_block(block: Any) -> str | tuple[int, int]:
    if isinstance(block, str):
        if block not in _BLOCK_NAMES:
            raise LowbitError(f"unknown block '{block}'; valid: tensor, row, or a (rows, cols) pair such as (1, 32)")
        return block
    if isinstance(block, int) and not isinstance(block, bool):
        block = (1, block)
    if isinstance(block, (list, tuple)) and len(block) == 1:
        block = (1, block[0])
    if (
        isinstance(block, (list, tuple))
        and len(block) == 2
        and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)
    ):
        return (int(block[0]), int(block[1]))
    raise LowbitError(f"block must be 'tensor', 'row' or two positive ints such as (1, 32) or (16, 16), got {block!r}")


def _mx(element: str) -> dict[str, Any]:
    return {"element": element, "block": (1, 32), "scale_format": "e8m0", "scale_rule": "floor"}


PRESETS: dict[str, dict[str, Any]] = {
    # OCP MX v1.0: 32-element blocks along the last dim, E8M0 power-of-two scales (section 6.3)
    "mxfp8_e4m3": _mx("e4m3"),
    "mxfp8_e5m2": _mx("e5m2"),
    "mxfp6_e2m3": _mx("e2m3"),
    "mxfp6_e3m2": _mx("e3m2"),
    "mxfp4": _mx("e2m1"),
    # NVFP4 (TE recipe, arXiv 2509.25149): 1x16 blocks, E4M3 block scales, FP32 tensor scale;
    # the 16x16 variant is for weights (a weight and its transpose quantize identically)
    "nvfp4": {"element": "e2m1", "block": (1, 16), "scale_format": "e4m3", "global_scale": True},
    "nvfp4_2d": {"element": "e2m1", "block": (16, 16), "scale_format": "e4m3", "global_scale": True},
    # FP8 with FP32 scales from the amax (Transformer Engine current scaling)
    "fp8_e4m3_tensor": {"element": "e4m3", "block": "tensor"},
    "fp8_e4m3_row": {"element": "e4m3", "block": "row"},
    "fp8_e5m2_tensor": {"element": "e5m2", "block": "tensor"},
    # integers, symmetric: per output channel (row of an (out, in) weight), and groups of 32
    "int8_channel": {"element": "int8", "block": "row"},
    "int4_group32": {"element": "int4", "block": (1, 32)},
}
"""Preset fields by name; ``QuantSpec.preset(name)`` builds (and checks) the spec."""
_PRESET_CACHE: dict[str, QuantSpec] = {}


def preset_names() -> list[str]:
    return sorted(PRESETS)


def get_spec(spec: str | Mapping[str, Any] | QuantSpec) -> QuantSpec:
    """A ``QuantSpec`` from a preset name, a mapping (YAML), or a spec (returned as is)."""
    if isinstance(spec, QuantSpec):
        return spec
    if isinstance(spec, str):
        return QuantSpec.preset(spec)
    if isinstance(spec, Mapping):
        return QuantSpec.from_dict(spec)
    raise LowbitError(f"a quantization spec is a preset name, a mapping or a QuantSpec, got {type(spec).__name__}")
