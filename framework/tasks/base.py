"""What lowbit's tasks share: the FSDP2 hook Lightning's ``ModelParallelStrategy`` calls.

A third-party task that subclasses ``Task`` runs under ``trainer.strategy=fsdp`` too: the blocks
of its ``model`` are sharded by ``lowbit.distributed.shard_model`` after the precision plugin
converted the layers (``build`` converts before the Trainer exists). A child module that keeps a
tensor per parameter (the diffusion task's EMA) defines ``shard_like(model)`` and is sharded the same way.
"""

from __future__ import annotations

import lightning as L

from lowbit.distributed import shard_model

__all__ = ["Task"]


class Task(L.LightningModule):
    """A LightningModule whose network is ``self.model``."""

    def configure_model(self) -> None:
        mesh = getattr(self, "_device_mesh", None)  # set by ModelParallelStrategy only
        if mesh is None:
            return
        shard_model(self.model, mesh["data_parallel"] if "data_parallel" in (mesh.mesh_dim_names or ()) else mesh)
        for module in self.children():  # state kept per parameter (a DiT's EMA) takes the parameters' shards
            if module is not self.model and hasattr(module, "shard_like"):
                module.shard_like(self.model)
