"""Log-distance attention bias: head h adds -m_h * log(1 + (i - j)) to the logit of query i, key j.

KERPLE's logarithmic kernel -r1 * log(1 + r2 * |i - j|) (Chi et al. 2022, "KERPLE: Kernelized
Relative Positional Embedding for Length Extrapolation", eq. 9) with r2 = 1 and r1 fixed to
ALiBi's head slopes m_h = 2^(-8 (h + 1) / n_heads) (Press et al. 2022, sec. 3): nothing is
learned, so any length works. Causal: future keys get 0 (the trunk's causal mask hides them).
"""

from __future__ import annotations

import torch
from lowbit.errors import LowbitError
from lowbit.nn.posenc import PositionalEncoding

__all__ = ["LogDistanceBias", "head_slopes"]


def head_slopes(n_heads: int) -> torch.Tensor:
    """m_h = 2^(-8 (h + 1) / n_heads) for h = 0 .. n_heads - 1, float32 (n_heads,)."""
    exponents = -8.0 * torch.arange(1, n_heads + 1, dtype=torch.float64) / n_heads
    return torch.exp2(exponents).float()


class LogDistanceBias(PositionalEncoding):
    """Fixed per-head bias -strength * m_h * log(1 + distance) on past keys, (nh, Tq, Tk); text only.

    Args (context): n_heads.
    Options:
        strength: multiplies every slope (1.0: the slopes above).
    """

    lowbit_plugin_api = 1  # the plugin API this targets
    pos_dims = (1,)  # 1-D text positions only

    def __init__(self, *, n_heads: int, strength: float = 1.0) -> None:
        super().__init__()
        if strength < 0:
            raise LowbitError(f"tpl_logbias strength must be >= 0 (a penalty on distance), got {strength}")
        self.n_heads, self.strength = n_heads, strength
        self.slopes = head_slopes(n_heads)  # (nh,), a plain tensor, not a buffer: never cast to bf16

    def bias(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """Additive bias (nh, Tq, Tk) float32, for 1-D positions q_pos (Tq,) and k_pos (Tk,)."""
        self.check_positions(q_pos)
        self.check_positions(k_pos)
        distance = (q_pos[:, None] - k_pos[None, :]).clamp(min=0).float()  # (Tq, Tk); future keys: 0
        slopes = self.strength * self.slopes.to(q_pos.device)  # (nh,)
        return -slopes[:, None, None] * torch.log1p(distance)  # (nh, Tq, Tk)

    def extra_repr(self) -> str:
        return f"n_heads={self.n_heads}, strength={self.strength}"
