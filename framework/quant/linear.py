"""``QuantLinear``: an ``nn.Linear`` whose three GEMMs run on quantized operands (a GemmRecipe).

Each GEMM runs on the first of the layer's backends (``backends.py``: one class each, the
``backend`` option naming the order, chosen once at conversion) that runs on the device and
takes both operand specs; this module holds the autograd function that calls them.

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
between precisions unchanged. Saved for backward: wgrad's quantized input Q(xᵀ), made in the forward
and kept as its element values (one byte each, FP4 held as FP8) and its block scales (E4M3 in one byte)
(``lowbit.numerics.Kept``: restored to the same bits the backward would have quantized), where the
rounding is deterministic and the compiled CPU emulation serves wgrad; else the input in the compute
dtype. And the weight parameter itself, or where dgrad's Q(Wᵀ) equals fprop's Q(W) transposed (square
or whole-tensor weight blocks, deterministic rounding) Q(W) in the compute dtype, quantized once (a
BF16 ``nn.Linear`` keeps its BF16 weight copy too). Quantized weights are cached while the weight is
unchanged (``_cached_weight``): gradient-accumulation micro-batches and evaluation batches reuse them.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from lowbit.distributed import all_reduce_max, world
from lowbit.errors import LowbitError
from lowbit.numerics import (
    DelayedScaling,
    Kept,
    QuantSpec,
    get_format,
    keep_columns,
    quant_error_and_codes,
    quant_error_and_scales,
    rht,
    tensor_amax,
    tiled_contiguous,
)
from lowbit.quant.backends import CHAINS, Backend, chain
from lowbit.quant.gather import gathered_values
from lowbit.quant.recipe import OPERANDS, GemmRecipe

__all__ = ["BACKENDS", "QuantLinear", "operand_health"]

BACKENDS = tuple(CHAINS)

_optimizer_steps = [0]  # optimizer steps taken in this process: a cached quantized weight is one step's


def _count_optimizer_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    _optimizer_steps[0] += 1


register_optimizer_step_post_hook(_count_optimizer_step)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def _pad_rows(t: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad dim 0 to a multiple: zero rows add nothing to any product or amax."""
    extra = -t.shape[0] % multiple
    return F.pad(t, (0, 0, 0, extra)) if extra else t


