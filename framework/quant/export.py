"""``lowbit export``: a QAT or PTQ checkpoint as real low-bit weights, and the loader that runs them.

``export_checkpoint(run)`` writes ``<out>/model.safetensors`` and ``<out>/manifest.json``. Every
``QATLinear``'s weight is quantized by ``lowbit.numerics`` with the layer's own quantizer (min/max
ranges: ``quantize(w, spec)``; learned, static or fixed-point: onto its current scales and rounded
zero points), and stored as:

  int8, int5-int7        codes int8 (out, in)
  int2-int4, FP4 (E2M1)  codes packed two per byte, element 2i in the low nibble: uint8 (out, in/2)
  integer scales         decode scales, ``block_layout``'s scale shape: (out, 1) per channel,
                         (out, in/g) groups of g, (1, 1) per tensor; FP16 where every one of a
                         layer's is an FP16 value (learned with ``scale_dtype=fp16``), else FP32;
                         zero points int8, same shape
  FP4 scales             the scale format's codes, uint8 (E4M3 for NVFP4, E8M0 for MXFP4), and
                         NVFP4's FP32 tensor scale

under the names the loaded module's ``state_dict`` has (``<layer>.weight_codes``,
``.weight_scales``, ``.weight_scale_codes``, ``.weight_global_scale``, ``.weight_zero_points``,
``.input_scales``, ``.input_zero_points``, ``.bias``). An input quantizer's spec and mode go to the
manifest, and its scale (zero point) to the file when it is not measured per call (static, lsq,
fixed). Everything else (embeddings, norms, kept layers, biases) is stored as the checkpoint has
it; a tensor tied to another (an LM's embedding and head) once, the alias in the manifest.

``load_exported(out)`` rebuilds the model from the manifest's config as the BF16 model is built,
loads those tensors and puts a ``PackedLinear`` where each quantized layer was. Symmetric integer
weights (per channel, group or tensor) with symmetric int8 inputs per token or tensor run integer
GEMMs: ``torch._int_mm`` (int8 x int8 -> int32, exact) per weight group, each scaled by its group's
weight scales and summed, then by the token scales, y = sx * sum_g (xq_g wq_gᵀ) * sw_g + b (by default
only for one scale per row or tensor: per group, unpacking is faster on CPU); every other layer
(grouped, weight-only, FP4, asymmetric, RHT) dequantizes its weight with ``dequantize`` and runs an
FP32 GEMM on the inputs fake-quantized as in training. The inputs are quantized by the same
numerics call with the same scales as the QAT model's input quantizer, so the exported model's
evaluation equals the fake-quantized model's evaluated in FP32 (``precision.mode=fp32``) to float
rounding (validation loss to 1e-4 relative): the integer GEMMs sum exactly where FP32 rounds.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.errors import LowbitError
from lowbit.numerics import (
    QTensor,
    QuantSpec,
    block_layout,
    current_scale,
    dequantize,
    fake_quantize,
    get_format,
    get_spec,
    pack_fp4,
    quantize,
    unpack_fp4,
    unpack_int4,
)
from lowbit.quant.qat import FakeQuant, QATLinear, QATPrecision, qat_layers
from lowbit.rundir import checkpoint_and_run

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "PackedLinear",
    "export_checkpoint",
    "export_main",
    "int8_matmul",
    "integer_gemm",
    "load_exported",
]

FORMAT = "lowbit-export"
FORMAT_VERSION = 1
MODEL_FILE, MANIFEST_FILE = "model.safetensors", "manifest.json"


# ---- numerics the export and the loader share ---------------------------------------------------------
def _quantizer_grid(fq: FakeQuant) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The decode scales and rounded zero points a learned, static or fixed quantizer's forward uses."""
    zero_point = getattr(fq, "zero_point", None) if fq.spec.asymmetric else None
    return fq.current_scale().detach().float(), None if zero_point is None else torch.round(zero_point.detach())


