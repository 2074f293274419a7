"""Quantized all-gather under FSDP2: a ``QuantLinear``'s weight sent as its low-precision codes.

Under FSDP2 each rank holds a slice of every weight's rows and all-gathers the whole weight before
a block's forward. Where a layer quantizes its weight one way for both GEMMs that read it (fprop's
Q(W) and dgrad's Q(Wᵀ) = Q(W)ᵀ: a tensor-wide scale as FP8 current scaling, or square blocks as
NVFP4's 16x16, with round-to-nearest), the gathered weight is only ever used quantized, so each
rank quantizes its own rows and the ranks all-gather the codes and scales instead of the FP32
master weight: FP8 sends 1 byte an element, NVFP4 half a byte plus one E4M3 scale per 256, where
the plain all-gather sends 4 (BF16: 2). torchao's ``enable_fsdp_float8_all_gather`` does this for
FP8; lowbit does it for FP4 codes too.

The numbers are those of the plain all-gather: the tensor scale comes from the global amax (one
all-reduce of a scalar), every block lies within one rank's rows, so each rank's codes are the
rows of the codes of the whole weight, and the decoded weight equals ``fake_quantize`` of the
whole weight bit for bit (tested). It rides on FSDP2's all-gather extension
(``fsdp_pre_all_gather``/``fsdp_post_all_gather`` on the sharded parameter's local tensor):

- ``ShardedQuantWeight`` wraps the weight before ``fully_shard`` (FSDP2 keeps the wrapper through
  its chunking and copies); its hooks quantize this rank's rows and decode the gathered codes;
- ``GatheredQuantWeight`` is what the block's forward then sees as ``layer.weight``: Q(W) already,
  which ``QuantLinear`` uses for fprop and dgrad as it is.

The Triton kernels take their weight as kernel operands, not decoded values: on a machine where
they run, weights are gathered in full precision as before (``eligible`` says why not). The health
callback records no weight operand of a layer fed a gathered weight (the master weight is not there
to measure the quantization error against); activations and gradients are recorded as before.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn

from lowbit.numerics import QTensor, QuantSpec, dequantize, get_format, quantize, tensor_amax
from lowbit.numerics.packing import pack_fp4, unpack_fp4

__all__ = ["GatheredQuantWeight", "ShardedQuantWeight", "eligible", "gathered_values", "quantize_all_gathers"]

aten = torch.ops.aten

# ops FSDP2 applies to the sharded weight while laying it out (chunk, pad, copy, move): their results
# stay wrapped; any other op (the optimizer's arithmetic, a norm) sees and returns plain tensors
_KEEP_WRAPPED = {
    aten.alias.default,
    aten.as_strided.default,
    aten.clone.default,
    aten.copy_.default,
    aten.detach.default,
    aten.empty_like.default,
    aten.new_zeros.default,
    aten.slice.Tensor,
    aten.split.Tensor,
    aten.split_with_sizes.default,
    aten.view.default,
    aten._to_copy.default,
    aten._pin_memory.default,
}


@dataclass(frozen=True)
class _Info:
    spec: QuantSpec


class _Wrapper(torch.Tensor):
    """A tensor that is ``_data`` for every op, carrying ``_info`` through FSDP2's layout ops."""

    _data: torch.Tensor
    _info: _Info

    @staticmethod
    def __new__(cls, data: torch.Tensor, info: _Info, requires_grad: bool = False):
        return torch.Tensor._make_wrapper_subclass(
            cls,
            data.shape,
            strides=data.stride(),
            storage_offset=data.storage_offset(),
            dtype=data.dtype,
            layout=data.layout,
            device=data.device,
            requires_grad=requires_grad,
        )

    def __init__(self, data: torch.Tensor, info: _Info, requires_grad: bool = False) -> None:
        self._data, self._info = data, info

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        info = next(t._info for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, cls))
        args, kwargs = pytree.tree_map_only(cls, lambda t: t._data, (args, kwargs or {}))
        out = func(*args, **kwargs)
        if func not in _KEEP_WRAPPED:
            return out
        return pytree.tree_map_only(torch.Tensor, lambda t: cls(t, info), out)

    def __tensor_flatten__(self):
        return ["_data"], self._info

    @classmethod
    def __tensor_unflatten__(cls, inner: dict[str, torch.Tensor], info: _Info, outer_size, outer_stride):
        return cls(inner["_data"], info)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._info.spec.element}/{self._info.spec.block}, {self._data!r})"


class GatheredQuantWeight(_Wrapper):
    """The whole weight after a quantized all-gather: ``_data`` is Q(W), decoded, in the param dtype."""


