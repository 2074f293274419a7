"""Which samples each process reads: one global batch per step, split into contiguous per-rank slices.

With ``W`` processes of ``b`` samples each, step ``s`` trains on global samples ``s·W·b ...
(s+1)·W·b - 1``, rank ``r`` on the slice ``r·b ... r·b + b - 1`` of it: exactly the batch one
process of ``W·b`` samples reads, in the same order, so a DDP or FSDP run with ``data.batch_size=b``
on ``W`` processes takes the same steps as one process with ``data.batch_size=W·b``. The slices
are contiguous (not interleaved) so that blocks along the token dimension (NVFP4's wgrad blocks,
the RHT) hold the same samples either way. Validation sets are split into equal contiguous
shards when their size divides by ``W`` (torchmetrics then reduces the exact mean); otherwise
every rank evaluates the whole set (the same mean, ``W``× the work, and no rank ever runs a batch
the others do not, which would stall FSDP's collectives).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from torch.utils.data import Sampler

__all__ = ["GlobalBatchStream", "rank_and_world", "samples_consumed", "val_indices"]


def rank_and_world(trainer: Any) -> tuple[int, int]:
    """(global rank, world size) of ``trainer``; (0, 1) without one."""
    return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)


def samples_consumed(trainer: Any, batch_size: int) -> int:
    """Samples this rank has read so far: where a resumed stream starts."""
    if trainer is None:
        return 0
    return trainer.global_step * trainer.accumulate_grad_batches * batch_size


class GlobalBatchStream(Sampler[int]):
    """Endless global sample indices for ``rank`` of ``world``, ``batch`` per rank per step, from
    this rank's ``start``-th sample: the rank's contiguous slice of every global batch."""

    def __init__(self, start: int, batch: int, rank: int = 0, world: int = 1) -> None:
        self.start, self.batch, self.rank, self.world = start, batch, rank, world

    def __iter__(self) -> Iterator[int]:
        i = self.start
        while True:
            step, j = divmod(i, self.batch)
            yield (step * self.world + self.rank) * self.batch + j
            i += 1


def val_indices(size: int, rank: int, world: int) -> list[int]:
    """This rank's validation samples: an equal contiguous shard, or all of them (module doc)."""
    if world <= 1 or size % world:
        return list(range(size))
    shard = size // world
    return list(range(rank * shard, (rank + 1) * shard))
