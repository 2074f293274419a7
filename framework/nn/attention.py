"""Multi-head self-attention through ``F.scaled_dot_product_attention``, with posenc hooks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.nn.posenc import PositionalEncoding

__all__ = ["SelfAttention"]


class SelfAttention(nn.Module):
    """Fused qkv projection → rotary hook → SDPA (causal or with an additive mask) → projection."""

    def __init__(self, dim: int, n_heads: int, bias: bool = False) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.proj = nn.Linear(dim, dim, bias=bias)

    def forward(
        self,
        x: torch.Tensor,
        pos: torch.Tensor,
        posenc: PositionalEncoding,
        attn_mask: torch.Tensor | None,
        causal: bool,
    ) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q = q.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2)  # (B, nh, T, hs)
        q, k = posenc.rotate(q, k, pos)
        if attn_mask is not None:
            # the mask already holds the causal -inf; SDPA wants it in the query's dtype
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask.to(q.dtype))
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble heads side by side
        return self.proj(y)
