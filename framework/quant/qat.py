"""Quantization-aware training: fake quantizers and ``QATLinear``.

A ``FakeQuant`` rounds one tensor (a weight, or a linear layer's input) to the values a
``QuantSpec`` can represent, in the forward only, with ``lowbit.numerics.fake_quantize`` (the
one definition of every number; here nothing else rounds). Its scales come from one of four
sources (``mode``):

  minmax  measured from the tensor at every call (symmetric absmax, or min/max with a zero point):
          round-to-nearest with min/max ranges, the scheme of Krishnamoorthi's whitepaper and
          torchao's ``FakeQuantizer``; any spec, FP4 (NVFP4, MXFP4) included.
  lsq     learned step sizes (Esser et al. 2020, "Learned Step Size Quantization"): the scales are
          ``nn.Parameter``s, and optionally the zero points (LSQ+, Bhalgat et al. 2020); initialized
          from the data at the first training forward (before it, an evaluation rounds with min/max
          scales and keeps nothing); integer formats with FP32 scales.
  static  fixed scales: calibrated as the running absmax over the first ``calibration_steps``
          forwards (static per-tensor activations), or set by post-training quantization (MSE
          ranges, AdaRound), then frozen.
  fixed   trainable fixed point (QFX, Dong et al. 2024, "Trainable Fixed-Point Quantization for
          Deep Learning Acceleration on FPGAs"): one power-of-two scale 2^-F per tensor whose
          binary-point position F (fractional bits of a ``bits``-bit word) is a parameter,
          rounded to an integer in the forward.

Gradients (``_LearnedFakeQuant``): the straight-through estimator, clipped to the representable
range as LSQ defines it: with v = x / s + z, code = clamp(round(v), Qmin, Qmax) and
x_hat = (code - z) * s,
  dx_hat/dx = 1 if Qmin <= v <= Qmax else 0
  dx_hat/ds = round(v) - v inside, Qmin - z below, Qmax - z above      (LSQ eq. 3)
  dx_hat/dz = 0 inside, -s outside                                      (LSQ+)
each scale's gradient summed over the elements it scales and multiplied by
g = 1 / sqrt(n * Qmax), n the elements per scale (per sample, for activations; LSQ section 2.2).
In ``fixed`` mode the scale is 2^-round(F) and F's gradient is ds/dF = -ln 2 * s times the
above (the rounding of F passes straight through). ``minmax`` passes gradients through
unchanged: its range covers the tensor, so nothing clips.

Master weights stay in high precision (the ``nn.Linear``'s own parameters: a QAT checkpoint
loads into a BF16 model and back); the quantizers' parameters and buffers sit beside them in the
state dict (``weight_quant.scale``, ``input_quant.frac_bits``). The GEMMs run in the compute
dtype on the fake-quantized operands, forward and backward: what torchao's QAT does too.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.autocast import AutocastPrecision
from lowbit.distributed import all_reduce_max, set_parameter, world
from lowbit.errors import LowbitError
from lowbit.numerics import FLT_MAX, QuantSpec, block_layout, fake_quantize, get_format, get_spec, quantize
from lowbit.quant.convert import DEFAULT_KEEP, ConversionReport, replace_linears

__all__ = ["QUANTIZER_MODES", "SCALE_DTYPES", "FakeQuant", "QATLinear", "QATPrecision", "qat_layers"]

QUANTIZER_MODES = ("minmax", "lsq", "static", "fixed")
SCALE_DTYPES = ("fp32", "fp16")


def _check_learnable(spec: QuantSpec, mode: str) -> None:
    element = get_format(spec.element)
    if not element.is_integer:
        raise LowbitError(
            f"quantizer mode '{mode}' learns or fixes integer step sizes; element '{spec.element}' is not an "
            "integer format (use mode minmax for float formats such as NVFP4 or MXFP4)"
        )
    if spec.scale_format != "fp32" or spec.global_scale or spec.rht_size:
        raise LowbitError(f"quantizer mode '{mode}' needs FP32 scales without a global scale or RHT; got {spec}")
    if mode == "fixed" and (spec.block != "tensor" or spec.asymmetric):
        raise LowbitError(
            "quantizer mode 'fixed' (QFX) has one symmetric power-of-two scale per tensor: block 'tensor'"
        )


class _LearnedFakeQuant(torch.autograd.Function):
    """x_hat = fake_quantize(x, spec, scales=s, zero_points=round(z)); gradients as the module doc says."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, fq: FakeQuant):
        zp = None if zero_point is None else torch.round(zero_point.detach())
        out = fake_quantize(x.detach(), fq.spec, scales=scale.detach(), zero_points=zp)
        ctx.fq, ctx.has_zp = fq, zero_point is not None
        ctx.save_for_backward(x, scale, *(() if zp is None else (zp,)))
        return out

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor):
        x, scale, *zp = ctx.saved_tensors
        fq: FakeQuant = ctx.fq
        element = get_format(fq.spec.element)
        layout = block_layout(x.shape, fq.spec.block)
        s = (
            scale.detach()
            .float()
            .reshape(-1 if not layout.per_tensor else 1, layout.blocks_per_row if not layout.per_tensor else 1)
        )
        s4 = s[:, None, :, None]  # (B or 1, 1, nb, 1) against (B, r, nb, c) blocks
        blocks = layout.blocks(layout.block_rows(x.detach().float()))
        grads = layout.blocks(layout.block_rows(dy.float()))
        z4 = zp[0].float().reshape(s.shape)[:, None, :, None] if zp else 0.0
        v = blocks * torch.clamp(torch.reciprocal(s4), max=FLT_MAX) + z4
        below, above = v < element.qmin, v > element.qmax
        inside = ~(below | above)
        dx = (grads * inside).reshape(x.shape).to(x.dtype) if ctx.needs_input_grad[0] else None
        ds = dz = None
        g = fq.grad_scale(x)
        reduce = (0, 1, 3) if layout.per_tensor else (1, 3)
        if ctx.needs_input_grad[1]:
            ds_elem = torch.where(below, element.qmin - z4, torch.where(above, element.qmax - z4, torch.round(v) - v))
            ds = ((grads * ds_elem).sum(dim=reduce) * g).reshape(scale.shape).to(scale.dtype)
        if ctx.has_zp and ctx.needs_input_grad[2]:
            dz = ((grads * (~inside) * -s4).sum(dim=reduce) * g).reshape(scale.shape).to(scale.dtype)
        return dx, ds, dz, None


