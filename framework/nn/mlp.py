"""SwiGLU feed-forward (Shazeer 2020, "GLU Variants Improve Transformer"): W_out(silu(x W_g) ⊙ x W_u)."""

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SwiGLU", "swiglu_hidden"]


def swiglu_hidden(dim: int, ratio: float = 8 / 3, multiple_of: int = 32) -> int:
    """Hidden width: ``ratio·dim`` rounded up to a multiple of 32, so FP4/MX blocks (16, 32) fit."""
    hidden = int(dim * ratio)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


class SwiGLU(nn.Module):
    """Gate and up projections fused in one Linear (``fc_in``), then ``fc_out``."""

    def __init__(self, dim: int, hidden: int, bias: bool = False) -> None:
        super().__init__()
        self.fc_in = nn.Linear(dim, 2 * hidden, bias=bias)
        self.fc_out = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.fc_in(x).chunk(2, dim=-1)  # each (B, T, hidden)
        return self.fc_out(F.silu(gate) * up)