def _amax_over(mesh: Any, t: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    amax = tensor_amax(t).reshape(1)
    if mesh is not None and mesh.size() > 1:
        dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=mesh.get_group())
    return amax.reshape(())


class ShardedQuantWeight(_Wrapper):
    """This rank's rows of a weight; FSDP2 all-gathers them as codes and scales (module docstring)."""

    def fsdp_pre_all_gather(self, mesh, outer_size, outer_stride, module, mp_policy):
        spec = self._info.spec
        q = quantize(self._data, spec, amax=_amax_over(mesh, self._data))
        codes = pack_fp4(q.codes) if get_format(spec.element).bits == 4 else q.codes
        if spec.block == "tensor":  # one scale, the same on every rank: not gathered
            return (codes,), (q.scales, q.scale_codes, q.global_scale)
        return (codes, q.scale_codes), (None, None, q.global_scale)

    def fsdp_post_all_gather(self, outputs, metadata, param_dtype, *, out=None):
        spec = self._info.spec
        codes = unpack_fp4(outputs[0]) if get_format(spec.element).bits == 4 else outputs[0]
        scales, scale_codes, global_scale = metadata
        if scale_codes is None:
            scale_codes = outputs[1]
            scales = get_format(spec.scale_format).decode(scale_codes).float()
        q = QTensor(codes, scales, scale_codes, global_scale, None, spec, tuple(codes.shape), param_dtype)
        values = dequantize(q, param_dtype)
        if out is not None:  # later all-gathers: into the storage FSDP2 re-allocated
            out._data.copy_(values)
            return None
        return GatheredQuantWeight(values, self._info), (values,)


def gathered_values(weight: torch.Tensor) -> torch.Tensor | None:
    """Q(W) when ``weight`` came from a quantized all-gather, else None."""
    return weight._data if isinstance(weight, GatheredQuantWeight) else None


def eligible(layer: nn.Module, shards: int) -> str | None:
    """None when ``layer``'s weight can be all-gathered quantized over ``shards`` ranks, else why not."""
    reason = layer.weight_quantized_once()
    if reason is not None:
        return reason
    spec = layer.recipe.spec_of("fprop.w")
    if spec.asymmetric:
        return "its weight quantization is asymmetric (zero points are not gathered)"
    rows = 1 if spec.block == "tensor" else spec.block[0]
    if layer.out_features % (shards * rows):
        return f"{layer.out_features} rows do not split into {shards} shards of whole {rows}-row blocks"
    fused = [b for b in layer._backends if b.fused]  # decided at sharding, maybe before the move to the GPU
    if fused and (torch.cuda.is_available() or any(b.active(layer.weight) for b in fused)):
        return "the Triton kernels take the weight as kernel operands (backend auto or triton, CUDA present)"
    return None


def quantize_all_gathers(model: nn.Module, shards: int) -> dict[str, str | None]:
    """Mark every ``QuantLinear`` under ``model`` as sharded and wrap the weight of each that asks for it
    (``quantized_all_gather``) and can (``eligible``) so that FSDP2 all-gathers it quantized; call
    before ``fully_shard``. Returns each asking layer's name -> None (wrapped) or the reason it is
    gathered in full precision."""
    from lowbit.quant.linear import QuantLinear

    report: dict[str, str | None] = {}
    uses: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        uses[id(param)] = uses.get(id(param), 0) + 1
    for name, layer in model.named_modules():
        if not isinstance(layer, QuantLinear):
            continue
        layer.sharded = True  # FSDP2 manages its weight from here on
        if not layer.quantized_all_gather:
            continue
        reason = eligible(layer, shards)
        if reason is None and uses.get(id(layer.weight), 0) > 1:
            reason = "its weight is tied to another module's, which uses it unquantized"
        report[name] = reason
        if reason is None and not isinstance(layer.weight.data, ShardedQuantWeight):
            w = layer.weight
            info = _Info(layer.recipe.spec_of("fprop.w"))
            layer.weight = nn.Parameter(ShardedQuantWeight(w.data, info), w.requires_grad)
            layer._register_state_dict_hook(_plain_state)
    return report


def _plain(t: torch.Tensor) -> torch.Tensor:
    """``t`` without the wrapper (sharing its storage), as a DTensor if it was one."""
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor) and isinstance(t._local_tensor, _Wrapper):
        local = t._local_tensor._data
        return DTensor.from_local(local, t.device_mesh, t.placements, run_check=False, shape=t.shape, stride=t.stride())
    return t._data if isinstance(t, _Wrapper) else t


def _plain_state(module: nn.Module, state: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """State-dict hook: checkpoints hold plain tensors (DCP and ``torch.save`` write them as any weight)."""
    key = prefix + "weight"
    if key in state:
        state[key] = _plain(state[key])