class _StraightThrough(torch.autograd.Function):
    """The value of ``fake_quantize(x, spec)``, the gradient of the identity (min/max ranges clip nothing)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
        return fake_quantize(x.detach(), spec)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor):
        return dy, None


class FakeQuant(nn.Module):
    """Fake quantization of one tensor (see the module docstring for the modes).

    Args:
        spec: the QuantSpec (a preset name or mapping too).
        mode: ``minmax``, ``lsq``, ``static`` or ``fixed``.
        shape: the tensor's shape when it is fixed (a weight): learned or static scales get one entry
            per block. None for activations, which then need block ``tensor`` in the learned modes.
        learn_zero_point: LSQ+: learn the zero points too (an asymmetric spec).
        calibration_steps: ``static`` without given scales: forwards whose absmax calibrates the scale.
        per_sample: the scales' gradient counts elements per sample (activations), not per scale.
        scale_dtype: ``lsq``: ``fp16`` keeps the learned scales on FP16's grid (rounded to nearest in
            the forward, the rounding straight-through), so an export stores them in 2 bytes exactly.
    """

    def __init__(
        self,
        spec: str | Mapping[str, Any] | QuantSpec,
        mode: str = "minmax",
        *,
        shape: tuple[int, ...] | None = None,
        learn_zero_point: bool = False,
        calibration_steps: int = 0,
        per_sample: bool = False,
        scale_dtype: str = "fp32",
    ) -> None:
        super().__init__()
        self.sets_parameters_in_forward = True  # its first training forward initialises them (FSDP2: see set_parameter)
        self.spec = get_spec(spec)
        if mode not in QUANTIZER_MODES:
            raise LowbitError(f"unknown quantizer mode '{mode}'; valid: {', '.join(QUANTIZER_MODES)}")
        if scale_dtype not in SCALE_DTYPES:
            raise LowbitError(f"scale_dtype must be one of {', '.join(SCALE_DTYPES)}, got {scale_dtype!r}")
        if scale_dtype != "fp32" and mode != "lsq":
            raise LowbitError(f"scale_dtype '{scale_dtype}' applies to learned scales (mode lsq), not mode '{mode}'")
        self.scale_dtype = scale_dtype
        self.mode, self.per_sample, self.calibration_steps = mode, per_sample, int(calibration_steps)
        self.of_activation = shape is None  # a weight is one tensor on every rank; an activation is not
        if learn_zero_point and (mode != "lsq" or not self.spec.asymmetric):
            raise LowbitError("learn_zero_point (LSQ+) needs mode lsq and an asymmetric integer spec")
        if mode == "minmax":
            return
        _check_learnable(self.spec, mode)
        if shape is None and self.spec.block != "tensor":
            raise LowbitError(
                f"quantizer mode '{mode}' on an activation needs one scale per tensor (block 'tensor'), "
                f"got block {self.spec.block!r}"
            )
        scale_shape = (1,) if shape is None else block_layout(tuple(shape), self.spec.block).scale_shape
        ones = torch.ones(scale_shape)
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        if mode == "fixed":
            self.frac_bits = nn.Parameter(torch.zeros(()))
        elif mode == "lsq":
            self.scale = nn.Parameter(ones)
        else:
            self.register_buffer("scale", ones)
            self.register_buffer("amax", torch.zeros(()))
            self.register_buffer("observed", torch.zeros((), dtype=torch.long))
        if self.spec.asymmetric:
            zeros = torch.zeros(scale_shape)
            if learn_zero_point:
                self.zero_point = nn.Parameter(zeros)
            else:
                self.register_buffer("zero_point", zeros)

    def no_weight_decay(self) -> set[str]:
        """Learned step sizes, zero points and binary points are not decayed (timm's convention, read by
        ``lowbit.tasks.optim.param_groups``): decay would pull a scale toward 0, i.e. toward clipping."""
        return {name for name, _ in self.named_parameters(recurse=False)}

    # ---- scales ------------------------------------------------------------------------------------
    @property
    def element(self):
        return get_format(self.spec.element)

    def grad_scale(self, x: torch.Tensor) -> float:
        """LSQ's g = 1 / sqrt(n * Qmax), n the elements each scale covers (per sample for activations)."""
        n = x[0].numel() if self.per_sample and x.dim() > 1 else x.numel() // self.current_scale().numel()
        return 1.0 / math.sqrt(max(n, 1) * self.element.qmax)

    def current_scale(self) -> torch.Tensor:
        """The decode scale(s) the next forward uses (learned modes; ``fixed``: 2^-round(F), the
        rounding straight-through for F's gradient)."""
        if self.mode == "fixed":
            f = self.frac_bits
            return torch.exp2(-(f + (torch.round(f) - f).detach())).reshape(1)
        if self.scale_dtype == "fp16":  # FP16's positive normal range, then its grid (straight-through)
            fp16 = torch.finfo(torch.float16)
            s = self.scale.abs().clamp(fp16.tiny, fp16.max)
            return s + (s.to(torch.float16).float() - s).detach()
        return self.scale.abs().clamp_min(torch.finfo(torch.float32).tiny)

    @torch.no_grad()
    def init_from(self, x: torch.Tensor) -> None:
        """Set the scales (zero points, binary point) from data: the min/max quantization's scales, so
        training starts where round-to-nearest PTQ is; ``fixed``: the smallest F whose range covers
        the tensor's absmax (F = floor(log2(Qmax / absmax)))."""
        x = self._over_ranks(x.detach().float())
        q = quantize(x, self.spec)
        if self.mode == "fixed":
            amax = float(x.abs().max())
            fbits = math.floor(math.log2(self.element.qmax / amax)) if amax > 0 and math.isfinite(amax) else 0
            set_parameter(self, "frac_bits", torch.tensor(float(fbits)))
        else:
            set_parameter(self, "scale", q.scales)
            if self.spec.asymmetric:
                set_parameter(self, "zero_point", q.zero_points.float())
            if self.mode == "static":
                self.amax.copy_(x.abs().max())
        self.initialized.fill_(True)

    def _over_ranks(self, x: torch.Tensor) -> torch.Tensor:
        """What a data-driven per-tensor scale sees of ``x`` in a run of several processes: its min and
        max over every rank's part of the global batch (the tensor-level scale depends on nothing
        else), so every rank starts from the same scale, the one a single process would measure on
        the whole batch; ``x`` itself in one process, and for weights (one tensor on every rank)."""
        if not self._reduced():
            return x
        return all_reduce_max(torch.stack([-x.amin(), x.amax()])) * x.new_tensor([-1.0, 1.0])

    def _reduced(self) -> bool:
        return self.of_activation and world()[1] > 1

    def _nonzero(self, x: torch.Tensor) -> bool:
        """Whether ``x`` holds a nonzero (on any rank, for an activation: every rank decides alike)."""
        nonzero = x.detach().ne(0).any().float()
        return bool(all_reduce_max(nonzero) if self._reduced() else nonzero)

    @torch.no_grad()
    def set_scales(self, scales: torch.Tensor, zero_points: torch.Tensor | None = None) -> None:
        """Fix the scales (post-training quantization's searched ranges); marks the quantizer initialized."""
        if self.mode not in ("static", "lsq"):
            raise LowbitError(f"set_scales needs a quantizer in mode static or lsq, this one is '{self.mode}'")
        self.scale.copy_(scales.reshape(self.scale.shape))
        if zero_points is not None:
            self.zero_point.copy_(zero_points.reshape(self.zero_point.shape).float())
        self.initialized.fill_(True)
        if self.mode == "static":
            self.observed.fill_(max(self.calibration_steps, 1))

    @torch.no_grad()
    def _calibrate(self, x: torch.Tensor) -> None:
        """Static scales: running absmax over the first ``calibration_steps`` training forwards."""
        amax = x.detach().abs().amax().float()
        amax = torch.maximum(self.amax, all_reduce_max(amax) if self._reduced() else amax)
        self.amax.copy_(amax)
        self.scale.copy_(quantize(amax.reshape(1), self.spec.replace(block="tensor")).scales.reshape(self.scale.shape))
        self.observed += 1
        self.initialized.fill_(True)

    # ---- forward -----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "minmax":
            return _StraightThrough.apply(x, self.spec)
        if self.mode == "static" and self.training and int(self.observed) < self.calibration_steps:
            self._calibrate(x)
        elif not bool(self.initialized) and not self.training:  # evaluated before its first training batch (the
            return _StraightThrough.apply(x, self.spec)  # sanity check): min/max scales, and no validation data kept
        elif not bool(self.initialized) and self._nonzero(x):  # an all-zero tensor (a zero-initialised weight:
            self.init_from(x)  # adaLN-Zero, a zero head) rounds to itself on any scale: init from the first nonzero one
        zero_point = getattr(self, "zero_point", None) if self.spec.asymmetric else None
        return _LearnedFakeQuant.apply(x, self.current_scale(), zero_point, self)

    def stats(self, x: torch.Tensor, x_hat: torch.Tensor) -> dict[str, float]:
        """Health of one quantization: amax, scale range, underflow and clipped fractions, SNR (dB),
        and the learned state (mean scale, binary point) a W&B user watches converge."""
        x, x_hat = x.detach().float(), x_hat.detach().float()
        noise = float((x - x_hat).pow(2).sum())
        signal = float(x.pow(2).sum())
        nonzero = x != 0
        underflow = float((nonzero & (x_hat == 0)).sum()) / max(int(nonzero.sum()), 1)
        if self.mode == "minmax":
            scales = quantize(x, self.spec).scales
            clipped = 0.0
        else:
            scales = self.current_scale().detach()
            layout = block_layout(x.shape, self.spec.block)
            s = scales.reshape(1 if layout.per_tensor else -1, 1 if layout.per_tensor else layout.blocks_per_row)
            v = layout.blocks(layout.block_rows(x)) / s[:, None, :, None]
            clipped = float(((v < self.element.qmin - 0.5) | (v > self.element.qmax + 0.5)).float().mean())
        out = {
            "amax": float(x.abs().max()),
            "scale_min": float(scales.min()),
            "scale_max": float(scales.max()),
            "underflow": underflow,
            "saturation": clipped,
            # as lowbit.numerics.quant_error: +inf exact (or all zero), -inf where a NaN makes the noise NaN
            "snr_db": math.inf if noise == 0 else (10 * math.log10(signal / noise) if signal > 0 else -math.inf),
        }
        if self.mode == "fixed":
            out["frac_bits"] = float(torch.round(self.frac_bits.detach()))
        elif self.mode != "minmax":
            out["scale_mean"] = float(scales.float().mean())
        return out

    def extra_repr(self) -> str:
        block = self.spec.block if isinstance(self.spec.block, str) else "x".join(map(str, self.spec.block))
        return f"{self.spec.element}/{block}, mode={self.mode}"


