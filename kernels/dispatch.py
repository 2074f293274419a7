"""From a ``QuantSpec`` to the kernel that quantizes it, and from two quantized operands to the GEMM:
what ``QuantLinear``'s triton backend calls.

``supports(spec)`` says whether (and why not) the kernels cover a spec: FP8 E4M3/E5M2 with FP32
tensor or row scales (saturating), MX E4M3/E5M2/E2M1 (1x32, E8M0, any scale rule), and E2M1 with
E4M3/UE5M3 block scales on 1x16, 16x16 or 1x32 blocks with or without NVFP4's global scale; RNE or
stochastic rounding; Hadamard sizes 16-128 (not on FP8). ``quantize`` returns a
:class:`KernelQTensor` (the GEMM operand plus its spec; ``to_qtensor()`` gives the numerics'
``QTensor`` for comparisons), ``quantize_pair`` a tensor and its transpose from one read, and
``matmul`` runs ``gemm_blockscaled``. Stochastic rounding draws Philox bits from a seed tensor
(:func:`draw_seed`): its stream is not the emulate backend's (``lowbit.numerics.RandomBits``),
though both compare 31 random bits against floor(frac * 2^31).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.errors import LowbitError
from lowbit.kernels.gemm_blockscaled import Operand, gemm_blockscaled
from lowbit.kernels.quantize_fp8 import quantize_fp8
from lowbit.kernels.quantize_mx import quantize_mx
from lowbit.kernels.quantize_nvfp4 import BLOCKS, quantize_nvfp4
from lowbit.numerics import QTensor, QuantSpec, get_format, unpack_fp4

__all__ = ["KernelQTensor", "draw_seed", "matmul", "quantize", "quantize_pair", "supports"]

_RHT_SIZES = (0, 16, 32, 64, 128)


@dataclass
class KernelQTensor:
    """A 2-D tensor quantized by the kernels: ``operand`` (codes, scales as the GEMM takes them),
    the ``spec``, the original ``shape`` and ``dtype``, and the measured ``amax`` (FP8 tensor scales)."""

    operand: Operand
    spec: QuantSpec
    shape: tuple[int, int]
    dtype: torch.dtype
    amax: torch.Tensor | None = None

    def to_qtensor(self) -> QTensor:
        """The numerics' ``QTensor`` of the same numbers (codes unpacked, scales decoded)."""
        op, spec = self.operand, self.spec
        codes = unpack_fp4(op.codes) if op.element == "e2m1" else op.codes
        if op.scale_format == "fp32":
            scales, scale_codes = op.scales, op.scales.view(torch.int32)
        else:
            scales, scale_codes = get_format(op.scale_format).decode(op.scales), op.scales
        global_scale = op.global_scale.reshape(()) if op.global_scale is not None else None
        return QTensor(codes, scales, scale_codes, global_scale, None, spec, self.shape, self.dtype)


def _family(spec: QuantSpec) -> str:
    if spec.scale_format == "fp32" and spec.block in ("tensor", "row"):
        return "fp8"
    if spec.scale_format == "e8m0" and spec.block == (1, 32):
        return "mx"
    return "nvfp4"


def supports(spec: QuantSpec | None) -> str | None:
    """None if the kernels quantize ``spec`` (and multiply it in a GEMM), else why not, in a few words."""
    if spec is None:
        return "a high-precision operand"
    if spec.element not in ("e4m3", "e5m2", "e2m1"):
        return f"{spec.element} elements"
    if spec.rounding not in ("rne", "sr"):
        return f"rounding '{spec.rounding}'"
    if spec.asymmetric:
        return "asymmetric scales"
    if spec.amax_target:
        return f"amax mapped to {spec.amax_target:g}, not the format's max"
    if spec.rht_size not in _RHT_SIZES:
        return f"a {spec.rht_size}-point Hadamard transform"
    if spec.scale_format == "fp32":
        if spec.block not in ("tensor", "row"):
            return f"FP32 scales on {spec.block} blocks"
        if spec.element == "e2m1":
            return "E2M1 elements with FP32 scales"
        if not spec.saturate:
            return "non-saturating FP8"
        if spec.rht_size:
            return "a Hadamard transform on FP8 with FP32 scales"
        return None
    if spec.scale_format == "e8m0":
        return None if spec.block == (1, 32) else f"E8M0 scales on {spec.block} blocks (MX uses 1x32)"
    if spec.scale_format in ("e4m3", "ue5m3"):
        if spec.element != "e2m1":
            return f"{spec.element} elements with {spec.scale_format} block scales"
        if spec.block not in BLOCKS:
            return f"{spec.block} blocks with {spec.scale_format} scales"
        return None
    return f"{spec.scale_format} scales"