def _is_plain_int(spec: QuantSpec | None, blocks: Sequence[str]) -> bool:
    """A symmetric integer spec of at most 8 bits with plain FP32 scales on one of ``blocks`` (or (1, g))."""
    if spec is None or not get_format(spec.element).is_integer or get_format(spec.element).bits > 8:
        return False
    if spec.scale_format != "fp32" or spec.global_scale or spec.rht_size or spec.asymmetric or spec.sr_prescale != 1:
        return False
    return spec.block in blocks or ("group" in blocks and not isinstance(spec.block, str) and spec.block[0] == 1)


def integer_gemm(weight: QuantSpec, activation: QuantSpec | None) -> bool:
    """Whether a layer runs as int8 GEMMs: symmetric integer weights per channel, group or tensor, and
    symmetric integer inputs per token or tensor, all with FP32 scales (no RHT, no zero points)."""
    return _is_plain_int(weight, ("row", "tensor", "group")) and _is_plain_int(activation, ("row", "tensor"))


def _fast_int_input(spec: QuantSpec | None) -> bool:
    """Whether ``_int_codes`` computes this input spec's codes: symmetric integers per token or tensor,
    FP32 scales mapping amax to qmax, round to nearest even."""
    return (
        _is_plain_int(spec, ("row", "tensor"))
        and spec.rounding == "rne"
        and not spec.pow2_scale
        and not spec.amax_target
    )


def _int_codes(x2: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize(x2, spec)``'s codes and decode scales for an input ``_fast_int_input`` accepts, in four
    tensor passes (five with a NaN) instead of the reference's general path (the per-call cost of an integer GEMM's
    input); the same definition: factor = ``current_scale(amax, qmax)``, code = RNE(x * factor) clamped,
    NaN -> 0. tests/framework/quant/test_export.py checks it against the reference on adversarial rows."""
    fmt = get_format(spec.element)
    x = x2.float()
    amax = x.abs().amax(dim=1, keepdim=True) if spec.block == "row" else x.abs().amax().reshape(1, 1)  # NaN stays
    factor = current_scale(amax, fmt.max)
    y = x * factor
    if torch.isnan(amax).any():  # only a row holding a NaN has one to zero
        y = y.nan_to_num_(nan=0.0)
    return y.round_().clamp_(fmt.qmin, fmt.qmax).to(torch.int8), torch.reciprocal(factor)


def _packs(spec: QuantSpec, in_features: int) -> bool:
    """Codes of 4 bits or fewer (INT2-INT4, E2M1) go two per byte (an even row length)."""
    return get_format(spec.element).bits <= 4 and in_features % 2 == 0


def _group_size(spec: QuantSpec, in_features: int) -> int | None:
    """Elements of a weight row one scale covers: g for (1, g) blocks, the row for ``row``; else None."""
    if spec.block == "row":
        return in_features
    if not isinstance(spec.block, str) and spec.block[0] == 1:
        return spec.block[1]
    return None


def _pad_for_int_mm(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad (M, K) @ (K, N) to CUDA ``_int_mm``'s shapes: M > 16, K and N multiples of 8 (exact: zeros add 0)."""
    m, k = a.shape
    pad_m, pad_k, pad_n = max(17 - m, 0), -k % 8, -b.shape[1] % 8
    return F.pad(a, (0, pad_k, 0, pad_m)), F.pad(b, (0, pad_n, 0, pad_k))


