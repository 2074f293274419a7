"""``GemmRecipe``: one QuantSpec (or None = high precision) per operand of a linear layer's GEMMs.

A linear layer y = x·Wᵀ (x (N, in), W (out, in)) runs three GEMMs, each contracting one dim:
  fprop  y  = x  · Wᵀ   contracts ``in``   operands x (N, in) and W (out, in)
  dgrad  dx = dy · W    contracts ``out``  operands dy (N, out) and Wᵀ (in, out)
  wgrad  dW = dyᵀ · x   contracts ``N``    operands dyᵀ (out, N) and xᵀ (in, N)
Each operand is quantized with blocks along its contraction dim (the last dim of the operand as
written above), so a block scale factors out of every partial dot product. A GEMM's ``rht``
applies the same random Hadamard transform to both its operands along the contraction dim, so
it cancels in the product: (A·H)(B·H)ᵀ = A·Bᵀ (Tseng et al. 2025; NVIDIA 2025 §4.2).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lowbit.errors import LowbitError
from lowbit.numerics import QuantSpec, get_spec

__all__ = ["GEMMS", "OPERANDS", "GemmRecipe", "GemmSpecs"]

GEMMS = ("fprop", "dgrad", "wgrad")
OPERANDS = {"fprop": ("x", "w"), "dgrad": ("dy", "w"), "wgrad": ("dy", "x")}


def _spec_or_none(value: Any, where: str) -> QuantSpec | None:
    if value is None or value is False or value == "none":
        return None
    try:
        return get_spec(value)
    except LowbitError as err:
        raise LowbitError(f"{where}: {err}") from err


def _rht_size(value: Any, where: str) -> int:
    """A GEMM's ``rht``: the transform size, a power of two >= 2, or 0 / false / null for none."""
    if value is None or value is False:
        return 0
    if (
        isinstance(value, int)
        and not isinstance(value, bool)
        and (value == 0 or (value >= 2 and value & (value - 1) == 0))
    ):
        return value
    raise LowbitError(
        f"{where}.rht is the random Hadamard transform's size: a power of two such as 16 or 32, or 0 for none; "
        f"got {value!r}"
    )


@dataclass(frozen=True)
class GemmSpecs:
    """The two operand specs of one GEMM (``a`` is dy or x, ``b`` the other) and its shared RHT."""

    a: QuantSpec | None
    b: QuantSpec | None
    rht: int = 0
    rht_seed: int = 0

    def operand(self, which: str) -> QuantSpec | None:
        """The spec actually applied to operand ``a`` or ``b``: the GEMM's RHT folded in."""
        spec = self.a if which == "a" else self.b
        if spec is None or not self.rht:
            return spec
        return spec.replace(rht_size=self.rht, rht_seed=self.rht_seed)

    @property
    def quantized(self) -> bool:
        return self.a is not None or self.b is not None


@dataclass(frozen=True)
class GemmRecipe:
    """Specs for fprop (x, w), dgrad (dy, w) and wgrad (dy, x); see the module docstring.

    Built from YAML with ``GemmRecipe.from_dict({"fprop": {"x": "nvfp4", "w": "nvfp4_2d"},
    "wgrad": {"dy": {"preset": "nvfp4", "rounding": "sr"}, "x": "nvfp4", "rht": 16}, ...})``:
    each operand is a preset name, a QuantSpec mapping, or null (high precision); ``rht`` is the
    size of the random Hadamard transform both operands share (0 for none).
    """

    fprop: GemmSpecs = GemmSpecs(None, None)
    dgrad: GemmSpecs = GemmSpecs(None, None)
    wgrad: GemmSpecs = GemmSpecs(None, None)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> GemmRecipe:
        d = dict(d or {})
        unknown = [k for k in d if k not in GEMMS]
        if unknown:
            raise LowbitError(f"a GEMM recipe has no GEMM '{unknown[0]}'; valid: {', '.join(GEMMS)}")
        gemms = {}
        for gemm in GEMMS:
            node = dict(d.get(gemm) or {})
            a_name, b_name = OPERANDS[gemm]
            valid = (a_name, b_name, "rht", "rht_seed")
            bad = [k for k in node if k not in valid]
            if bad:
                raise LowbitError(f"precision.{gemm} has no key '{bad[0]}'; valid: {', '.join(valid)}")
            gemms[gemm] = GemmSpecs(
                _spec_or_none(node.get(a_name), f"precision.{gemm}.{a_name}"),
                _spec_or_none(node.get(b_name), f"precision.{gemm}.{b_name}"),
                _rht_size(node.get("rht", 0), f"precision.{gemm}"),
                int(node.get("rht_seed", 0)),
            )
        return cls(**gemms)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for gemm in GEMMS:
            specs: GemmSpecs = getattr(self, gemm)
            a_name, b_name = OPERANDS[gemm]
            out[gemm] = {
                a_name: None if specs.a is None else specs.a.to_dict(),
                b_name: None if specs.b is None else specs.b.to_dict(),
                "rht": specs.rht,
                "rht_seed": specs.rht_seed,
            }
        return out

    @property
    def quantized(self) -> bool:
        return any(getattr(self, g).quantized for g in GEMMS)

    def spec_of(self, operand: str) -> QuantSpec | None:
        """The spec applied to ``operand`` (``fprop.x``, ``dgrad.w``, ``wgrad.dy``, ...), RHT folded in."""
        gemm, _, name = operand.partition(".")
        if gemm not in GEMMS or name not in OPERANDS[gemm]:
            valid = ", ".join(f"{g}.{o}" for g in GEMMS for o in OPERANDS[g])
            raise LowbitError(f"unknown GEMM operand '{operand}'; valid: {valid}")
        return getattr(self, gemm).operand("a" if OPERANDS[gemm][0] == name else "b")

    def multiples(self) -> dict[str, int]:
        """What each dim must divide by: ``in`` and ``out`` features (checked by the converter) and
        ``tokens`` (N, padded with zeros at run time when it does not divide; zeros change no product)."""
        f, d, w = (getattr(self, g) for g in GEMMS)
        rows, cols = _block_rows, _block_cols
        return {
            "in": _lcm(cols(f.operand("a")), cols(f.operand("b")), rows(d.operand("b")), rows(w.operand("b"))),
            "out": _lcm(rows(f.operand("b")), cols(d.operand("a")), cols(d.operand("b")), rows(w.operand("a"))),
            "tokens": _lcm(rows(f.operand("a")), rows(d.operand("a")), cols(w.operand("a")), cols(w.operand("b"))),
        }

    def replace(self, **changes: Any) -> GemmRecipe:
        return dataclasses.replace(self, **changes)


def _block_rows(spec: QuantSpec | None) -> int:
    return 1 if spec is None or isinstance(spec.block, str) else spec.block[0]


def _block_cols(spec: QuantSpec | None) -> int:
    """Block width along the last dim, with the Hadamard transform's size folded in."""
    cols = 1 if spec is None or isinstance(spec.block, str) else spec.block[1]
    return _lcm(cols, spec.rht_size) if spec is not None and spec.rht_size else cols


def _lcm(*values: int) -> int:
    return functools.reduce(math.lcm, values, 1)