def operand_health(t: torch.Tensor, spec: QuantSpec, compile: bool = True) -> dict[str, float]:
    """Quantization health of one operand: amax, block-scale range, underflow, saturation, SNR (dB).
    ``compile``: in compiled kernels that write no codes (``quant_error_and_scales``: the same
    numbers; off CPU the SNR's float64 sums in another order), else eagerly (nothing to compile).

    Stochastic rounding here draws from a fixed seed, never torch's global generator: recording
    health must not change what training draws next (a DiT's noise and timesteps did move)."""
    if compile:
        err, scales, global_scale = quant_error_and_scales(t.detach(), spec, seed=0)
    else:
        err, q = quant_error_and_codes(t.detach(), spec, seed=0)
        scales, global_scale = q.scales, q.global_scale
    scales = scales if global_scale is None else scales * global_scale
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
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, layer: QuantLinear, grad: bool
    ) -> torch.Tensor:
        dtype = _compute_dtype(x)
        tokens = layer.token_multiple
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        n = x2.shape[0]
        # dgrad's Q(Wᵀ) is Q(W)ᵀ for some specs: quantize W once and keep Q(W) instead of W; a weight
        # from FSDP2's quantized all-gather is Q(W) already (lowbit.quant.gather)
        gathered = gathered_values(weight)
        if gathered is not None:
            w_q, shares = gathered.to(dtype), True
        else:  # Q(W) quantized once while the weight is unchanged (micro-batches, evaluation): _cached_weight
            w_q, shares = layer._cached_weight("fprop.w", weight, dtype), layer._shares_weight(x)
            if w_q is None and shares:
                w_q = layer._emulator.quantize(layer, weight, "fprop.w", dtype)
        y = layer._gemm("fprop", _pad_rows(x2, tokens), weight, dtype, qb=w_q)[:n]  # (N', in) x (out, in) -> (N, out)
        if bias is not None:
            y = y + bias.to(dtype)
        ctx.layer, ctx.dtype, ctx.has_bias = layer, dtype, bias is not None
        ctx.weight_shape, ctx.weight_dtype, ctx.shares_weight = weight.shape, weight.dtype, shares
        # a gathered weight is saved as the parameter: FSDP2 frees it after the forward and gathers it
        # again (into the same storage) for the backward
        ctx.gathered = gathered is not None
        x_saved = x2.to(dtype)
        # wgrad's Q(xᵀ) made now and kept as element values and scales (lowbit.numerics.Kept), where
        # that gives its bits: half the bytes of the compute-dtype copy it replaces (or less)
        wgrad = grad and ctx.needs_input_grad[1]  # needs_input_grad holds under no_grad too: no backward comes
        ctx.kept = layer._keep_wgrad_x(_pad_rows(x_saved, tokens), dtype) if wgrad else None
        saved_x = (None,) if ctx.kept is not None else (x_saved,)
        kept = ctx.kept.tensors if ctx.kept is not None else ()
        ctx.save_for_backward(w_q if shares and not ctx.gathered else weight, *saved_x, *kept)
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor):
        weight, x2, *kept = ctx.saved_tensors  # weight: W, or Q(W) in the compute dtype (ctx.shares_weight)
        layer, dtype = ctx.layer, ctx.dtype
        if ctx.gathered:
            weight = gathered_values(weight).to(dtype)
        tokens = layer.token_multiple
        out_features, in_features = ctx.weight_shape
        dy2 = dy.reshape(-1, out_features).to(dtype)  # (N, out)
        n = dy2.shape[0]
        dx = dw = db = None
        dy_pad = _pad_rows(dy2, tokens)  # (N', out)
        dy_dgrad, dy_wgrad = layer._quantize_dy(dy_pad) if all(ctx.needs_input_grad[:2]) else (None, None)
        if ctx.needs_input_grad[0]:
            # Q(Wᵀ) laid out as quantizing Wᵀ lays it out: (in, out), contiguous
            if ctx.shares_weight:
                w_q = tiled_contiguous(weight.t())
            else:  # Q(Wᵀ) of the weight as the forward saw it (saved tensors are checked unchanged)
                w_q = layer._cached_weight("dgrad.w", weight, dtype)
            dx = layer._gemm("dgrad", dy_pad, weight.t(), dtype, dy_dgrad, qb=w_q)  # (N', out) x (in, out)
            dx = dx[:n].view(*dy.shape[:-1], in_features)  # (N, in)
        if ctx.needs_input_grad[1]:
            if ctx.kept is not None:  # Q(xᵀ) restored, (in, N'); x itself was not saved
                x_q = ctx.kept.with_tensors(*kept).restore()
                dw = layer._gemm("wgrad", dy_pad.t(), x_q, dtype, qb=x_q)  # (out, N') x (in, N')
            else:
                dw = layer._gemm("wgrad", dy_pad.t(), _pad_rows(x2, tokens).t(), dtype, dy_wgrad)
            dw = dw.to(ctx.weight_dtype)  # (out, in)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy2.sum(0).to(ctx.weight_dtype)
        return dx, dw, db, None, None


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
        backends = chain(backend, recipe)  # chosen once: each GEMM takes the first that runs and fits it
        multiples = recipe.multiples()
        for dim, size in (("in", self.in_features), ("out", self.out_features)):
            if size % multiples[dim]:
                raise LowbitError(f"{dim}_features {size} does not divide by the recipe's block size {multiples[dim]}")
        self.recipe, self.backend = recipe, backend
        self._backends: tuple[Backend, ...] = backends
        self._emulator = backends[-1]  # the last backend takes any GEMM: the emulation
        self.token_multiple = multiples["tokens"]
        self.record_health = False
        self.health_compiled = True  # health statistics in compiled kernels (see operand_health)
        self.health = {}
        self.sr_generator = None
        self.delayed_scaling: dict[str, Any] | None = None  # set by the precision plugin for FP8 delayed scaling
        self.amax_reduction = "local"  # or "global": activation/gradient tensor scales from every rank's amax
        self.quantized_all_gather = False  # under FSDP2: gather the weight as codes (lowbit.quant.gather)
        self.sharded = False  # FSDP2 manages the weight (set when lowbit.distributed.shard_model shards it)
        self._weight_cache: dict[str, tuple[tuple, torch.Tensor]] = {}  # operand -> (weight key, Q), see _cached_weight
        self.scaling_state: dict[str, DelayedScaling] = {}

    def delayed_state(self, operand: str, device: torch.device) -> DelayedScaling:
        """The delayed-scaling state of one operand (created on first use)."""
        if operand not in self.scaling_state:
            spec = self.recipe.spec_of(operand)
            fmt_max = spec.amax_target or get_format(spec.element).max  # the value amax maps to
            self.scaling_state[operand] = DelayedScaling(fmt_max, device=device, **(self.delayed_scaling or {}))
        return self.scaling_state[operand]

    def global_amax(self, operand: str, t: torch.Tensor, spec: QuantSpec) -> torch.Tensor | None:
        """The amax of an activation or gradient operand over every rank, as its spec measures it (after
        the RHT), when ``amax_reduction`` is ``global``, the spec has a tensor-level scale (``block=tensor``
        current scaling, NVFP4's global scale) and more than one process runs; else None (the operand's
        own amax: Transformer Engine's choice for current scaling). Weights are one tensor on every rank
        (DDP replicas, FSDP2 after its all-gather): never reduced."""
        if self.amax_reduction != "global" or operand.endswith(".w") or self._delayed(spec):
            return None
        if not (spec.global_scale or spec.block == "tensor") or world()[1] == 1:
            return None
        src = rht(t.detach(), spec.rht_size, spec.rht_seed) if spec.rht_size else t.detach()
        return all_reduce_max(tensor_amax(src))

    def history_amax(self, operand: str, t: torch.Tensor) -> torch.Tensor:
        """The amax FP8 delayed scaling records for ``operand``: over every rank for activations and
        gradients (Transformer Engine reduces its amax history over the group), the weight's own."""
        amax = tensor_amax(t.detach())
        return amax if operand.endswith(".w") else all_reduce_max(amax)

    def _record_health(self, operand: str, t: torch.Tensor, spec: QuantSpec) -> None:
        if self.record_health:
            self.health[operand] = operand_health(t, spec, self.health_compiled)

    def _backend_for(self, gemm: str, a: torch.Tensor) -> Backend:
        """The first of the layer's backends that runs on ``a``'s device and takes both operand specs."""
        specs = [self.recipe.spec_of(f"{gemm}.{name}") for name in OPERANDS[gemm]]
        return next(b for b in self._backends if b.active(a) and all(b.supports(s) for s in specs))

    def _gemm(
        self, gemm: str, a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype, qa: Any = None, qb: Any = None
    ) -> torch.Tensor:
        """``a @ b.t()`` with each operand through its spec of ``gemm``, on the backend that serves it
        (``qa``: ``a`` already quantized by the fused backend; ``qb``: ``b`` already quantized and
        dequantized by the emulation, see ``_shares_weight``)."""
        a_name, b_name = (f"{gemm}.{name}" for name in OPERANDS[gemm])
        if qb is not None:
            return self._emulator.quantize(self, a, a_name, dtype) @ qb.t()
        backend = self._backend_for(gemm, a)
        if qa is None or not backend.fused:
            qa = backend.quantize(self, a, a_name, dtype)
        return backend.matmul(qa, backend.quantize(self, b, b_name, dtype), dtype)

    def _delayed(self, spec: QuantSpec) -> bool:
        """Whether ``spec`` takes its scale from FP8 delayed scaling (amax history) instead of the operand."""
        return self.delayed_scaling is not None and spec.block == "tensor" and spec.scale_format == "fp32"

    def weight_quantized_once(self) -> str | None:
        """None when fprop's Q(W) and dgrad's Q(Wᵀ) are one quantization, transposed: one spec with
        deterministic rounding, no RHT and no per-operand state (FP8 delayed scaling), blocks that are
        the whole tensor or square (Wᵀ's blocks are W's blocks transposed: same amax, scales and
        elements, so the same values); else why not. What ``_shares_weight`` and the quantized
        all-gather (``lowbit.quant.gather``) rest on."""
        spec = self.recipe.spec_of("fprop.w")
        if spec is None:
            return "its weight is not quantized"
        if spec != self.recipe.spec_of("dgrad.w"):
            return "fprop and dgrad quantize its weight differently (blocks along different dims)"
        if spec.rounding == "sr" or spec.rht_size:
            return "its weight quantization is stochastic or rotated"
        if self._delayed(spec):
            return "FP8 delayed scaling takes the weight's scale from its history"
        if not (spec.block == "tensor" or (not isinstance(spec.block, str) and spec.block[0] == spec.block[1])):
            return f"its weight blocks {spec.block} are not square, so fprop's Q(W) and dgrad's Q(Wᵀ) differ"
        return None

    def _shares_weight(self, x: torch.Tensor) -> bool:
        """Whether dgrad takes fprop's quantized weight, transposed, for Q(Wᵀ): the weight is quantized
        once (``weight_quantized_once``), both GEMMs are emulated and no health is recorded."""
        if self.record_health or any(b.fused and b.active(x) for b in self._backends):
            return False
        return self.weight_quantized_once() is None

    def _cached_weight(self, operand: str, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
        """``operand``'s quantized weight (``fprop.w``: Q(W); ``dgrad.w``: Q(Wᵀ), (in, out)) in ``dtype``,
        quantized once and reused while the weight is unchanged: across the micro-batches of a gradient
        accumulation, an activation-checkpointing recompute, every validation batch, and dgrad after its
        own fprop. The cache is keyed by the weight's storage, its version counter (which every in-place
        write bumps: ``load_state_dict``, ``copy_``, an EMA swap) and the count of optimizer steps taken
        anywhere in the process (``torch.optim``'s global step hook: fused optimizers write their
        parameters without a version bump). A write through ``.data`` is neither and goes unseen.
        None (nothing cached) where reuse would change a number or is unsafe: stochastic rounding or
        delayed scaling of the weight, health being recorded, FSDP2 (it re-gathers into the same storage
        without a version bump), or a fused backend serving the GEMM. The same bits as quantizing again
        (tested)."""
        spec = self.recipe.spec_of(operand)
        if spec is None or spec.rounding == "sr" or self._delayed(spec) or self.record_health or self.sharded:
            self._weight_cache.pop(operand, None)
            return None
        if any(b.fused and b.active(weight) for b in self._backends):
            return None
        key = (
            weight.data_ptr(),
            weight._version,
            _optimizer_steps[0],
            weight.shape,
            weight.dtype,
            weight.device,
            dtype,
            spec,
        )
        cached = self._weight_cache.get(operand)
        if cached is None or cached[0] != key:
            t = weight if operand == "fprop.w" else weight.t()
            cached = self._weight_cache[operand] = (key, self._emulator.quantize(self, t, operand, dtype))
        return cached[1]

    def _keep_wgrad_x(self, x: torch.Tensor, dtype: torch.dtype) -> Kept | None:
        """wgrad's Q(xᵀ) of the padded input ``x`` (N', in), quantized in the forward and kept as element
        values and scales (``keep_columns``), for the backward to restore to the bits it would have
        quantized (tested); None where it would not have the same bits or the same side effects, and the
        forward saves ``x`` itself: the eager reference backend, a fused backend serving wgrad (its own
        quantization), stochastic rounding (draws would move from the backward to the forward),
        delayed scaling or a global amax (state and collectives), health being recorded (it is the
        backward's quantization that records it), or an operand the compiled column path does not take."""
        spec = self.recipe.spec_of("wgrad.x")
        if spec is None or not self._emulator.compile or self.record_health or self.amax_reduction == "global":
            return None
        if self._delayed(spec) or not x.is_contiguous() or self._backend_for("wgrad", x) is not self._emulator:
            return None
        return keep_columns(x, spec, dtype=dtype)

    def _quantize_dy(self, dy: torch.Tensor) -> tuple[Any, Any]:
        """dy for dgrad and dyᵀ for wgrad from one read of dy, where a fused backend runs on dy's device
        and can (its ``quantize_dy``); else (None, None) and each GEMM quantizes its own."""
        fused = next((b for b in self._backends if b.fused and b.active(dy)), None)
        return fused.quantize_dy(self, dy) if fused is not None else (None, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # grad mode as the caller has it (a Function's forward always runs without)
        return _QuantLinearFn.apply(x, self.weight, self.bias, self, torch.is_grad_enabled())

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