def int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(M, K) int8 @ (K, N) int8 -> (M, N) int32, exactly: ``torch._int_mm``. On CPU it takes any
    shape and strides; on CUDA the operands are zero-padded to M > 16 and K, N multiples of 8."""
    if a.device.type == "cuda" and (a.shape[0] <= 16 or a.shape[1] % 8 or b.shape[1] % 8):
        m, n = a.shape[0], b.shape[1]
        return torch._int_mm(*_pad_for_int_mm(a, b))[:m, :n]
    return torch._int_mm(a, b)


# ---- the inference module ----------------------------------------------------------------------------
class PackedLinear(nn.Module):
    """A quantized Linear for inference: its weight as codes and scales (buffers, packed as the module
    docstring says), its input quantized per call as the QAT layer's input quantizer did.

    ``kernel`` is ``int_mm`` (integer GEMMs, where ``integer_gemm`` allows) or ``dequantize``
    (dequantize the weight, one GEMM in the input's dtype); set it to compare the two paths. The
    default is ``int_mm`` for weights with one scale per row or tensor (one int32 GEMM per call) and
    ``dequantize`` for grouped weights: on CPU, one ``_int_mm`` per group of 32 columns ran 1.9x
    slower than unpacking and one GEMM (the GPT of ``lowbit bench qat``, 2026-12-05).

    Args:
        in_features, out_features, bias: as ``nn.Linear``.
        weight: the weight's QuantSpec; activation, activation_mode: the input quantizer's spec
            (None: weight-only) and mode (``minmax`` measures scales per call; ``lsq``, ``static``
            and ``fixed`` use the stored ``input_scales``).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        weight: QuantSpec | Mapping[str, Any] | str,
        *,
        bias: bool = False,
        activation: QuantSpec | Mapping[str, Any] | str | None = None,
        activation_mode: str = "minmax",
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight_spec = get_spec(weight)
        self.activation_spec = None if activation is None else get_spec(activation)
        self.activation_mode = activation_mode
        self.packed = _packs(self.weight_spec, in_features)
        one_group = _group_size(self.weight_spec, in_features) in (None, in_features)
        self.kernel = "int_mm" if integer_gemm(self.weight_spec, self.activation_spec) and one_group else "dequantize"
        spec, element = self.weight_spec, get_format(self.weight_spec.element)
        codes_dtype = torch.int8 if element.is_integer and not self.packed else torch.uint8
        self.register_buffer(
            "weight_codes", torch.zeros(out_features, in_features // (2 if self.packed else 1), dtype=codes_dtype)
        )
        scale_shape = block_layout((out_features, in_features), spec.block).scale_shape
        fp32_scales = spec.scale_format == "fp32"
        self.register_buffer("weight_scales", torch.ones(scale_shape) if fp32_scales else None)
        self.register_buffer("weight_scale_codes", None if fp32_scales else torch.zeros(scale_shape, dtype=torch.uint8))
        self.register_buffer("weight_global_scale", torch.ones(()) if spec.global_scale else None)
        self.register_buffer(
            "weight_zero_points", torch.zeros(scale_shape, dtype=torch.int8) if spec.asymmetric else None
        )
        stored = self.activation_spec is not None and activation_mode != "minmax"
        self.register_buffer("input_scales", torch.ones(1) if stored else None)
        asymmetric_input = stored and self.activation_spec.asymmetric
        self.register_buffer("input_zero_points", torch.zeros(1, dtype=torch.int8) if asymmetric_input else None)
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    @torch.no_grad()
    def from_qat(cls, layer: QATLinear) -> PackedLinear:
        """The inference module of a trained QATLinear: its weight quantized by its weight quantizer."""
        wq, iq = layer.weight_quant, layer.input_quant
        packed = cls(
            layer.in_features,
            layer.out_features,
            wq.spec,
            bias=layer.bias is not None,
            activation=None if iq is None else iq.spec,
            activation_mode="minmax" if iq is None else iq.mode,
        )
        weight = layer.weight.detach().float()
        if wq.mode == "minmax":
            q = quantize(weight, wq.spec)
        else:
            scales, zero_points = _quantizer_grid(wq)
            q = quantize(weight, wq.spec, scales=scales, zero_points=zero_points)
        codes = pack_fp4(q.codes) if packed.packed else q.codes
        packed.weight_codes = codes.contiguous()
        if packed.weight_scales is not None:  # FP16 where every scale is one (learned with scale_dtype=fp16)
            scales = q.scales.float().contiguous()
            half = scales.to(torch.float16)
            packed.weight_scales = half if torch.equal(half.float(), scales) else scales
        else:
            packed.weight_scale_codes = q.scale_codes.contiguous()
        if packed.weight_global_scale is not None:
            packed.weight_global_scale = q.global_scale.float().reshape(())
        if packed.weight_zero_points is not None:
            packed.weight_zero_points = q.zero_points.to(torch.int8)
        if packed.input_scales is not None:
            scales, zero_points = _quantizer_grid(iq)
            packed.input_scales = scales.reshape(1).clone()
            if packed.input_zero_points is not None:
                packed.input_zero_points = zero_points.reshape(1).to(torch.int8)
        if layer.bias is not None:
            packed.bias = layer.bias.detach().clone()
        return packed

    # ---- weight ----
    def weight_qtensor(self) -> QTensor:
        """The weight as the QTensor ``quantize`` returned at export (codes unpacked, scales decoded)."""
        spec, codes = self.weight_spec, self.weight_codes
        if self.packed:
            codes = unpack_int4(codes) if get_format(spec.element).is_integer else unpack_fp4(codes)
        if self.weight_scales is not None:
            scales = self.weight_scales.float()  # FP32 even after a .to(bfloat16) of the model
            scale_codes = scales.view(torch.int32)
        else:
            scale_codes = self.weight_scale_codes
            scales = get_format(spec.scale_format).decode(scale_codes).float()
        zero_points = None if self.weight_zero_points is None else self.weight_zero_points.to(torch.int32)
        global_scale = None if self.weight_global_scale is None else self.weight_global_scale.float()
        shape = (self.out_features, self.in_features)
        return QTensor(codes, scales, scale_codes, global_scale, zero_points, spec, shape, torch.float32)

    def _input_grid(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.input_scales.float(), None if self.input_zero_points is None else self.input_zero_points.float()

    # ---- forward: the two paths ----
    def _quantize_input(self, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The (N, in) input's codes and decode scales ((N, 1) per token, (1, 1) per tensor), as the QAT
        layer's input quantizer rounds it."""
        spec = self.activation_spec
        if self.activation_mode == "minmax" and _fast_int_input(spec):
            return _int_codes(x2, spec)
        if self.activation_mode == "minmax":
            xq = quantize(x2, spec)
        else:
            scales, zero_points = self._input_grid()
            xq = quantize(x2, spec, scales=scales, zero_points=zero_points)
        return xq.codes, xq.scales.reshape(-1, 1)

    def dequantize_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The reference path: inputs fake-quantized by the QAT call, weight dequantized, one GEMM."""
        spec = self.activation_spec
        if spec is not None and self.activation_mode == "minmax" and _fast_int_input(spec):
            codes, scales = _int_codes(x.reshape(-1, self.in_features), spec)  # fake_quantize's values, bit for bit
            x = (codes.float() * scales).to(x.dtype).reshape(x.shape)
        elif spec is not None and self.activation_mode == "minmax":
            x = fake_quantize(x, spec)
        elif spec is not None:
            scales, zero_points = self._input_grid()
            x = fake_quantize(x, spec, scales=scales, zero_points=zero_points)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, dequantize(self.weight_qtensor(), x.dtype), bias)

    def integer_forward(self, x: torch.Tensor) -> torch.Tensor:
        """int8 x int8 -> int32 GEMMs: y = sx * sum_g (xq_g @ wq_gᵀ) * sw_g + b, g over the weight's
        groups along ``in`` (one group per channel or tensor scale)."""
        shape = x.shape
        x_codes, sx = self._quantize_input(x.reshape(-1, self.in_features))  # (N, in) int8; (N, 1) or (1, 1)
        w_codes = unpack_int4(self.weight_codes) if self.packed else self.weight_codes  # (out, in) int8
        sw = self.weight_scales.float()  # (out, groups): (out, 1) per channel, (1, 1) per tensor
        group = _group_size(self.weight_spec, self.in_features) or self.in_features
        if group == self.in_features:  # one int32 GEMM, scaled once
            y = int8_matmul(x_codes, w_codes.t()).float().mul_(sw.reshape(1, -1))
        else:
            y = torch.zeros(x_codes.shape[0], self.out_features, device=x.device)
            for g, start in enumerate(range(0, self.in_features, group)):
                cols = slice(start, start + group)
                y.addcmul_(int8_matmul(x_codes[:, cols], w_codes[:, cols].t()), sw[:, g])  # int32 sums (exact)
        y.mul_(sx)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.integer_forward(x) if self.kernel == "int_mm" else self.dequantize_forward(x)

    def describe(self) -> dict[str, Any]:
        """This layer's manifest entry (without the tensor names)."""
        spec = self.weight_spec
        weight = {"spec": spec.to_dict(), "group_size": _group_size(spec, self.in_features), "packed": self.packed}
        activation = None
        if self.activation_spec is not None:
            activation = {"spec": self.activation_spec.to_dict(), "mode": self.activation_mode}
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.bias is not None,
            "weight": weight,
            "activation": activation,
            "kernel": self.kernel,
        }

    def extra_repr(self) -> str:
        inputs = "weight-only" if self.activation_spec is None else f"inputs {self.activation_spec.element}"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, weight={self.weight_spec.element}, "
            f"{inputs}, kernel={self.kernel}"
        )


# ---- reading a run's checkpoint ---------------------------------------------------------------------
def _read_state_dict(ckpt: Path) -> tuple[dict[str, torch.Tensor], int | None]:
    from lowbit.checkpoint_io import load_checkpoint

    try:
        payload = load_checkpoint(ckpt)  # one file, or the shards of an FSDP2 run
    except Exception as err:
        first = (str(err).strip().splitlines() or ["(no message)"])[0]
        raise LowbitError(f"cannot read {ckpt} as a checkpoint: {type(err).__name__}: {first}") from err
    state = payload.get("state_dict") if isinstance(payload, dict) else None
    if not isinstance(state, dict):
        raise LowbitError(f"{ckpt} holds no state_dict; give a checkpoint written by train or lowbit quantize")
    return state, payload.get("global_step")


def _load_strict(task: nn.Module, state: Mapping[str, torch.Tensor], ckpt: Path) -> None:
    """``load_state_dict(strict=True)`` with a mismatch as one clear error."""
    own = task.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    resized = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    for keys, what in (
        (missing, "lacks the key"),
        (unexpected, "has a key the model lacks:"),
        (resized, "has another shape for"),
    ):
        if keys:
            raise LowbitError(
                f"{ckpt} {what} '{keys[0]}' ({len(keys)} such key(s)) of the model its run's config.yaml builds; "
                "the checkpoint belongs to another model"
            )
    task.load_state_dict(state, strict=True)


def _check_quantizers(layers: Mapping[str, QATLinear]) -> None:
    """Every layer's quantizers hold a state that can be stored: initialized, zero points within int8."""
    for name, layer in layers.items():
        for what, fq in (("weight", layer.weight_quant), ("input", layer.input_quant)):
            if what == "weight" and fq is None:
                raise LowbitError(
                    f"layer {name} has no weight quantizer; export needs every QATLinear's weight quantized"
                )
            if fq is None or fq.mode == "minmax":
                continue
            if not bool(fq.initialized):
                raise LowbitError(
                    f"layer {name}'s {what} quantizer (mode {fq.mode}) was never initialized; train at least one "
                    "step (or calibrate with lowbit quantize) before exporting"
                )
            zero_point = getattr(fq, "zero_point", None) if fq.spec.asymmetric else None
            rounded = None if zero_point is None else torch.round(zero_point.detach())
            if rounded is not None and bool(((rounded < -128) | (rounded > 127)).any()):
                raise LowbitError(
                    f"layer {name}'s {what} zero points left the int8 range (-128..127) the export stores them in"
                )


def _tied(state: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """{alias: stored key} for state-dict entries that are the same tensor as an earlier one (tied weights)."""
    seen, tied = {}, {}
    for key, value in state.items():
        ident = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape), value.dtype)
        if value.numel() and ident in seen:
            tied[key] = seen[ident]
        else:
            seen.setdefault(ident, key)
    return tied


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


# ---- export --------------------------------------------------------------------------------------------
def _prepare(source: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], Path]:
    """Everything the export writes, computed and checked before anything is written."""
    from importlib.metadata import PackageNotFoundError, version

    import yaml

    from lowbit.registry import registry
    from lowbit.run import build_task

    ckpt, run_dir = checkpoint_and_run(source, "export rebuilds the model from the run's config.yaml")
    config = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    precision_cfg = dict(config.get("precision") or {})
    precision = registry.build("precision", precision_cfg, device_type="cpu")
    if not isinstance(precision, QATPrecision):
        raise LowbitError(
            f"{ckpt} was trained with precision '{precision_cfg.get('name')}'; export needs a QAT or PTQ checkpoint "
            "(train precision=qat_int4 ..., or lowbit quantize a checkpoint first)"
        )
    state, step = _read_state_dict(ckpt)
    task = build_task(config)
    precision.convert_module(task)
    _load_strict(task, state, ckpt)
    layers = qat_layers(task)
    _check_quantizers(layers)

    tensors, entries = {}, {}
    quantized, quantized_bf16 = 0, 0
    for name, layer in layers.items():
        packed = PackedLinear.from_qat(layer)
        own = packed.state_dict()
        tensors.update({f"{name}.{key}": value for key, value in own.items()})
        entries[name] = {**packed.describe(), "tensors": {key: f"{name}.{key}" for key in own}}
        entries[name]["weight"]["mode"] = layer.weight_quant.mode
        quantized += sum(_nbytes(value) for key, value in own.items() if key.startswith("weight_"))
        quantized_bf16 += 2 * layer.weight.numel()
    skip = tuple(f"{name}." for name in layers)
    rest = {k: v for k, v in task.state_dict().items() if not k.startswith(skip)}
    tied = _tied(rest)
    tensors.update({k: v.detach().clone().contiguous() for k, v in rest.items() if k not in tied})
    quantizers = {id(p) for m in task.modules() if isinstance(m, FakeQuant) for p in m.parameters()}
    model_params = {id(p): p for p in task.parameters() if id(p) not in quantizers}.values()  # tied ones once
    try:
        lowbit_version = version("lowbit")
    except PackageNotFoundError:
        lowbit_version = "unknown"
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "lowbit_version": lowbit_version,
        "source": {"checkpoint": str(ckpt), "run_dir": str(run_dir), "global_step": step},
        "precision": {
            "name": precision_cfg.get("name"),
            "options": {k: v for k, v in precision_cfg.items() if k != "name"},
            "quantizers": precision.state_dict(),
        },
        "layers": entries,
        "tied": tied,
        "bytes": {
            "quantized_weights": quantized,
            "quantized_weights_bf16": quantized_bf16,
            "ratio": quantized / quantized_bf16 if quantized_bf16 else None,
            "file_tensors": sum(_nbytes(v) for v in tensors.values()),
            "model_bf16": 2 * sum(p.numel() for p in model_params),
        },
        "config": config,
    }
    return tensors, manifest, run_dir


