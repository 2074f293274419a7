"""ALiBi: attention with linear biases (Press et al. 2022, "Train Short, Test Long").

Head h adds −m_h·|i − j| to the logit of query i and key j. For n a power of two the slopes are
the geometric sequence starting at 2^(−8/n) with ratio 2^(−8/n) (sec. 3); for other n, the
official code takes the n' = 2^⌊log2 n⌋ slopes and then every other slope of 2n' until n are
taken. For image grids the distance is Euclidean between (row, col) positions.
"""

from __future__ import annotations

import math

import torch

from lowbit.errors import LowbitError
from lowbit.nn.posenc import PositionalEncoding
from lowbit.plugins.posenc._tables import PositionCache, check_causal_positions, pair_distances

__all__ = ["ALiBi", "alibi_slopes"]


# ---- functions -----------------------------------------------------------------------------------


def _power_of_two_slopes(n: int) -> list[float]:
    start = 2.0 ** (-8.0 / n)
    return [start ** (i + 1) for i in range(n)]


def alibi_slopes(n_heads: int) -> list[float]:
    """Per-head slopes m_h (Press et al. 2022, sec. 3 and the official ``get_slopes``)."""
    if n_heads < 1:
        raise LowbitError(f"alibi needs at least one head, got n_heads={n_heads}")
    if math.log2(n_heads).is_integer():
        return _power_of_two_slopes(n_heads)
    closest = 2 ** math.floor(math.log2(n_heads))
    return _power_of_two_slopes(closest) + alibi_slopes(2 * closest)[0::2][: n_heads - closest]


# ---- module --------------------------------------------------------------------------------------


class ALiBi(PositionalEncoding):
    """Fixed per-head linear distance bias, (nh, Tq, Tk); Euclidean distance on image grids.

    Args (context): n_heads.
    Options:
        causal: text only; the bias is −m·(i − j) for keys j ≤ i and 0 on future keys (the trunk's
            causal mask hides those). False: the symmetric −m·|i − j| (encoders, images).
    """

    lowbit_plugin_api = 1
    pos_dims = (1, 2)

    def __init__(self, n_heads: int, causal: bool = True) -> None:
        super().__init__()
        self.n_heads, self.causal = n_heads, causal
        self.slopes = torch.tensor(
            alibi_slopes(n_heads), dtype=torch.float32
        )  # (nh,), not a buffer: never cast to bf16
        self._cache = PositionCache()

    def _bias(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        distance = pair_distances(q_pos, k_pos)  # (Tq, Tk)
        if self.causal:
            distance = distance.masked_fill(k_pos[None, :] > q_pos[:, None], 0.0)  # future keys: masked by the trunk
        slopes = self.slopes.to(device=q_pos.device, dtype=torch.float32)
        return -slopes[:, None, None] * distance  # (nh, Tq, Tk)

    def bias(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """−m_h·distance(q_pos, k_pos), float32 (nh, Tq, Tk); built once per positions and reused."""
        self.check_positions(q_pos)
        self.check_positions(k_pos)
        check_causal_positions("alibi", self.causal, q_pos)
        return self._cache.get((q_pos, k_pos), None, lambda: self._bias(q_pos, k_pos))

    def extra_repr(self) -> str:
        return f"n_heads={self.n_heads}, causal={self.causal}"
