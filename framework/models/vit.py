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

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.errors import LowbitError
from lowbit.models.base import (
    ModelPlugin,
    build_grid_posenc,
    check_heads,
    check_patches,
    check_sizes,
    init_gpt2_weights,
)
from lowbit.nn.posenc import PositionalEncoding, positions_2d
from lowbit.nn.transformer import Transformer

__all__ = ["PatchClassifier", "PatchEmbed", "ViT", "patch_positions"]

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


def patch_positions(images: torch.Tensor, patch_size: int, model: str) -> torch.Tensor:
    """(N, 2) (row, col) positions of the p×p patches of images (B, C, H, W), row-major as PatchEmbed orders them."""
    H, W = images.shape[-2:]
    p = patch_size
    if H % p or W % p:
        raise LowbitError(f"{model} got {H}x{W} images; height and width must divide by patch_size {p}")
    return positions_2d(H // p, W // p, images.device)


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


class PatchClassifier(ModelPlugin):
    """The ends every image classifier shares around its trunk: patches + 2-D posenc (+ class token) in,
    pool and ``head`` out.

    A subclass builds ``_build_patches``, then its trunk, then ``head`` (the order parameters are
    created in, which fixes the random init); its forward runs the trunk between ``_tokens`` and ``_pool``.
    """

    display_name = "image classifier"  # the model as error messages name it

    def _build_patches(
        self,
        image_size: int,
        patch_size: int,
        in_chans: int,
        dim: int,
        n_heads: int,
        pool: str,
        posenc: str | Mapping[str, Any],
    ) -> None:
        check_patches(image_size, patch_size)
        check_heads(dim, n_heads)
        check_sizes(in_chans=in_chans)
        if pool not in POOLS:
            raise LowbitError(f"unknown model.pool '{pool}'; valid: {', '.join(POOLS)}")
        self.image_size, self.patch_size, self.pool = image_size, patch_size, pool
        self.grid = (image_size // patch_size, image_size // patch_size)
        self.posenc = build_grid_posenc(posenc, dim=dim, n_heads=n_heads, grid=self.grid, model=self.display_name)
        self.patch_embed = PatchEmbed(patch_size, in_chans, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if pool == "cls" else None

    def _tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, PositionalEncoding | _PatchTokensOnly]:
        """images (B, C, H, W) → (tokens (B, T, D), positions (T, 2), the posenc the trunk sees);
        T = 1 + N with a class token (first, its position never read), N without."""
        B = images.shape[0]
        patch_pos = patch_positions(images, self.patch_size, self.display_name)  # (N, 2) (row, col)
        x = self.posenc.embed(self.patch_embed(images), patch_pos)  # (B, N, D)
        if self.cls_token is None:
            return x, patch_pos, self.posenc
        x = torch.cat([self.cls_token.expand(B, -1, -1).to(x.dtype), x], dim=1)  # (B, 1 + N, D)
        pos = torch.cat([patch_pos.new_zeros(1, 2), patch_pos])  # (1 + N, 2)
        return x, pos, _PatchTokensOnly(self.posenc, patch_pos, 1)

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        """Trunk output (B, T, D) → logits (B, num_classes): the class token's, or the mean token's."""
        return self.head(x[:, 0] if self.cls_token is not None else x.mean(dim=1))


class ViT(PatchClassifier):
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

    display_name = "ViT"

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
        check_sizes(n_layers=n_layers, num_classes=num_classes)
        self._build_patches(image_size, patch_size, in_chans, dim, n_heads, pool, posenc)
        self.trunk = Transformer(dim, n_layers, n_heads, mlp_ratio, bias)
        self.head = nn.Linear(dim, num_classes)
        init_gpt2_weights(self, init_std, n_layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, C, H, W) → logits (B, num_classes); H and W must divide by patch_size."""
        x, pos, posenc = self._tokens(images)  # (B, T, C), (T, 2)
        return self._pool(self.trunk(x, pos, posenc, causal=False))