def export_checkpoint(source: str | Path, out: str | Path | None = None) -> Path:
    """Write ``<out>/model.safetensors`` and ``<out>/manifest.json`` for a QAT or PTQ checkpoint (a .ckpt
    file in a run directory, or the run directory: its ``checkpoints/last.ckpt``); ``out`` defaults to
    ``<run_dir>/export``. Returns ``out``. Bad input is one LowbitError, and nothing is written."""
    from safetensors.torch import save_file

    tensors, manifest, run_dir = _prepare(source)
    out = Path(out).expanduser() if out is not None else run_dir / "export"
    if out.exists() and not out.is_dir():
        raise LowbitError(f"--out {out} is a file; give a directory (made if missing)")
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / MODEL_FILE), metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)})
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    (out / MODEL_FILE).chmod((out / MANIFEST_FILE).stat().st_mode & 0o777)  # safetensors writes 0600; the umask's
    return out


# ---- load ----------------------------------------------------------------------------------------------
def _read_manifest(path: Path) -> tuple[dict[str, Any], Path]:
    folder = path.parent if path.is_file() else path
    manifest_file, model_file = folder / MANIFEST_FILE, folder / MODEL_FILE
    if not manifest_file.is_file() or not model_file.is_file():
        raise LowbitError(
            f"{folder} holds no export ({MANIFEST_FILE} and {MODEL_FILE}); write one with lowbit export RUN"
        )
    manifest = json.loads(manifest_file.read_text())
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise LowbitError(
            f"{manifest_file} is format {manifest.get('format')!r} version {manifest.get('format_version')!r}; "
            f"this lowbit reads {FORMAT!r} version {FORMAT_VERSION}"
        )
    return manifest, model_file


