"""Learned absolute position embeddings (GPT-2, ViT), resampled to new lengths and grids.

A table of ``max_len`` vectors for text or a (rows, cols) grid of vectors for images, added to the
tokens. Evaluating at another size never fails: a longer text is served by linearly interpolating
the 1-D table to the new length (a shorter one uses the prefix); a different image grid by bicubic
interpolation of the 2-D table, as timm's ``resample_abs_pos_embed`` does for ViTs
(Dosovitskiy et al. 2021, sec. 3.2). ``LearnedPE.resize`` makes such a resampling permanent
(fine-tuning at a new length or resolution).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.errors import LowbitError
from lowbit.nn.posenc import PositionalEncoding

__all__ = ["LearnedPE", "resample_table_1d", "resample_table_2d"]


# ---- functions -----------------------------------------------------------------------------------


def resample_table_1d(table: torch.Tensor, length: int) -> torch.Tensor:
    """Linearly interpolate a (L, C) table to (length, C) (align_corners=False, as timm)."""
    t = table.float().t()[None]  # (1, C, L)
    t = F.interpolate(t, size=length, mode="linear", align_corners=False)  # (1, C, length)
    return t[0].t().to(table.dtype)


def resample_table_2d(table: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Bicubic-interpolate a (rows, cols, C) table to (*grid, C), antialiased as timm's resample_abs_pos_embed."""
    t = table.float().permute(2, 0, 1)[None]  # (1, C, rows, cols)
    t = F.interpolate(t, size=tuple(grid), mode="bicubic", align_corners=False, antialias=True)  # (1, C, *grid)
    return t[0].permute(1, 2, 0).to(table.dtype)


# ---- module --------------------------------------------------------------------------------------


class LearnedPE(PositionalEncoding):
    """Learned absolute embedding added to the tokens: (max_len, dim) for text, (rows, cols, dim) for grids.

    Args (context): dim; max_len (text) or grid (images: a grid makes the table 2-D and the encoding 2-D only).
    Options:
        init_std: std of the truncated-normal initialisation (0.02 as GPT-2 and timm's ViT).
    Text positions are 0..T−1; T > max_len linearly stretches the table over T positions.
    """

    lowbit_plugin_api = 1
    pos_dims = (1, 2)

    def __init__(
        self, dim: int, max_len: int | None = None, grid: tuple[int, int] | None = None, init_std: float = 0.02
    ) -> None:
        super().__init__()
        if grid is not None:
            self.grid = (int(grid[0]), int(grid[1]))
            self.pos_dims = (2,)
            self.table = nn.Parameter(torch.empty(*self.grid, dim))  # (rows, cols, C)
        elif max_len is not None:
            self.grid = None
            self.pos_dims = (1,)
            self.table = nn.Parameter(torch.empty(max_len, dim))  # (L, C)
        else:
            raise LowbitError("learned positional encoding needs max_len (text) or grid (images); got neither")
        self.dim, self.init_std = dim, init_std
        nn.init.trunc_normal_(self.table, std=init_std, a=-2 * init_std, b=2 * init_std)

    @property
    def max_len(self) -> int:
        return self.table.shape[0] * (self.table.shape[1] if self.grid else 1)

    def table_for(self, pos: torch.Tensor) -> torch.Tensor:
        """The embeddings at these positions, (T, C): resampled when the length or grid differs from the table's."""
        if self.grid is None:
            length = pos.shape[0]  # text positions are 0..T-1
            table = self.table if length <= self.table.shape[0] else resample_table_1d(self.table, length)
            return table[pos]
        rows, cols = (int(n) + 1 for n in pos.amax(dim=0).tolist())  # the grid these positions live on (one sync)
        table = self.table if (rows, cols) == self.grid else resample_table_2d(self.table, (rows, cols))
        return table[pos[:, 0], pos[:, 1]]

    def embed(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """x (B, T, C) + table at pos (T,) or (T, 2)."""
        self.check_positions(pos)
        if x.shape[-1] != self.dim:
            raise LowbitError(f"learned positional encoding has width {self.dim}, got tokens of width {x.shape[-1]}")
        return x + self.table_for(pos).to(x.dtype)  # (B, T, C)

    @torch.no_grad()
    def resize(self, max_len: int | None = None, grid: tuple[int, int] | None = None) -> None:
        """Resample the table in place to a new length (text) or grid (images), for fine-tuning there."""
        if self.grid is None:
            if max_len is None:
                raise LowbitError("LearnedPE.resize on a text table needs max_len")
            self.table = nn.Parameter(resample_table_1d(self.table, max_len))
        else:
            if grid is None:
                raise LowbitError("LearnedPE.resize on an image table needs grid=(rows, cols)")
            self.grid = (int(grid[0]), int(grid[1]))
            self.table = nn.Parameter(resample_table_2d(self.table, self.grid))

    def extra_repr(self) -> str:
        return f"grid={self.grid}" if self.grid else f"max_len={self.table.shape[0]}, dim={self.dim}"
