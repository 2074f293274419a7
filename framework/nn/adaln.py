"""adaLN-Zero conditioning for the shared trunk (Peebles & Xie 2023, "Scalable Diffusion Models with
Transformers", §3.2 "adaLN-Zero block").

A condition vector c (timestep + class embedding, (B, C)) regresses a per-channel shift β and scale γ,
applied as ``modulate(x, β, γ) = x · (1 + γ) + β`` to the normalised tokens, and a gate α that scales
each residual branch. The regressing Linear starts at zero, so every block starts
as the identity and the final layer outputs zero (the paper's "Zero").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.errors import LowbitError
from lowbit.nn.attention import SelfAttention
from lowbit.nn.mlp import SwiGLU, swiglu_hidden
from lowbit.nn.posenc import PositionalEncoding

__all__ = ["NORMS", "AdaLNBlock", "AdaLNFinal", "modulate", "plain_norm"]

NORMS = ("layernorm", "rmsnorm")


# ---- functions -----------------------------------------------------------------------------------
def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (B, T, C) · (1 + scale) + shift, with shift and scale (B, C) broadcast over tokens (DiT §3.2)."""
    return x * (1 + scale[:, None]) + shift[:, None]


def plain_norm(kind: str, x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """LayerNorm or RMSNorm over the last dim with no learned affine (adaLN supplies it), in float32."""
    if kind == "layernorm":
        return F.layer_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)
    return F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


def _check_norm(norm: str) -> None:
    if norm not in NORMS:
        raise LowbitError(f"unknown model.norm '{norm}'; valid: {', '.join(NORMS)}")


# ---- modules -------------------------------------------------------------------------------------
class AdaLNBlock(nn.Module):
    """Pre-norm transformer block with adaLN-Zero: the trunk's SelfAttention and SwiGLU, each branch
    modulated and gated by c (DiT Fig. 3, "DiT Block with adaLN-Zero").

    x = x + α₁ · attn(modulate(norm(x), β₁, γ₁));  x = x + α₂ · mlp(modulate(norm(x), β₂, γ₂)),
    with (β₁, γ₁, α₁, β₂, γ₂, α₂) = ``adaLN_modulation``(c), zero at init.
    """

    def __init__(self, dim: int, n_heads: int, mlp_ratio: float = 8 / 3, bias: bool = True, norm: str = "layernorm"):
        super().__init__()
        _check_norm(norm)
        self.norm = norm
        self.attn = SelfAttention(dim, n_heads, bias=bias)
        self.mlp = SwiGLU(dim, swiglu_hidden(dim, mlp_ratio), bias=bias)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.zero_init()

    def zero_init(self) -> None:
        """adaLN-Zero: the modulation regresses zeros, so the block is the identity."""
        nn.init.zeros_(self.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.adaLN_modulation[-1].bias)

    def forward(
        self,
        x: torch.Tensor,
        c: torch.Tensor,
        pos: torch.Tensor,
        posenc: PositionalEncoding,
        attn_mask: torch.Tensor | None,
        causal: bool = False,
    ) -> torch.Tensor:
        """x (B, T, C), c (B, C) → (B, T, C)."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=-1)  # each (B, C)
        h = modulate(plain_norm(self.norm, x), shift1, scale1)
        x = x + gate1[:, None] * self.attn(h, pos, posenc, attn_mask, causal)
        h = modulate(plain_norm(self.norm, x), shift2, scale2)
        return x + gate2[:, None] * self.mlp(h)


class AdaLNFinal(nn.Module):
    """DiT's final layer: modulate(norm(x), β, γ) → Linear to ``out_dim`` per token; all zero at init."""

    def __init__(self, dim: int, out_dim: int, norm: str = "layernorm") -> None:
        super().__init__()
        _check_norm(norm)
        self.norm = norm
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, out_dim)
        self.zero_init()

    def zero_init(self) -> None:
        for layer in (self.adaLN_modulation[-1], self.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x (B, T, C), c (B, C) → (B, T, out_dim)."""
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)  # (B, C) each
        return self.linear(modulate(plain_norm(self.norm, x), shift, scale))