def load_exported(path: str | Path) -> nn.Module:
    """The exported model, ready for inference: the task (a LightningModule; ``.model`` is the network)
    rebuilt from the manifest's config as the BF16 model is, its high-precision tensors loaded and each
    quantized Linear a ``PackedLinear``, in eval mode. Its evaluation equals the fake-quantized QAT
    model's evaluated in FP32 (``precision.mode=fp32``): validation loss to 1e-4 relative."""
    from safetensors.torch import load_file

    manifest, model_file = _read_manifest(Path(path).expanduser())
    from lowbit.run import build_task

    task = build_task(manifest["config"])  # no precision conversion: the layers as the BF16 model has them
    tensors = load_file(str(model_file))
    for name, entry in manifest["layers"].items():
        parent_name, _, attr = name.rpartition(".")
        try:
            parent = task.get_submodule(parent_name) if parent_name else task
        except AttributeError:
            parent = None
        linear = getattr(parent, attr, None)
        shape = (entry["in_features"], entry["out_features"])
        if not isinstance(linear, nn.Linear) or (linear.in_features, linear.out_features) != shape:
            raise LowbitError(
                f"the model built from {model_file.parent / MANIFEST_FILE}'s config has no {shape[0]}->{shape[1]} "
                f"Linear at {name}; the export is damaged or from another lowbit version"
            )
        activation = entry["activation"]
        setattr(
            parent,
            attr,
            PackedLinear(
                entry["in_features"],
                entry["out_features"],
                QuantSpec.from_dict(entry["weight"]["spec"]),
                bias=entry["bias"],
                activation=None if activation is None else QuantSpec.from_dict(activation["spec"]),
                activation_mode="minmax" if activation is None else activation["mode"],
            ),
        )
        scales = tensors.get(f"{name}.weight_scales")
        if scales is not None and scales.dtype == torch.float16:  # kept in FP16 in memory too
            getattr(parent, attr).weight_scales = torch.ones_like(scales)
    tensors.update({alias: tensors[stored] for alias, stored in manifest.get("tied", {}).items()})
    try:
        task.load_state_dict(tensors, strict=True)
    except RuntimeError as err:
        first = (str(err).strip().splitlines() or ["(no message)"])[0]
        raise LowbitError(
            f"{model_file} does not fit the model its manifest's config builds ({first}); the export is damaged"
        ) from err
    return task.eval()


