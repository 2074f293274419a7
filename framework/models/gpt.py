"""GPT: a decoder-only causal language model on the shared pre-norm trunk.

Token embedding → posenc.embed → Transformer(causal) → lm_head. Byte-level by default
(vocab 256). The positional encoding is a plugin built by name from the registry.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from lowbit.models.base import ModelPlugin, build_text_posenc, check_heads, check_sizes, init_gpt2_weights
from lowbit.nn.attention import attach_posenc
from lowbit.nn.posenc import positions_1d
from lowbit.nn.transformer import Transformer

__all__ = ["CausalLM", "GPT"]


class CausalLM(ModelPlugin):
    """The ends every causal LM shares around its trunk: token embedding + 1-D posenc in, ``lm_head`` out.

    A subclass builds ``_build_embedding``, then its trunk (and ``attach_posenc`` on it), then ``_build_head``
    (the order parameters are created in, which fixes the random init).
    """

    def _build_embedding(
        self, vocab_size: int, dim: int, n_heads: int, max_len: int, posenc: str | Mapping[str, Any]
    ) -> None:
        check_heads(dim, n_heads)
        check_sizes(vocab_size=vocab_size, max_len=max_len)
        self.max_len = max_len
        self.posenc = build_text_posenc(posenc, dim=dim, n_heads=n_heads, max_len=max_len, model=self.display_name)
        self.tok_emb = nn.Embedding(vocab_size, dim)

    def _build_head(self, vocab_size: int, dim: int, tie_weights: bool) -> None:
        self.lm_head = nn.Linear(dim, vocab_size, bias=False)
        if tie_weights:
            self.lm_head.weight = self.tok_emb.weight

    def _embed(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """idx (B, T) token ids → (tokens (B, T, D) with the absolute posenc added, positions (T,))."""
        pos = positions_1d(idx.shape[1], idx.device)  # (T,)
        return self.posenc.embed(self.tok_emb(idx), pos), pos


class GPT(CausalLM):
    """Causal LM. Parameter names (``tok_emb``, ``trunk.blocks.{i}.attn.qkv``, ``lm_head``) are stable.

    Args:
        vocab_size: number of token ids (256 for bytes).
        dim, n_layers, n_heads: width, depth, heads (dim must divide by n_heads).
        mlp_ratio: SwiGLU hidden width over dim (rounded up to a multiple of 32).
        max_len: training context length, handed to the positional encoding.
        posenc: a posenc plugin name or ``{name: ..., **options}``.
        tie_weights: share the embedding matrix with the output head.
    """

    display_name = "GPT"

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
        check_sizes(n_layers=n_layers)
        self._build_embedding(vocab_size, dim, n_heads, max_len, posenc)
        self.trunk = Transformer(dim, n_layers, n_heads, mlp_ratio, bias)
        attach_posenc(self.trunk, self.posenc)  # a data-dependent encoding's per-layer modules (path)
        self._build_head(vocab_size, dim, tie_weights)
        init_gpt2_weights(self, init_std, n_layers)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """idx (B, T) token ids → logits (B, T, vocab)."""
        x, pos = self._embed(idx)  # (B, T, C), (T,)
        x = self.trunk(x, pos, self.posenc, causal=True)
        return self.lm_head(x)
