"""The pre-norm transformer trunk shared by the GPT, the ViT and the DiT.

Each block: x + attn(norm(x)), then x + mlp(norm(x)). The positional encoding's additive
bias (with the causal mask folded in) is built once per forward and handed to every block.
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.nn.attention import SelfAttention
from lowbit.nn.mlp import SwiGLU, swiglu_hidden
from lowbit.nn.norm import RMSNorm
from lowbit.nn.posenc import PositionalEncoding

__all__ = ["Block", "Transformer", "attention_mask"]


def attention_mask(bias: torch.Tensor | None, causal: bool, tq: int, tk: int) -> torch.Tensor | None:
    """Fold a posenc bias (nh, Tq, Tk) and the causal constraint into one additive mask.

    Returns None when there is neither (SDPA then takes its fast ``is_causal`` path).
    """
    if bias is None:
        return None
    if not causal:
        return bias
    # query i sits at absolute position tk - tq + i (tq == tk for a plain forward)
    future = torch.ones(tq, tk, dtype=torch.bool, device=bias.device).triu(tk - tq + 1)
    return bias.masked_fill(future, float("-inf"))


class Block(nn.Module):
    """Pre-norm transformer block: RMSNorm → attention, RMSNorm → SwiGLU."""

    def __init__(self, dim: int, n_heads: int, mlp_ratio: float = 8 / 3, bias: bool = False) -> None:
        super().__init__()
        self.norm1 = RMSNorm(dim)
        self.attn = SelfAttention(dim, n_heads, bias=bias)
        self.norm2 = RMSNorm(dim)
        self.mlp = SwiGLU(dim, swiglu_hidden(dim, mlp_ratio), bias=bias)

    def forward(self, x, pos, posenc, attn_mask, causal):
        x = x + self.attn(self.norm1(x), pos, posenc, attn_mask, causal)
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    """A stack of blocks and a final norm; ``blocks.{i}`` names are what converters glob on."""

    def __init__(self, dim: int, n_layers: int, n_heads: int, mlp_ratio: float = 8 / 3, bias: bool = False) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim, n_heads, mlp_ratio, bias) for _ in range(n_layers))
        self.norm = RMSNorm(dim)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, posenc: PositionalEncoding, causal: bool) -> torch.Tensor:
        T = x.shape[1]
        attn_mask = attention_mask(posenc.bias(pos, pos), causal, T, T)  # once per forward
        for block in self.blocks:
            x = block(x, pos, posenc, attn_mask, causal)
        return self.norm(x)
