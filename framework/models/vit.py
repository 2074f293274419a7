"""ViT: an image classifier on the shared pre-norm trunk (Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words").

Patches → ``patch_embed.proj`` (a Linear over flattened p×p×C patches, the same map as timm's
Conv2d patch embedding) → posenc.embed on the patch tokens → [class token] → Transformer
(bidirectional, 2-D grid positions) → pool (class token or mean) → ``head``.

The class token has no position. As in timm (DeiT, EVA), the positional encoding acts on patch
tokens only: absolute encodings are added to the patches (the class token is itself learned), rotary
encodings rotate the patches and leave the class token as it is, and additive biases (ALiBi,
KERPLE) are zero between the class token and every other token. So every 2-D encoding works with
``pool: cls`` unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.errors import LowbitError
from lowbit.nn.posenc import PositionalEncoding, positions_2d
from lowbit.nn.transformer import Transformer
from lowbit.registry import registry

__all__ = ["PatchEmbed", "ViT"]

POOLS = ("cls", "mean")


class PatchEmbed(nn.Module):
    """Non-overlapping p×p patches, flattened channel-major (C, p, p) as a Conv2d weight is, → Linear to dim."""

    def __init__(self, patch_size: int, in_chans: int, dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Linear(in_chans * patch_size * patch_size, dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, C, H, W) → tokens (B, H/p · W/p, dim) in row-major patch order."""
        B, C, H, W = images.shape
        p = self.patch_size
        x = images.reshape(B, C, H // p, p, W // p, p)  # (B, C, rows, p, cols, p)
        x = x.permute(0, 2, 4, 1, 3, 5).reshape(B, (H // p) * (W // p), C * p * p)  # (B, N, C·p·p)
        return self.proj(x)  # (B, N, dim)


class _PatchTokensOnly:
    """Shows a positional encoding to the trunk so it acts on the patch tokens only.

    The ``n_prefix`` leading tokens (the class token) are not rotated and get a zero bias to and
    from every token, whatever positions the trunk passes (timm's handling of prefix tokens).
    """

    def __init__(self, posenc: PositionalEncoding, patch_pos: torch.Tensor, n_prefix: int) -> None:
        self.posenc, self.patch_pos, self.n_prefix = posenc, patch_pos, n_prefix
        self._rotates = type(posenc).rotate is not PositionalEncoding.rotate

    def rotate(self, q: torch.Tensor, k: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q, k (B, nh, T, hs): rotate tokens n_prefix.. at the patch positions; the prefix passes through."""
        if not self._rotates:
            return q, k
        n = self.n_prefix
        q_patch, k_patch = self.posenc.rotate(q[:, :, n:], k[:, :, n:], self.patch_pos)
        return torch.cat([q[:, :, :n], q_patch], dim=2), torch.cat([k[:, :, :n], k_patch], dim=2)

    def bias(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor | None:
        """The encoding's (nh, N, N) patch bias, padded with zeros to (nh, T, T) for the prefix rows and columns."""
        bias = self.posenc.bias(self.patch_pos, self.patch_pos)
        if bias is None:
            return None
        n = self.n_prefix
        return F.pad(bias, (n, 0, n, 0))  # (nh, T, T)


class ViT(nn.Module):
    """Vision transformer classifier. Parameter names (``patch_embed.proj``, ``cls_token``,
    ``trunk.blocks.{i}.attn.qkv``, ``head``) are stable; the vit recipes keep ``head`` and
    ``patch_embed.*`` in high precision.

    Args:
        image_size, patch_size, in_chans: the training images (square) and patches; image_size must divide by patch_size.
        num_classes: outputs of the ``head``.
        dim, n_layers, n_heads, mlp_ratio, bias: the trunk, as in GPT.
        pool: ``cls`` (a learned class token, read out after the trunk) or ``mean`` (mean of the patch tokens).
        posenc: a posenc plugin name or ``{name: ..., **options}``; it must take 2-D positions.
        init_std: std of the normal init (residual output projections scaled by 1/sqrt(2·n_layers)).
    Evaluating at another image size works where the encoding allows (learned tables are resampled).
    """

    lowbit_plugin_api = 1

    def __init__(
        self,
        *,
        image_size: int = 16,
        patch_size: int = 4,
        in_chans: int = 1,
        num_classes: int = 10,
        dim: int = 128,
        n_layers: int = 4,
        n_heads: int = 4,
        mlp_ratio: float = 8 / 3,
        pool: str = "cls",
        posenc: str | Mapping[str, Any] = "rope",
        bias: bool = False,
        init_std: float = 0.02,
    ) -> None:
        super().__init__()
        if image_size % patch_size:
            raise LowbitError(
                f"model.image_size {image_size} is not divisible by model.patch_size {patch_size}; pick image_size = k·patch_size"
            )
        if dim % n_heads:
            raise LowbitError(f"model.dim {dim} is not divisible by model.n_heads {n_heads}; pick dim = k·n_heads")
        if pool not in POOLS:
            raise LowbitError(f"unknown model.pool '{pool}'; valid: {', '.join(POOLS)}")
        self.image_size, self.patch_size, self.pool = image_size, patch_size, pool
        self.grid = (image_size // patch_size, image_size // patch_size)
        # an encoder attends both ways: encodings with a `causal` option get causal=False unless configured
        self.posenc = registry.build(
            "posenc",
            posenc,
            dim=dim,
            n_heads=n_heads,
            head_dim=dim // n_heads,
            max_len=self.grid[0] * self.grid[1],
            grid=self.grid,
            causal=False,
        )
        name = type(self.posenc).__name__
        if 2 not in self.posenc.pos_dims:
            raise LowbitError(
                f"positional encoding {name} takes 1-D (text) positions only; a ViT needs one that takes 2-D grid positions (e.g. rope, sinusoidal, learned, alibi)"
            )
        if getattr(self.posenc, "causal", False):
            raise LowbitError(
                f"positional encoding {name} has causal=true; a ViT attends both ways: set posenc.causal=false"
            )
        self.patch_embed = PatchEmbed(patch_size, in_chans, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if pool == "cls" else None
        self.trunk = Transformer(dim, n_layers, n_heads, mlp_ratio, bias)
        self.head = nn.Linear(dim, num_classes)
        self._init_weights(init_std, n_layers)

    def _init_weights(self, std: float, n_layers: int) -> None:
        # as GPT: N(0, std) everywhere, residual output projections scaled by 1/sqrt(2·depth), biases zero
        for name, p in self.named_parameters():
            if name.startswith("posenc."):
                continue  # encodings initialise their own parameters
            if p.dim() >= 2:
                scale = 1 / math.sqrt(2 * n_layers) if name.endswith(("attn.proj.weight", "mlp.fc_out.weight")) else 1.0
                nn.init.normal_(p, mean=0.0, std=std * scale)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, C, H, W) → logits (B, num_classes); H and W must divide by patch_size."""
        B, _, H, W = images.shape
        p = self.patch_size
        if H % p or W % p:
            raise LowbitError(f"ViT got {H}x{W} images; height and width must divide by patch_size {p}")
        patch_pos = positions_2d(H // p, W // p, images.device)  # (N, 2) (row, col)
        x = self.posenc.embed(self.patch_embed(images), patch_pos)  # (B, N, C)
        if self.cls_token is None:
            x = self.trunk(x, patch_pos, self.posenc, causal=False)  # (B, N, C)
            return self.head(x.mean(dim=1))
        x = torch.cat([self.cls_token.expand(B, -1, -1).to(x.dtype), x], dim=1)  # (B, 1 + N, C)
        pos = torch.cat([patch_pos.new_zeros(1, 2), patch_pos])  # (1 + N, 2); the class token's is never read
        x = self.trunk(x, pos, _PatchTokensOnly(self.posenc, patch_pos, 1), causal=False)  # (B, 1 + N, C)
        return self.head(x[:, 0])

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
