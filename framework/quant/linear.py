"""``QuantLinear``: an ``nn.Linear`` whose three GEMMs run on quantized operands (a GemmRecipe).

Backend ``emulate`` (the reference, any device): each operand is quantized and dequantized by
``lowbit.numerics`` (blocks along the GEMM's contraction dim, see ``recipe.py``), then the
GEMM runs in the compute dtype (the autocast dtype when autocast is on, else the input's).
Backend ``triton`` (CUDA) runs fused kernels giving the same numbers, when ``lowbit.kernels``
provides them. Master weights stay in high precision: the parameters are the ``nn.Linear``'s
own, so a checkpoint moves between precisions unchanged. Saved for backward: the input in the
compute dtype and the weight parameter itself — no more than a BF16 ``nn.Linear`` keeps.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.errors import LowbitError
from lowbit.numerics import DelayedScaling, QuantSpec, fake_quantize, get_format, quant_error, quantize, tensor_amax
from lowbit.quant.recipe import GemmRecipe

__all__ = ["BACKENDS", "QuantLinear", "operand_health"]

BACKENDS = ("auto", "emulate", "triton")


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def _pad_rows(t: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad dim 0 to a multiple: zero rows add nothing to any product or amax."""
    extra = -t.shape[0] % multiple
    return F.pad(t, (0, 0, 0, extra)) if extra else t


def operand_health(t: torch.Tensor, spec: QuantSpec) -> dict[str, float]:
    """Quantization health of one operand: amax, block-scale range, underflow, saturation, SNR (dB)."""
    err = quant_error(t.detach(), spec)
    q = quantize(t.detach(), spec)
    scales = q.scales if q.global_scale is None else q.scales * q.global_scale
    nonzero = scales[scales > 0]
    return {
        "amax": float(t.detach().abs().max()),
        "scale_min": float(nonzero.min()) if nonzero.numel() else 0.0,
        "scale_max": float(scales.max()),
        "underflow": err.underflow,
        "saturation": err.saturation,
        "snr_db": err.snr_db,
    }


