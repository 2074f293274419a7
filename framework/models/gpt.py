"""GPT: a decoder-only causal language model on the shared pre-norm trunk.

Token embedding → posenc.embed → Transformer(causal) → lm_head. Byte-level by default
(vocab 256). The positional encoding is a plugin built by name from the registry.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.nn.posenc import positions_1d
from lowbit.nn.transformer import Transformer
from lowbit.registry import registry

__all__ = ["GPT"]


class GPT(nn.Module):
    """Causal LM. Parameter names (``tok_emb``, ``trunk.blocks.{i}.attn.qkv``, ``lm_head``) are stable.

    Args:
        vocab_size: number of token ids (256 for bytes).
        dim, n_layers, n_heads: width, depth, heads (dim must divide by n_heads).
        mlp_ratio: SwiGLU hidden width over dim (rounded up to a multiple of 32).
        max_len: training context length, handed to the positional encoding.
        posenc: a posenc plugin name or ``{name: ..., **options}``.
        tie_weights: share the embedding matrix with the output head.
    """

    lowbit_plugin_api = 1

    def __init__(
        self,
        *,
        vocab_size: int = 256,
        dim: int = 256,
        n_layers: int = 4,
        n_heads: int = 4,
        mlp_ratio: float = 8 / 3,
        max_len: int = 256,
        posenc: str | Mapping[str, Any] = "rope",
        tie_weights: bool = True,
        bias: bool = False,
        init_std: float = 0.02,
    ) -> None:
        super().__init__()
        if dim % n_heads:
            raise LowbitError(f"model.dim {dim} is not divisible by model.n_heads {n_heads}; pick dim = k·n_heads")
        self.max_len = max_len
        self.posenc = registry.build(
            "posenc", posenc, dim=dim, n_heads=n_heads, head_dim=dim // n_heads, max_len=max_len, grid=None
        )
        if 1 not in self.posenc.pos_dims:
            raise LowbitError(
                f"positional encoding {type(self.posenc).__name__} is 2-D only; a GPT needs a 1-D encoding"
            )
        self.tok_emb = nn.Embedding(vocab_size, dim)
        self.trunk = Transformer(dim, n_layers, n_heads, mlp_ratio, bias)
        self.lm_head = nn.Linear(dim, vocab_size, bias=False)
        if tie_weights:
            self.lm_head.weight = self.tok_emb.weight
        self._init_weights(init_std, n_layers)

    def _init_weights(self, std: float, n_layers: int) -> None:
        # GPT-2 init: N(0, std) everywhere, residual output projections scaled by 1/sqrt(2·depth)
        for name, p in self.named_parameters():
            if name.startswith("posenc."):
                continue  # encodings initialise their own parameters
            if p.dim() >= 2:
                scale = 1 / math.sqrt(2 * n_layers) if name.endswith(("attn.proj.weight", "mlp.fc_out.weight")) else 1.0
                nn.init.normal_(p, mean=0.0, std=std * scale)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """idx (B, T) token ids → logits (B, T, vocab)."""
        pos = positions_1d(idx.shape[1], idx.device)  # (T,)
        x = self.posenc.embed(self.tok_emb(idx), pos)  # (B, T, C)
        x = self.trunk(x, pos, self.posenc, causal=True)
        return self.lm_head(x)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
