"""Multi-head self-attention through ``F.scaled_dot_product_attention``, with posenc hooks (and
``attach_posenc``, which gives a data-dependent encoding its modules in every attention layer)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.nn.posenc import PositionalEncoding

__all__ = ["SelfAttention", "attach_posenc"]


class SelfAttention(nn.Module):
    """Fused qkv projection → rotary hook → SDPA (causal or with an additive mask), unless the encoding's
    ``attend`` computes the attention itself → projection."""

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
        attend = getattr(posenc, "attend", None)  # optional: the ViT's prefix-token view has none
        y = attend(self, q, k, v, x, attn_mask, causal) if attend is not None else None  # (B, nh, T, hs)
        if y is None and attn_mask is not None:
            # the mask already holds the causal -inf; SDPA wants it in the query's dtype
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask.to(q.dtype))
        elif y is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble heads side by side
        return self.proj(y)


def attach_posenc(module: nn.Module, posenc: PositionalEncoding) -> None:
    """Let ``posenc`` add its per-layer modules to every ``SelfAttention`` in ``module`` (a no-op for
    encodings without ``attach``); models call it right after building their trunk, before the init."""
    attach = getattr(posenc, "attach", None)
    if attach is None:
        return
    for layer in [m for m in module.modules() if isinstance(m, SelfAttention)]:
        attach(layer)
