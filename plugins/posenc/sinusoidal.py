"""Fixed sinusoidal position encodings: 1-D (Vaswani et al. 2017) and 2-D (MAE, DiT).

1-D, "Attention Is All You Need" sec. 3.5: PE(n, 2i) = sin(n·ω_i), PE(n, 2i+1) = cos(n·ω_i),
ω_i = base^(−2i/d). 2-D as MAE/DiT ``get_2d_sincos_pos_embed``: the first d/2 channels are the 1-D
encoding of the row, the last d/2 of the column. Within each half we keep the paper's interleaved
sin/cos order; MAE concatenates [sin..., cos...] and timm's ``build_sincos2d_pos_embed`` orders
[sin_row, sin_col, cos_row, cos_col]: the same values up to a channel permutation.
Nothing is learned; any length or grid works.
"""

from __future__ import annotations

import torch

from lowbit.errors import LowbitError
from lowbit.nn.posenc import PositionalEncoding
from lowbit.plugins.posenc._tables import PositionCache

__all__ = ["SinusoidalPE", "sinusoid_table", "sinusoid_table_2d"]


# ---- functions -----------------------------------------------------------------------------------


def sinusoid_table(pos: torch.Tensor, dim: int, base: float = 10000.0) -> torch.Tensor:
    """(T,) positions → (T, dim) float32 with sin at even and cos at odd channels (Vaswani et al. 2017, eq. in 3.5)."""
    omega = base ** (-torch.arange(0, dim, 2, dtype=torch.float64, device=pos.device) / dim)  # (dim/2,)
    angles = pos.double()[:, None] * omega  # (T, dim/2), float64 so large positions stay exact
    return torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(-2).float()  # (T, dim)


def sinusoid_table_2d(pos: torch.Tensor, dim: int, base: float = 10000.0) -> torch.Tensor:
    """(T, 2) (row, col) positions → (T, dim): [1-D table of the row | of the column], dim/2 each (MAE)."""
    return torch.cat([sinusoid_table(pos[:, 0], dim // 2, base), sinusoid_table(pos[:, 1], dim // 2, base)], dim=-1)


# ---- module --------------------------------------------------------------------------------------


class SinusoidalPE(PositionalEncoding):
    """Fixed sin/cos encoding added to the tokens; 1-D for text, row/column halves for image grids.

    Args (context): dim.
    Options:
        base: the wavelength base (10000 in the paper).
        rms: the added table is scaled to this root-mean-square per channel (the paper's table has
            1/√2). The default 0.02 matches the token embeddings' init (GPT-2, timm): unscaled, the
            positions would outweigh tokens 35 to 1 at init. ``rms: 0.7071`` is the paper's table,
            meant for embeddings multiplied by √d as in Vaswani et al. 3.4.
    """

    lowbit_plugin_api = 1
    pos_dims = (1, 2)

    def __init__(self, dim: int, base: float = 10000.0, rms: float = 0.02) -> None:
        super().__init__()
        if dim % 2:
            raise LowbitError(f"sinusoidal positional encoding needs an even width, got dim={dim}")
        if base <= 0:
            raise LowbitError(f"sinusoidal base must be positive, got {base}")
        if rms <= 0:
            raise LowbitError(f"sinusoidal rms must be positive (0.02 matches the token init), got {rms}")
        self.dim, self.base, self.rms = dim, base, rms
        self._cache = PositionCache()

    def table(self, pos: torch.Tensor) -> torch.Tensor:
        """The encoding at these positions, (T, dim) float32."""
        self.check_positions(pos)
        if pos.dim() == 1:
            return sinusoid_table(pos, self.dim, self.base)
        if self.dim % 4:
            raise LowbitError(
                f"2-D sinusoidal encoding splits the width into row and column sin/cos pairs; dim={self.dim} must divide by 4"
            )
        return sinusoid_table_2d(pos, self.dim, self.base)

    def embed(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """x (B, T, C) + table (T, C) scaled to ``rms``."""
        if x.shape[-1] != self.dim:
            raise LowbitError(f"sinusoidal encoding has width {self.dim}, got tokens of width {x.shape[-1]}")
        # every sin/cos pair has sin² + cos² = 1, so the table's RMS is exactly 1/√2
        gain = self.rms * 2**0.5
        table = self._cache.get((pos,), x.dtype, lambda: (gain * self.table(pos)).to(x.dtype))
        return x + table

    def extra_repr(self) -> str:
        return f"dim={self.dim}, base={self.base}, rms={self.rms}"
