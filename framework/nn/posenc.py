"""The positional-encoding protocol the trunk calls: three optional contributions, and two hooks
for data-dependent encodings.

A positional encoding is an ``nn.Module`` with any of
  ``embed(x, pos)``       absolute: returns x with the encoding added, x (B, T, C);
  ``rotate(q, k, pos)``   rotary: returns rotated (q, k), each (B, nh, T, hs);
  ``bias(q_pos, k_pos)``  additive attention bias (nh, Tq, Tk), or None.
``pos`` is a LongTensor of shape (T,) for text and (T, 2) of (row, col) for image grids.
The trunk calls ``bias`` once per forward (outside any fixed-point loop) and ``rotate`` in
every attention layer; encodings cache their tables per (length, device, dtype).

An encoding computed from the tokens themselves, with parameters per layer (PaTH), also has
  ``attach(attn)``        called by the model once per attention layer after the trunk is built
                          (``lowbit.nn.attention.attach_posenc``): adds its modules to that layer,
                          so they are the block's parameters (sharded, checkpointed, quantized with it);
  ``attend(attn, q, k, v, x, attn_mask, causal)``  the attention output (B, nh, T, hs) in place of
                          the layer's SDPA, or None (the default) to let SDPA run; x (B, T, C) is the
                          layer's input, attn_mask the trunk's folded bias (or None).

Plugins are built by the registry with the context keys their constructor names:
``dim`` (model width), ``n_heads``, ``head_dim``, ``max_len`` (training length or number of
patches), ``grid`` ((rows, cols) for images, else None).
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.errors import LowbitError

__all__ = ["PositionalEncoding", "positions_1d", "positions_2d"]


class PositionalEncoding(nn.Module):
    """Base class: every contribution defaults to nothing (NoPE)."""

    pos_dims: tuple[int, ...] = (1, 2)  # position dimensionalities this encoding supports

    def check_positions(self, pos: torch.Tensor) -> None:
        """Raise a clear error if this encoding cannot take positions of this shape."""
        ndim = 1 if pos.dim() == 1 else pos.shape[-1]
        if ndim not in self.pos_dims:
            kinds = " or ".join(f"{d}-D" for d in self.pos_dims)
            raise LowbitError(f"positional encoding {type(self).__name__} takes {kinds} positions, got {ndim}-D")

    def embed(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return x

    def rotate(self, q: torch.Tensor, k: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return q, k

    def bias(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor | None:
        return None

    def attach(self, attn: nn.Module) -> None:
        """Add this encoding's per-layer modules to one attention layer; nothing by default."""

    def attend(
        self,
        attn: nn.Module,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None,
        causal: bool,
    ) -> torch.Tensor | None:
        """The attention output (B, nh, T, hs) computed by the encoding, or None: the layer's SDPA runs."""
        return None


def positions_1d(length: int, device: torch.device | None = None) -> torch.Tensor:
    """Text positions 0..T-1, shape (T,)."""
    return torch.arange(length, device=device)


def positions_2d(rows: int, cols: int, device: torch.device | None = None) -> torch.Tensor:
    """Image grid positions in row-major patch order, shape (rows*cols, 2) of (row, col)."""
    r = torch.arange(rows, device=device)
    c = torch.arange(cols, device=device)
    return torch.stack(torch.meshgrid(r, c, indexing="ij"), dim=-1).reshape(-1, 2)