def draw_seed(generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """An int64 (1,) Philox seed on ``device`` drawn from ``generator`` (torch's default one when None):
    a pure function of the generator's state, drawn without a host sync."""
    gen_device = generator.device if generator is not None else device
    seed = torch.randint(0, 2**62, (1,), generator=generator, device=gen_device, dtype=torch.int64)
    return seed.to(device)


def _directions(specs: list[QuantSpec]) -> dict:
    """The per-direction keyword arguments of one kernel call from the (rowwise, colwise) specs."""
    return {
        "rht": tuple(s.rht_size for s in specs),
        "rht_seed": tuple(s.rht_seed for s in specs),
        "sr": tuple(s.rounding == "sr" for s in specs),
        "prescale": tuple(s.sr_prescale for s in specs),
    }


def _launch(
    x: torch.Tensor,
    row: QuantSpec | None,
    col: QuantSpec | None,
    seed: torch.Tensor,
    scale: torch.Tensor | None,
) -> tuple[KernelQTensor | None, KernelQTensor | None]:
    """One kernel call quantizing x with ``row`` (blocks along dim 1) and/or x.t() with ``col``."""
    spec = row or col
    family = _family(spec)
    specs = [row or col, col or row]
    flags = {"rowwise": row is not None, "colwise": col is not None, "seed": seed}
    m, k = x.shape
    if family == "fp8":
        directions = _directions(specs)
        codes, scales, codes_t, scales_t, amax = quantize_fp8(
            x,
            spec.element,
            block=spec.block,
            pow2=spec.pow2_scale,
            scale=scale,
            sr=directions["sr"],
            prescale=directions["prescale"],
            **flags,
        )
        amax = amax if amax.numel() else None
        make = lambda c, s, p: Operand(c, spec.element, s, "fp32", (1, 0), None, p)
        return (
            KernelQTensor(make(codes, scales, row.sr_prescale), row, (m, k), x.dtype, amax) if row else None,
            KernelQTensor(make(codes_t, scales_t, col.sr_prescale), col, (k, m), x.dtype, amax) if col else None,
        )
    if family == "mx":
        codes, scales, codes_t, scales_t = quantize_mx(
            x, spec.element, scale_rule=spec.scale_rule, **flags, **_directions(specs)
        )
        make = lambda c, s, p: Operand(c, spec.element, s, "e8m0", (1, 32), None, p)
        return (
            KernelQTensor(make(codes, scales, row.sr_prescale), row, (m, k), x.dtype) if row else None,
            KernelQTensor(make(codes_t, scales_t, col.sr_prescale), col, (k, m), x.dtype) if col else None,
        )
    codes, scales, g, codes_t, scales_t, g_t = quantize_nvfp4(
        x, block=spec.block, scale_format=spec.scale_format, global_scale=spec.global_scale, **flags,
        **_directions(specs),
    )  # fmt: skip
    glob = lambda t: t if spec.global_scale else None
    make = lambda c, s, gs, p: Operand(c, "e2m1", s, spec.scale_format, spec.block, glob(gs), p)
    return (
        KernelQTensor(make(codes, scales, g, row.sr_prescale), row, (m, k), x.dtype) if row else None,
        KernelQTensor(make(codes_t, scales_t, g_t, col.sr_prescale), col, (k, m), x.dtype) if col else None,
    )


def _check(spec: QuantSpec) -> None:
    reason = supports(spec)
    if reason is not None:
        raise LowbitError(f"the lowbit kernels do not quantize {reason} (spec {spec}); use the emulate backend for it")


def quantize(
    x: torch.Tensor,
    spec: QuantSpec,
    *,
    seed: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
) -> KernelQTensor:
    """Quantize a 2-D tensor (any strides) with blocks along its last dim, as ``lowbit.numerics.quantize``.

    ``seed``: int64 (1,) Philox seed for SR (:func:`draw_seed`); ``scale``: FP8 encode scale to use
    instead of the amax's (delayed scaling; tensor scales only)."""
    _check(spec)
    if seed is None:
        seed = torch.zeros(1, dtype=torch.int64, device=x.device)
    return _launch(x, spec, None, seed, scale)[0]


def pairable(row: QuantSpec, col: QuantSpec) -> bool:
    """Whether one kernel call quantizes x with ``row`` and x.t() with ``col``: the same family, element,
    block and scale format (Hadamard transforms, rounding and prescales may differ)."""
    if supports(row) is not None or supports(col) is not None:
        return False
    fields = ("element", "block", "scale_format", "scale_rule", "global_scale", "pow2_scale")
    same = all(getattr(row, f) == getattr(col, f) for f in fields)
    return same and _family(row) == _family(col)


def quantize_pair(
    x: torch.Tensor, row: QuantSpec, col: QuantSpec, *, seed: torch.Tensor | None = None
) -> tuple[KernelQTensor, KernelQTensor]:
    """(x quantized with ``row``, x.t() quantized with ``col``), from one read of x when
    :func:`pairable`, else two calls. For SR, the two directions draw distinct Philox streams."""
    _check(row)
    _check(col)
    if seed is None:
        seed = torch.zeros(1, dtype=torch.int64, device=x.device)
    if pairable(row, col):
        return _launch(x, row, col, seed, None)
    return _launch(x, row, None, seed, None)[0], _launch(x.t(), col, None, seed + 1, None)[0]


def matmul(
    a: KernelQTensor, b: KernelQTensor, *, out_dtype: torch.dtype, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """dequantize(a) @ dequantize(b).T (+ bias) from the codes, FP32 accumulation (``gemm_blockscaled``)."""
    return gemm_blockscaled(a.operand, b.operand, bias=bias, out_dtype=out_dtype)