class _QuantLinearFn(torch.autograd.Function):
    """y = Q(x)·Q(W)ᵀ + b; dx = Q(dy)·Q(Wᵀ)ᵀ; dW = Q(dyᵀ)·Q(xᵀ)ᵀ — each Q blocked along its contraction."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, layer: QuantLinear
    ) -> torch.Tensor:
        dtype = _compute_dtype(x)
        tokens = layer.token_multiple
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        n = x2.shape[0]
        xq = layer._quant(_pad_rows(x2, tokens), "fprop.x", dtype)  # (N', in)
        wq = layer._quant(weight, "fprop.w", dtype)  # (out, in)
        y = (xq @ wq.t())[:n]  # (N, out)
        if bias is not None:
            y = y + bias.to(dtype)
        ctx.layer, ctx.dtype, ctx.has_bias = layer, dtype, bias is not None
        ctx.save_for_backward(x2.to(dtype), weight)
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor):
        x2, weight = ctx.saved_tensors
        layer, dtype = ctx.layer, ctx.dtype
        tokens = layer.token_multiple
        dy2 = dy.reshape(-1, weight.shape[0]).to(dtype)  # (N, out)
        n = dy2.shape[0]
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dyq = layer._quant(_pad_rows(dy2, tokens), "dgrad.dy", dtype)  # (N', out)
            wq_t = layer._quant(weight.t(), "dgrad.w", dtype)  # (in, out)
            dx = (dyq @ wq_t.t())[:n].view(*dy.shape[:-1], weight.shape[1])  # (N, in)
        if ctx.needs_input_grad[1]:
            dyq_t = layer._quant(_pad_rows(dy2, tokens).t(), "wgrad.dy", dtype)  # (out, N')
            xq_t = layer._quant(_pad_rows(x2, tokens).t(), "wgrad.x", dtype)  # (in, N')
            dw = (dyq_t @ xq_t.t()).to(weight.dtype)  # (out, in)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy2.sum(0).to(weight.dtype)
        return dx, dw, db, None


class QuantLinear(nn.Linear):
    """``nn.Linear`` with quantized GEMMs; same parameters and state-dict keys as the layer it replaces.

    ``health`` holds the latest per-operand quantization health when ``record_health`` is set
    (the health callback turns it on every N steps).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        recipe: GemmRecipe,
        backend: str = "auto",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._setup(recipe, backend)

    @classmethod
    def from_linear(cls, linear: nn.Linear, recipe: GemmRecipe, backend: str = "auto") -> QuantLinear:
        """A QuantLinear sharing ``linear``'s parameters (no copy: tied weights stay tied)."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = linear.in_features, linear.out_features
        layer.weight, layer.bias = linear.weight, linear.bias
        QuantLinear._setup(layer, recipe, backend)
        return layer

    def _setup(self, recipe: GemmRecipe, backend: str) -> None:
        if backend not in BACKENDS:
            raise LowbitError(f"unknown QuantLinear backend '{backend}'; valid: {', '.join(BACKENDS)}")
        if backend == "triton":
            # the slot the kernels work fills; until then 'auto' means emulate everywhere
            raise LowbitError(
                "QuantLinear backend 'triton' is not available: lowbit.kernels has no GEMM kernels yet; use auto or emulate"
            )
        multiples = recipe.multiples()
        for dim, size in (("in", self.in_features), ("out", self.out_features)):
            if size % multiples[dim]:
                raise LowbitError(f"{dim}_features {size} does not divide by the recipe's block size {multiples[dim]}")
        self.recipe, self.backend = recipe, backend
        self.token_multiple = multiples["tokens"]
        self.record_health = False
        self.health = {}
        self.sr_generator = None
        self.delayed_scaling: dict[str, Any] | None = None  # set by the precision plugin for FP8 delayed scaling
        self.scaling_state: dict[str, DelayedScaling] = {}

    def delayed_state(self, operand: str, device: torch.device) -> DelayedScaling:
        """The delayed-scaling state of one operand (created on first use)."""
        if operand not in self.scaling_state:
            fmt_max = get_format(self.recipe.spec_of(operand).element).max
            self.scaling_state[operand] = DelayedScaling(fmt_max, device=device, **(self.delayed_scaling or {}))
        return self.scaling_state[operand]

    def _quant(self, t: torch.Tensor, operand: str, dtype: torch.dtype) -> torch.Tensor:
        """One operand (``fprop.x``, ...) through its spec (emulated), in the compute dtype."""
        spec = self.recipe.spec_of(operand)
        if spec is None:
            return t.to(dtype)
        if self.record_health:
            self.health[operand] = operand_health(t, spec)
        if self.delayed_scaling is not None and spec.block == "tensor" and spec.scale_format == "fp32":
            # FP8 delayed scaling: this step uses the scale from earlier steps' amaxes, then records its own
            state = self.delayed_state(operand, t.device)
            out = fake_quantize(t, spec, scale=state.scale, generator=self.sr_generator)
            state.observe(tensor_amax(t.detach()))
            state.update()
            return out.to(dtype)
        return fake_quantize(t, spec, generator=self.sr_generator).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _QuantLinearFn.apply(x, self.weight, self.bias, self)

    def extra_repr(self) -> str:
        gemms = []
        for gemm in ("fprop", "dgrad", "wgrad"):
            specs = getattr(self.recipe, gemm)
            names = [_spec_name(specs.a), _spec_name(specs.b)]
            gemms.append(f"{gemm}=({', '.join(names)}{f', rht{specs.rht}' if specs.rht else ''})")
        return f"{super().extra_repr()}, {', '.join(gemms)}"


def _spec_name(spec: QuantSpec | None) -> str:
    if spec is None:
        return "hp"
    block = spec.block if isinstance(spec.block, str) else "x".join(map(str, spec.block))
    return f"{spec.element}/{block}{'/sr' if spec.rounding == 'sr' else ''}"