class QATLinear(nn.Linear):
    """``nn.Linear`` whose forward multiplies fake-quantized operands: y = Q_in(x) Q_w(W)ᵀ + b.

    Same parameters and state-dict keys as the layer it replaces, plus its quantizers' under
    ``weight_quant.`` and ``input_quant.``. ``health`` holds the latest per-operand statistics when
    ``record_health`` is set (the health callback turns it on every N steps), under the operand
    names QuantLinear uses (``fprop.w``, ``fprop.x``).
    """

    @classmethod
    def from_linear(cls, linear: nn.Linear, weight_quant: FakeQuant | None, input_quant: FakeQuant | None) -> QATLinear:
        """A QATLinear sharing ``linear``'s parameters (no copy: tied weights stay tied)."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = linear.in_features, linear.out_features
        layer.weight, layer.bias = linear.weight, linear.bias
        layer.weight_quant, layer.input_quant = weight_quant, input_quant
        layer.record_health, layer.health = False, {}
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_q = x if self.input_quant is None else self.input_quant(x)
        w_q = self.weight if self.weight_quant is None else self.weight_quant(self.weight)
        if self.record_health:
            for op, quant, raw, fq in (
                ("fprop.x", self.input_quant, x, x_q),
                ("fprop.w", self.weight_quant, self.weight, w_q),
            ):
                if quant is not None:
                    self.health[op] = quant.stats(raw, fq)
        return F.linear(x_q, w_q, self.bias)


def qat_layers(module: nn.Module) -> dict[str, QATLinear]:
    """The QATLinear layers of a module, by fully-qualified name."""
    return {name: m for name, m in module.named_modules() if isinstance(m, QATLinear)}


class QATPrecision(AutocastPrecision):
    """Quantization-aware training: every eligible Linear becomes a ``QATLinear`` with a weight and
    (optionally) an input quantizer. The GEMMs run in the autocast compute dtype (BF16 where fast,
    else FP32) on the fake-quantized operands, forward and backward.

    Args:
        weight: the weights' QuantSpec (blocks along ``in``, the contraction dim: ``row`` is one scale per
            output channel, ``(1, 32)`` groups of 32), and ``weight_mode`` its scales' source.
        activation: the inputs' QuantSpec or None (weight-only), and ``activation_mode``.
        learn_zero_point: LSQ+ zero points for asymmetric specs in mode lsq.
        calibration_steps: static activation scales calibrate over this many training forwards.
        scale_dtype: learned (lsq) weight scales in ``fp32`` or on FP16's grid (``fp16``: exported in 2 bytes).
        keep, keep_last_blocks: as the training precisions (``DEFAULT_KEEP``: the output layer stays).
        device_type, mode: the autocast of ``AutocastPrecision``.
    """

    name = "qat"

    def __init__(
        self,
        *,
        weight: str | Mapping[str, Any] | QuantSpec,
        weight_mode: str = "minmax",
        activation: str | Mapping[str, Any] | QuantSpec | None = None,
        activation_mode: str = "minmax",
        learn_zero_point: bool = False,
        calibration_steps: int = 0,
        scale_dtype: str = "fp32",
        keep: Sequence[str] = DEFAULT_KEEP,
        keep_last_blocks: int | float = 0,
        device_type: str | None = None,
        mode: str = "auto",
    ) -> None:
        super().__init__(device_type=device_type, mode=mode)
        if scale_dtype not in SCALE_DTYPES:
            raise LowbitError(f"precision.scale_dtype must be one of {', '.join(SCALE_DTYPES)}, got {scale_dtype!r}")
        self.scale_dtype = scale_dtype
        self.weight_spec = get_spec(weight)
        self.activation_spec = None if activation is None else get_spec(activation)
        self.weight_mode, self.activation_mode = weight_mode, activation_mode
        self.learn_zero_point, self.calibration_steps = learn_zero_point, calibration_steps
        if calibration_steps < 0:
            raise LowbitError(f"precision.calibration_steps must be >= 0, got {calibration_steps}")
        # build one of each now: a bad spec/mode pair is reported at construction, before any model exists
        self._weight_quant((2 * _block_cols(self.weight_spec), 2 * _block_cols(self.weight_spec)))
        if self.activation_spec is not None:
            self._input_quant()
        self.keep, self.keep_last_blocks = list(keep), keep_last_blocks
        self.report = ConversionReport()

    def _weight_quant(self, shape: tuple[int, int]) -> FakeQuant:
        zp = self.learn_zero_point and self.weight_spec.asymmetric and self.weight_mode == "lsq"
        dtype = self.scale_dtype if self.weight_mode == "lsq" else "fp32"  # measured or stored scales stay FP32
        return FakeQuant(self.weight_spec, self.weight_mode, shape=shape, learn_zero_point=zp, scale_dtype=dtype)

    def _input_quant(self) -> FakeQuant:
        spec = self.activation_spec
        zp = self.learn_zero_point and spec.asymmetric and self.activation_mode == "lsq"
        steps = self.calibration_steps if self.activation_mode == "static" else 0
        return FakeQuant(spec, self.activation_mode, learn_zero_point=zp, calibration_steps=steps, per_sample=True)

    def multiples(self) -> dict[str, int]:
        """What a layer's in/out features must divide by: the weight's blocks (in, out) and the
        activation's (in)."""
        cols = math.lcm(_block_cols(self.weight_spec), _block_cols(self.activation_spec))
        rows = 1 if isinstance(self.weight_spec.block, str) else self.weight_spec.block[0]
        return {"in": cols, "out": rows}

    @property
    def description(self) -> str:
        r = self.report
        total = len(r.converted) + len(r.kept) + len(r.misfit)
        what = f"{self.name}: weights {_describe(self.weight_spec, self.weight_mode)}"
        if self.activation_spec is None:
            what += ", weight-only"
        else:
            what += f", inputs {_describe(self.activation_spec, self.activation_mode, rows='per token')}"
        if not total:
            return f"{what} (not applied yet), {self.compute}"
        return f"{what}; {len(r.converted)} of {total} Linear layers quantized, {self.compute}"

    def convert_module(self, module: nn.Module) -> nn.Module:
        def make(linear: nn.Linear) -> QATLinear:
            weight_quant = self._weight_quant(tuple(linear.weight.shape)).to(linear.weight.device)
            input_quant = None if self.activation_spec is None else self._input_quant().to(linear.weight.device)
            return QATLinear.from_linear(linear, weight_quant, input_quant)

        report = replace_linears(
            module, make, self.multiples(), keep=self.keep, keep_last_blocks=self.keep_last_blocks, skip=QATLinear
        )
        if report.converted or not self.report.converted:  # a second call (validate after fit) finds nothing new
            self.report = report
        return module

    def state_dict(self) -> dict[str, Any]:
        """What the checkpoint says about the quantization (the quantizers' state is in the model's)."""
        return {
            "weight": self.weight_spec.to_dict(),
            "weight_mode": self.weight_mode,
            "activation": None if self.activation_spec is None else self.activation_spec.to_dict(),
            "activation_mode": self.activation_mode,
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Nothing to restore: the quantizers' parameters and buffers come back with the model's."""


def _block_cols(spec: QuantSpec | None) -> int:
    if spec is None or isinstance(spec.block, str):
        return 1
    return spec.block[1]


def _describe(spec: QuantSpec, mode: str, rows: str = "per channel") -> str:
    block = {"row": rows, "tensor": "per tensor"}.get(spec.block) if isinstance(spec.block, str) else None
    if block is None:
        block = f"groups of {spec.block[1]}" if spec.block[0] == 1 else f"{spec.block[0]}x{spec.block[1]} blocks"
    return f"{spec.element} {block} ({mode})"
