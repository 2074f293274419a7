"""T5 relative position bias (Raffel et al. 2020, sec. 2.1): a learned scalar per (bucket, head).

The offset key − query is bucketed as the T5 reference (``_relative_position_bucket`` in
Mesh TensorFlow / HF transformers): bidirectional uses half the buckets per direction, causal only
looks back; within a direction, offsets below half the buckets get one bucket each and larger
ones share log-spaced buckets up to ``max_distance``, beyond which all fall in the last bucket.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.nn.posenc import PositionalEncoding
from lowbit.plugins.posenc._tables import PositionCache, relative_positions

__all__ = ["T5Bias", "t5_bucket"]


# ---- functions -----------------------------------------------------------------------------------


def t5_bucket(
    relative_position: torch.Tensor, causal: bool = False, num_buckets: int = 32, max_distance: int = 128
) -> torch.Tensor:
    """Bucket ids in [0, num_buckets) of key − query offsets (long tensor of any shape)."""
    buckets = torch.zeros_like(relative_position)
    if causal:
        n = -torch.clamp(relative_position, max=0)  # distance back; future keys share bucket 0
    else:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).long() * num_buckets  # keys ahead use the upper half
        n = relative_position.abs()
    max_exact = num_buckets // 2
    is_small = n < max_exact
    # log-spaced buckets from max_exact to max_distance; clamp n ≥ 1 only to keep log finite where unused
    large = (
        max_exact
        + (
            torch.log(n.clamp(min=1).float() / max_exact)
            / math.log(max_distance / max_exact)
            * (num_buckets - max_exact)
        ).long()
    )
    large = torch.clamp(large, max=num_buckets - 1)
    return buckets + torch.where(is_small, n, large)


# ---- module --------------------------------------------------------------------------------------


class T5Bias(PositionalEncoding):
    """Learned bucketed relative bias, table (num_buckets, nh) → bias (nh, Tq, Tk); 1-D positions only.

    Args (context): n_heads.
    Options:
        num_buckets: number of offset buckets (32 in T5).
        max_distance: offsets at or beyond this share the last bucket (128 in T5).
        causal: look back only (decoders); False: bidirectional (encoders).
        init_std: std of the normal initialisation of the table.
    """

    lowbit_plugin_api = 1
    pos_dims = (1,)

    def __init__(
        self, n_heads: int, num_buckets: int = 32, max_distance: int = 128, causal: bool = True, init_std: float = 0.02
    ) -> None:
        super().__init__()
        per_direction = num_buckets if causal else num_buckets // 2
        if per_direction < 2:
            raise LowbitError(
                f"t5 bias needs num_buckets ≥ {2 if causal else 4} ({'causal' if causal else 'bidirectional'}), got {num_buckets}"
            )
        if max_distance <= per_direction // 2:
            raise LowbitError(f"t5 max_distance must exceed the {per_direction // 2} exact buckets, got {max_distance}")
        self.n_heads, self.num_buckets, self.max_distance, self.causal = n_heads, num_buckets, max_distance, causal
        self.table = nn.Parameter(torch.empty(num_buckets, n_heads))  # (buckets, nh)
        nn.init.normal_(self.table, std=init_std)
        self._cache = PositionCache()

    def buckets(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """Bucket ids (Tq, Tk) of key − query offsets."""
        return t5_bucket(relative_positions(q_pos, k_pos), self.causal, self.num_buckets, self.max_distance)

    def bias(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """table[bucket(k − q)] → (nh, Tq, Tk); buckets cached per positions, the lookup redone per call."""
        self.check_positions(q_pos)
        self.check_positions(k_pos)
        buckets = self._cache.get((q_pos, k_pos), None, lambda: self.buckets(q_pos, k_pos))
        return self.table[buckets].permute(2, 0, 1)  # (Tq, Tk, nh) → (nh, Tq, Tk)

    def extra_repr(self) -> str:
        return f"n_heads={self.n_heads}, num_buckets={self.num_buckets}, max_distance={self.max_distance}, causal={self.causal}"