# ---- command line --------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lowbit export",
        description="A QAT or PTQ checkpoint as real low-bit weights: model.safetensors + manifest.json.",
    )
    parser.add_argument("source", metavar="CKPT_OR_RUN_DIR", help="a .ckpt in a run directory, or the run directory")
    parser.add_argument("--out", default=None, help="output directory (default: RUN_DIR/export)")

    def error(message: str):
        raise LowbitError(f"{message} (usage: lowbit export CKPT_OR_RUN_DIR [--out DIR])")

    parser.error = error
    return parser


def _megabytes(n: int) -> str:
    return f"{n / 2**20:.2f} MB"


def export_main(argv: Sequence[str] | None = None) -> int:
    """``lowbit export CKPT_OR_RUN_DIR [--out DIR]``: write the export, print its files and sizes."""
    args = _parser().parse_args(argv)
    out = export_checkpoint(args.source, args.out)
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    size = manifest["bytes"]
    print(f"exported {len(manifest['layers'])} quantized layers ({manifest['precision']['name']})")
    print(f"  {out / MODEL_FILE}\n  {out / MANIFEST_FILE}")
    if size["ratio"] is not None:
        print(
            f"quantized weights: {_megabytes(size['quantized_weights'])} vs {_megabytes(size['quantized_weights_bf16'])} "
            f"in BF16 ({size['ratio']:.3f}x)"
        )
    file_ratio = size["file_tensors"] / size["model_bf16"] if size["model_bf16"] else math.nan
    print(
        f"file: {_megabytes(size['file_tensors'])} vs the whole model in BF16 {_megabytes(size['model_bf16'])} "
        f"({file_ratio:.3f}x; the layers kept in high precision are stored as trained)"
    )
    return 0
