"""Bytes each rank sends in FSDP2's collectives, logged per training step (``comm/*``).

Under ``trainer.strategy=fsdp`` every sharded module all-gathers its parameters before its forward
(and again before its backward) and reduce-scatters its gradients after. This callback puts a
counting wrapper around FSDP2's own collectives (``set_custom_all_gather`` /
``set_custom_reduce_scatter``, delegating to its defaults) and logs, at each training step, the
bytes this rank put into them during the step (validation's are not counted): ``comm/all_gather_mb``
and ``comm/reduce_scatter_mb`` (MiB; the inputs' bytes, what goes on the wire from this rank). A
quantized all-gather (``lowbit.quant.gather``) shows here as fewer all-gather bytes. Without FSDP2
it does nothing.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

__all__ = ["CommBytes", "count_fsdp_bytes"]


def _comm_classes() -> tuple[type, type]:
    from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultAllGather, DefaultReduceScatter

    class CountingAllGather(DefaultAllGather):
        def __init__(self, counter: dict[str, int]) -> None:
            self.counter = counter

        def __call__(self, output_tensor, input_tensor, group, async_op=False):
            self.counter["all_gather"] += input_tensor.numel() * input_tensor.element_size()
            return super().__call__(output_tensor, input_tensor, group, async_op)

    class CountingReduceScatter(DefaultReduceScatter):
        def __init__(self, counter: dict[str, int]) -> None:
            self.counter = counter

        def __call__(self, output_tensor, input_tensor, group, op, async_op=False):
            self.counter["reduce_scatter"] += input_tensor.numel() * input_tensor.element_size()
            return super().__call__(output_tensor, input_tensor, group, op, async_op)

    return CountingAllGather, CountingReduceScatter


def count_fsdp_bytes(module: torch.nn.Module) -> dict[str, int] | None:
    """Count the bytes of every FSDP2 all-gather and reduce-scatter under ``module`` into the returned
    dict (``all_gather``, ``reduce_scatter``; add up from zero); None when nothing is sharded."""
    from torch.distributed.fsdp import FSDPModule

    sharded = [m for m in module.modules() if isinstance(m, FSDPModule)]
    if not sharded:
        return None
    counter = {"all_gather": 0, "reduce_scatter": 0}
    all_gather, reduce_scatter = _comm_classes()
    for m in sharded:
        try:
            m.set_custom_all_gather(all_gather(counter))
            m.set_custom_reduce_scatter(reduce_scatter(counter))
        except ValueError:  # FSDP2 takes no custom collectives for a module of several parameter groups
            return None  # a count that misses some collectives would mislead: none at all
    return counter


class CommBytes(L.Callback):
    """Logs ``comm/all_gather_mb`` and ``comm/reduce_scatter_mb`` per training step under FSDP2."""

    def __init__(self) -> None:
        self.counter: dict[str, int] | None = None
        self._seen = {"all_gather": 0, "reduce_scatter": 0}

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.counter = count_fsdp_bytes(pl_module)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self.counter is not None:
            self._seen = dict(self.counter)  # validation's all-gathers are not the step's

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self.counter is None:
            return
        for name, value in self.counter.items():
            value -= self._seen[name]
            pl_module.log(f"comm/{name}_mb", value / 2**20, on_step=True, on_epoch=False)
