"""What lowbit needs of ``torch.distributed``: the world it runs in, amax reductions, FSDP2 sharding.

lowbit scales on Lightning's strategies (DDP, and FSDP2 through ``ModelParallelStrategy``); this
module holds the few pieces those strategies leave to the model:

- ``world()``: (rank, size) of the default process group, (0, 1) outside one;
- ``all_reduce_max``: a tensor-level amax made global, so every rank quantizes with the scale the
  whole (global-batch) tensor defines: FP8 delayed-scaling amax histories (always, as Transformer
  Engine reduces them over its group) and, with ``amax_reduction=global``, the current-scaling
  tensor scales of activations and gradients (FP8 tensor scales, NVFP4's FP32 second-level scale);
- ``shard_model``: FSDP2's ``fully_shard`` on every transformer block, then on the model (the
  root), called from a task's ``configure_model`` after the precision plugin converted the layers.
  Weights are quantized inside each block's forward, after FSDP2's all-gather: one global tensor,
  the same scales on every rank; or, where both GEMMs read the weight quantized one way (FP8 per
  tensor, NVFP4 16x16), quantized before it, with the global amax, and gathered as codes and scales
  (``lowbit.quant.gather``: the same numbers, fewer bytes);
- ``set_parameter``: a parameter set inside a forward (a QAT quantizer's scales, initialised from the
  first batch) kept under FSDP2, whose forward sees an all-gathered copy that is freed afterwards.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["BLOCK_LISTS", "all_reduce_max", "all_reduce_mean", "set_parameter", "shard_model", "world"]

BLOCK_LISTS = ("blocks", "pre_blocks", "post_blocks", "layers", "h")
"""Names of the module lists whose items FSDP2 shards one by one (lowbit's trunks, timm's ``blocks``,
Hugging Face-style ``layers``/``h``); everything else is sharded with the model itself."""


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) when none is initialized."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduce(t: torch.Tensor, op: str) -> torch.Tensor:
    import torch.distributed as dist

    if world()[1] == 1:
        return t
    out = t.detach().float().clone()
    if op == "mean":
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        out /= dist.get_world_size()
    else:
        dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return out.to(t.dtype)


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    """The elementwise max of ``t`` over every rank (``t`` itself in one process); a new tensor."""
    return _all_reduce(t, "max")


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """The elementwise mean of ``t`` over every rank (``t`` itself in one process); a new tensor."""
    return _all_reduce(t, "mean")


def _block_modules(model: nn.Module) -> list[nn.Module]:
    blocks = []
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in BLOCK_LISTS and isinstance(module, (nn.ModuleList, nn.Sequential)):
            blocks.extend(m for m in module if any(p.requires_grad for p in m.parameters()))
    return blocks


def shard_model(model: nn.Module, mesh: Any) -> int:
    """FSDP2 ``fully_shard`` over ``mesh`` on each transformer block, then on ``model``; the number of
    blocks sharded. A model already sharded is left as it is (``configure_model`` runs again when
    ``validate`` follows ``fit``)."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if isinstance(model, FSDPModule):
        return 0
    from lowbit.quant.gather import quantize_all_gathers

    quantize_all_gathers(model, mesh.size())
    blocks = _block_modules(model)
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    for module in model.modules():
        if getattr(module, "sets_parameters_in_forward", False):
            module._sharded_parameters = dict(module.named_parameters(recurse=False))  # the DTensors FSDP2 keeps
    return len(blocks)


@torch.no_grad()
def set_parameter(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """``module.<name>.copy_(value)``, also inside an FSDP2 forward: there the attribute is the
    all-gathered copy, freed after the forward, so this rank's shard of ``value`` is written into the
    sharded parameter as well (``value`` is the same on every rank). A module that calls this in its
    forward sets ``sets_parameters_in_forward = True`` so that ``shard_model`` keeps its shards' handles."""
    param = getattr(module, name)
    sharded = getattr(module, "_sharded_parameters", {}).get(name)
    if sharded is None or sharded is param:  # no FSDP2, or outside a forward: the parameter itself
        param.copy_(value.reshape(param.shape))
        return
    from torch.distributed.tensor import distribute_tensor

    param.copy_(value.reshape(param.shape))
    full = value.reshape(sharded.shape).to(device=sharded.to_local().device, dtype=sharded.dtype)
    local = distribute_tensor(full, sharded.device_mesh, sharded.placements, src_data_rank=None).to_local()
    sharded.to_local().copy_(local)
