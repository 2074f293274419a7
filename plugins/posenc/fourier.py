"""Fourier-feature position encodings for 1-D and 2-D positions, learnable or random.

Learnable (Li et al. 2021, "Learnable Fourier Features for Multi-Dimensional Spatial Positional
Encoding", Algorithm 1): positions x (T, M) → F = [cos(2π·x·Wᵀ), sin(2π·x·Wᵀ)] / sqrt(|F|) →
MLP (Linear, GELU, Linear) → (T, dim), added to the tokens, with W (|F|/2, M) learned.
Random (Tancik et al. 2020, "Fourier Features Let Networks Learn High Frequency Functions"):
the same with W a fixed Gaussian matrix; the MLP still learns.
W starts as N(0, sigma²) in both (Li's N(0, γ⁻²) is this with the 2π folded into W).

Positions are scaled to the training extent: text n / max_len, grids (row / rows, col / cols) with
the training grid, so training positions lie in [0, 1) and longer texts or larger grids simply
continue past 1 (same units; nothing is resampled). sigma is in cycles per training extent.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.nn.posenc import PositionalEncoding

__all__ = ["FourierPE", "fourier_features"]


# ---- functions -----------------------------------------------------------------------------------


def fourier_features(coords: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """coords (T, M), freqs (F/2, M) → [cos(2π·coords·freqsᵀ), sin(...)] / sqrt(F), (T, F) (Li et al. 2021, eq. 2)."""
    angles = 2 * math.pi * coords @ freqs.t()  # (T, F/2)
    return torch.cat([angles.cos(), angles.sin()], dim=-1) / math.sqrt(2 * freqs.shape[0])


# ---- module --------------------------------------------------------------------------------------


class FourierPE(PositionalEncoding):
    """Fourier features of scaled positions → MLP → added to the tokens; 2-D when a grid is given, else 1-D.

    Args (context): dim; max_len (text) or grid (images).
    Options:
        fourier_dim: number of Fourier features |F| (cos and sin of |F|/2 frequencies).
        hidden_dim: width of the MLP's hidden layer; null = dim.
        sigma: std of the initial (or fixed) frequencies, in cycles per training extent.
        learnable: learn the frequencies (Li et al.) or keep them fixed (random Fourier features, Tancik et al.).
    """

    lowbit_plugin_api = 1
    pos_dims = (1, 2)

    def __init__(
        self,
        dim: int,
        max_len: int | None = None,
        grid: tuple[int, int] | None = None,
        fourier_dim: int = 64,
        hidden_dim: int | None = None,
        sigma: float = 10.0,
        learnable: bool = True,
    ) -> None:
        super().__init__()
        if grid is not None:
            extent = (float(grid[0]), float(grid[1]))
            self.pos_dims = (2,)
        elif max_len is not None:
            extent = (float(max_len),)
            self.pos_dims = (1,)
        else:
            raise LowbitError("fourier positional encoding needs max_len (text) or grid (images); got neither")
        if fourier_dim < 2 or fourier_dim % 2:
            raise LowbitError(f"fourier_dim counts cos and sin features, so it must be even and ≥ 2, got {fourier_dim}")
        if sigma <= 0:
            raise LowbitError(f"fourier sigma must be positive, got {sigma}")
        self.dim, self.learnable, self.sigma = dim, learnable, sigma
        freqs = torch.randn(fourier_dim // 2, len(extent)) * sigma  # (F/2, M)
        if learnable:
            self.freqs = nn.Parameter(freqs)
        else:
            self.register_buffer("freqs", freqs)  # persistent: the random draw is part of the model
        self.extent = extent  # training extent per axis (python floats: never cast to bf16)
        self.mlp = nn.Sequential(
            nn.Linear(fourier_dim, hidden_dim or dim), nn.GELU(), nn.Linear(hidden_dim or dim, dim)
        )

    def encoding(self, pos: torch.Tensor) -> torch.Tensor:
        """(T,) or (T, 2) positions → (T, dim) encoding (float32 or the parameters' dtype)."""
        self.check_positions(pos)
        extent = torch.tensor(self.extent, device=pos.device)
        coords = (pos.reshape(pos.shape[0], -1).float() / extent).to(self.freqs.dtype)  # (T, M)
        return self.mlp(fourier_features(coords, self.freqs))  # (T, dim)

    def embed(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """x (B, T, C) + MLP(Fourier features of pos)."""
        if x.shape[-1] != self.dim:
            raise LowbitError(f"fourier encoding has width {self.dim}, got tokens of width {x.shape[-1]}")
        return x + self.encoding(pos).to(x.dtype)

    def extra_repr(self) -> str:
        return f"positions={len(self.extent)}-D, extent={self.extent}, learnable={self.learnable}, sigma={self.sigma}"
