"""``QuantLinear``: an ``nn.Linear`` whose three GEMMs run on quantized operands (a GemmRecipe).

Backend ``emulate`` (the reference, any device): each operand is quantized and dequantized by
``lowbit.numerics`` (blocks along the GEMM's contraction dim, see ``recipe.py``), then the
GEMM runs in the compute dtype (the autocast dtype when autocast is on, else the input's).
A GEMM's RHT rotates both operands and is not undone: the GEMM of the two rotated, quantized
operands is the product (H Hᵀ = I), which is what the kernels compute too.
Backend ``auto`` on CPU emulates with ``fake_quantize(compile=True)``: each large operand's
rounding is one ``torch.compile``d kernel, the same bits as the eager reference (tested), 2-10x
faster per operand; the first step compiles each operand spec once (seconds each).
Backend ``triton`` (CUDA) runs ``lowbit.kernels``: fused quantize kernels and block-scaled GEMMs on
the codes, the same numbers up to the order of the FP32 accumulation; ``auto`` takes it on CUDA for
every GEMM whose two operand specs the kernels cover (``lowbit.kernels.dispatch.supports``: FP8,
MXFP8, MXFP4, NVFP4 and custom specs built from them) and emulates the others, and on CPU always
emulates. With stochastic rounding the kernels draw Philox bits seeded from ``sr_generator``, a
different random stream from emulate's hashed counter (same rounding rule, both unbiased). Master
weights stay in high precision: the parameters are the ``nn.Linear``'s own, so a checkpoint moves
between precisions unchanged. Saved for backward: the input in the compute dtype and the weight parameter itself — no
more than a BF16 ``nn.Linear`` keeps. Where dgrad's Q(Wᵀ) equals fprop's Q(W) transposed (square
or whole-tensor weight blocks, deterministic rounding), emulate quantizes the weight once and saves
Q(W) in the compute dtype instead of W (a BF16 ``nn.Linear`` keeps its BF16 weight copy too).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.errors import LowbitError
from lowbit.numerics import (
    DelayedScaling,
    QuantSpec,
    fake_quantize,
    fake_quantize_columns,
    get_format,
    quant_error,
    quantize,
    tensor_amax,
    tiled_contiguous,
)
from lowbit.quant.recipe import GEMMS, OPERANDS, GemmRecipe

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


def _kernels_serve(t: torch.Tensor) -> bool:
    """Whether the fused kernels run on ``t``'s device: CUDA (tests patch this to run them on CPU under
    ``TRITON_INTERPRET=1``)."""
    return t.is_cuda


def _kernel_ops(backend: str, t: torch.Tensor):
    """``lowbit.kernels.dispatch`` for backend auto/triton on a device the kernels serve, else None.
    Imported on first use, so ``import lowbit`` never loads Triton."""
    if backend == "emulate" or not _kernels_serve(t):
        return None
    try:
        from lowbit.kernels import dispatch
    except ImportError:  # auto without a working Triton: emulate (backend triton checked it at build)
        return None
    return dispatch


def _check_triton_backend(recipe: GemmRecipe) -> None:
    """Backend ``triton``: a CUDA GPU, an importable ``lowbit.kernels``, and kernels for every quantized operand."""
    if not torch.cuda.is_available():
        raise LowbitError(
            "QuantLinear backend 'triton' needs a CUDA GPU and none is available; use backend auto or emulate"
        )
    try:
        from lowbit.kernels import dispatch
    except ImportError as err:
        raise LowbitError(
            f"QuantLinear backend 'triton' cannot import lowbit.kernels ({err}); use backend auto or emulate"
        ) from err
    for gemm in GEMMS:
        if not getattr(recipe, gemm).quantized:
            continue
        for name in OPERANDS[gemm]:
            reason = dispatch.supports(recipe.spec_of(f"{gemm}.{name}"))
            if reason is not None:
                raise LowbitError(
                    f"QuantLinear backend 'triton' has no kernels for {gemm}.{name} ({reason}); use backend auto, "
                    "which emulates the GEMMs the kernels do not cover"
                )


def operand_health(t: torch.Tensor, spec: QuantSpec) -> dict[str, float]:
    """Quantization health of one operand: amax, block-scale range, underflow, saturation, SNR (dB).

    Stochastic rounding here draws from a fixed seed, never torch's global generator: recording
    health must not change what training draws next (a DiT's noise and timesteps did move)."""
    err = quant_error(t.detach(), spec, seed=0)
    q = quantize(t.detach(), spec, seed=0)
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
        # dgrad's Q(Wᵀ) is Q(W)ᵀ for some specs: quantize W once and keep Q(W) instead of W
        w_q = layer._quant(weight, "fprop.w", dtype) if layer._shares_weight(x) else None  # (out, in)
        y = layer._gemm("fprop", _pad_rows(x2, tokens), weight, dtype, qb=w_q)[:n]  # (N', in) x (out, in) -> (N, out)
        if bias is not None:
            y = y + bias.to(dtype)
        ctx.layer, ctx.dtype, ctx.has_bias = layer, dtype, bias is not None
        ctx.weight_shape, ctx.weight_dtype, ctx.shares_weight = weight.shape, weight.dtype, w_q is not None
        ctx.save_for_backward(x2.to(dtype), weight if w_q is None else w_q)
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor):
        x2, weight = ctx.saved_tensors  # weight: W, or Q(W) in the compute dtype (ctx.shares_weight)
        layer, dtype = ctx.layer, ctx.dtype
        tokens = layer.token_multiple
        out_features, in_features = ctx.weight_shape
        dy2 = dy.reshape(-1, out_features).to(dtype)  # (N, out)
        n = dy2.shape[0]
        dx = dw = db = None
        dy_pad = _pad_rows(dy2, tokens)  # (N', out)
        dy_dgrad, dy_wgrad = layer._quantize_dy(dy_pad) if all(ctx.needs_input_grad[:2]) else (None, None)
        if ctx.needs_input_grad[0]:
            # Q(Wᵀ) laid out as quantizing Wᵀ lays it out: (in, out), contiguous
            w_q = tiled_contiguous(weight.t()) if ctx.shares_weight else None
            dx = layer._gemm("dgrad", dy_pad, weight.t(), dtype, dy_dgrad, qb=w_q)  # (N', out) x (in, out)
            dx = dx[:n].view(*dy.shape[:-1], in_features)  # (N, in)
        if ctx.needs_input_grad[1]:
            dw = layer._gemm("wgrad", dy_pad.t(), _pad_rows(x2, tokens).t(), dtype, dy_wgrad)  # (out, N') x (in, N')
            dw = dw.to(ctx.weight_dtype)  # (out, in)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy2.sum(0).to(ctx.weight_dtype)
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
            _check_triton_backend(recipe)
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
        compile = self.backend == "auto"  # "emulate" stays the eager reference
        transposed = t.dim() == 2 and not t.is_contiguous() and t.t().is_contiguous()  # wgrad's dyᵀ, xᵀ
        if transposed and not self.record_health and not self._delayed(spec):
            # Q(tᵀ) quantized down t's columns, same bits as from a copy; the GEMM takes the (C, N) view
            return fake_quantize_columns(
                t.t(), spec, generator=self.sr_generator, compile=compile, rotated=True, dtype=dtype
            )
        t = tiled_contiguous(t)  # same values; wgrad's transposed operands copy faster here than in a reshape
        if self.record_health:
            self.health[operand] = operand_health(t, spec)
        if self._delayed(spec):
            # FP8 delayed scaling: this step uses the scale from earlier steps' amaxes, then records its own
            state = self.delayed_state(operand, t.device)
            out = fake_quantize(t, spec, generator=self.sr_generator, scale=state.scale, compile=compile, rotated=True)
            state.observe(tensor_amax(t.detach()))
            state.update()
            return out.to(dtype)
        return fake_quantize(t, spec, generator=self.sr_generator, compile=compile, rotated=True).to(dtype)

    def _gemm(
        self, gemm: str, a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype, qa: Any = None, qb: Any = None
    ) -> torch.Tensor:
        """``a @ b.t()`` with each operand through its spec of ``gemm``: the kernels when they serve both
        operands here (``qa``: ``a`` already quantized by them), else quantize-dequantize-matmul
        (``qb``: ``b`` already quantized and dequantized, see ``_shares_weight``)."""
        a_name, b_name = (f"{gemm}.{name}" for name in OPERANDS[gemm])
        if qb is not None:
            return self._quant(a, a_name, dtype) @ qb.t()
        ops = _kernel_ops(self.backend, a)
        if ops is not None and all(ops.supports(self.recipe.spec_of(name)) is None for name in (a_name, b_name)):
            qa = qa if qa is not None else self._kernel_quant(ops, a, a_name)
            return ops.matmul(qa, self._kernel_quant(ops, b, b_name), out_dtype=dtype)
        return self._quant(a, a_name, dtype) @ self._quant(b, b_name, dtype).t()

    def _delayed(self, spec: QuantSpec) -> bool:
        """Whether ``spec`` takes its scale from FP8 delayed scaling (amax history) instead of the operand."""
        return self.delayed_scaling is not None and spec.block == "tensor" and spec.scale_format == "fp32"

    def _shares_weight(self, x: torch.Tensor) -> bool:
        """Whether dgrad takes fprop's quantized weight, transposed, for Q(Wᵀ): both GEMMs emulated,
        one spec with deterministic rounding and no RHT, blocks that are the whole tensor or square
        (Wᵀ's blocks are W's blocks transposed: same amax, scales and elements, so the same values),
        and no per-operand state (FP8 delayed scaling) or health to record."""
        spec = self.recipe.spec_of("fprop.w")
        if spec is None or spec != self.recipe.spec_of("dgrad.w") or spec.rounding == "sr" or spec.rht_size:
            return False
        if self.record_health or _kernel_ops(self.backend, x) is not None:
            return False
        if self._delayed(spec):
            return False
        return spec.block == "tensor" or (not isinstance(spec.block, str) and spec.block[0] == spec.block[1])

    def _kernel_quant(self, ops: Any, t: torch.Tensor, operand: str) -> Any:
        """One operand through the kernels (a ``KernelQTensor``); health and FP8 delayed scaling as ``_quant``."""
        spec = self.recipe.spec_of(operand)
        if self.record_health:
            self.health[operand] = operand_health(t, spec)
        seed = ops.draw_seed(self.sr_generator, t.device) if spec.rounding == "sr" else None
        if self._delayed(spec):
            state = self.delayed_state(operand, t.device)
            q = ops.quantize(t, spec, seed=seed, scale=state.scale)
            state.observe(tensor_amax(t.detach()))
            state.update()
            return q
        return ops.quantize(t, spec, seed=seed)

    def _quantize_dy(self, dy: torch.Tensor) -> tuple[Any, Any]:
        """dy for dgrad and dyᵀ for wgrad from one read of dy, when both GEMMs run on the kernels and the
        two specs fit one kernel call (``dispatch.pairable``); else (None, None)."""
        ops = _kernel_ops(self.backend, dy)
        specs = [self.recipe.spec_of(op) for op in ("dgrad.dy", "dgrad.w", "wgrad.dy", "wgrad.x")]
        if ops is None or self.delayed_scaling is not None or any(ops.supports(s) is not None for s in specs):
            return None, None
        if not ops.pairable(specs[0], specs[2]):
            return None, None
        if self.record_health:
            self.health["dgrad.dy"] = operand_health(dy, specs[0])
            self.health["wgrad.dy"] = operand_health(dy.t(), specs[2])
        sr = any(s.rounding == "sr" for s in (specs[0], specs[2]))
        seed = ops.draw_seed(self.sr_generator, dy.device) if sr else None
        return ops.quantize_pair(dy, specs[0], specs[2], seed=seed)

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
