"""DiT: a class-conditional diffusion transformer predicting noise (Peebles & Xie 2023, "Scalable
Diffusion Models with Transformers").

Image (B, C, H, W) → ``patch_embed`` (p×p patches, as the ViT) → posenc.embed on 2-D grid positions →
``blocks`` of adaLN-Zero blocks (lowbit.nn.adaln) conditioned on c = ``t_embed``(t) + ``y_embed``(y) →
``final`` (adaLN + Linear to p·p·C per token) → unpatchify → ε̂ (B, C, H, W), the input's shape.

Timesteps go through a sinusoidal embedding and an MLP (DiT §3.2, from GLIDE / ADM); class labels
through a table with one extra row, the null class ``num_classes``, which ``class_dropout`` swaps in
during training so one network also learns the unconditional model for classifier-free guidance
(Ho & Salimans 2022). Every 2-D posenc plugin works: there is no class token, every token is a patch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.models.base import ModelPlugin, build_grid_posenc, check_heads, check_patches, check_sizes
from lowbit.models.vit import PatchEmbed, patch_positions
from lowbit.nn.adaln import AdaLNBlock, AdaLNFinal
from lowbit.nn.transformer import attention_mask

__all__ = ["DiT", "LabelEmbedder", "TimestepEmbedder", "build_grid_posenc", "timestep_embedding"]


# ---- functions -----------------------------------------------------------------------------------
def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """(B,) timesteps (may be fractional) → (B, dim) [cos(t·ω_i), sin(t·ω_i)], ω_i = max_period^(−i/(dim/2))

    (GLIDE/ADM's ``timestep_embedding``, used by DiT §3.2); an odd dim gets one zero channel.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2·half)
    return torch.cat([emb, emb.new_zeros(emb.shape[0], dim % 2)], dim=-1)


# ---- embedders -----------------------------------------------------------------------------------
class TimestepEmbedder(nn.Module):
    """t (B,) → sinusoidal features (B, freq_dim) → Linear → SiLU → Linear → (B, dim) (DiT §3.2)."""

    def __init__(self, dim: int, freq_dim: int = 256) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.freq_dim).to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class labels (B,) → (B, dim) from a table of num_classes + 1 rows; row ``num_classes`` is the null class.

    In training each label becomes the null class with probability ``dropout`` (classifier-free
    guidance training, Ho & Salimans 2022 Alg. 1; DiT's ``LabelEmbedder``).
    """

    def __init__(self, num_classes: int, dim: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.num_classes, self.dropout = num_classes, dropout
        self.table = nn.Embedding(num_classes + 1, dim)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        if self.training and self.dropout > 0:
            drop = torch.rand(y.shape, device=y.device) < self.dropout  # (B,)
            y = torch.where(drop, torch.full_like(y, self.num_classes), y)
        return self.table(y)


# ---- models ----------------------------------------------------------------------------------------
class DiffusionTransformer(ModelPlugin):
    """What DiT and FPDM share: patch, timestep and class embeddings, the posenc, the final layer, unpatchify.

    Subclasses build their trunk and call ``embed`` → trunk → ``output``.
    """

    def __init__(
        self,
        *,
        image_size: int = 8,
        patch_size: int = 2,
        in_chans: int = 1,
        num_classes: int = 10,
        dim: int = 128,
        n_heads: int = 4,
        class_dropout: float = 0.1,
        posenc: str | Mapping[str, Any] = "sinusoidal",
        norm: str = "layernorm",
        freq_dim: int = 256,
    ) -> None:
        super().__init__()
        self.dim, self.n_heads, self.norm = dim, n_heads, norm  # what a subclass's trunk is built with
        check_patches(image_size, patch_size)
        check_heads(dim, n_heads)
        check_sizes(in_chans=in_chans, num_classes=num_classes, freq_dim=freq_dim)
        if not 0 <= class_dropout < 1:
            raise LowbitError(f"model.class_dropout must be in [0, 1), got {class_dropout}")
        self.image_size, self.patch_size, self.in_chans, self.num_classes = (
            image_size,
            patch_size,
            in_chans,
            num_classes,
        )
        self.grid = (image_size // patch_size, image_size // patch_size)
        self.posenc = build_grid_posenc(posenc, dim=dim, n_heads=n_heads, grid=self.grid, model=type(self).__name__)
        self.patch_embed = PatchEmbed(patch_size, in_chans, dim)
        self.t_embed = TimestepEmbedder(dim, freq_dim)
        self.y_embed = LabelEmbedder(num_classes, dim, class_dropout)
        self.final = AdaLNFinal(dim, patch_size * patch_size * in_chans, norm)

    @property
    def null_class(self) -> int:
        """The label of the unconditional model (classifier-free guidance)."""
        return self.num_classes

    def _init_weights(self) -> None:
        """DiT's ``initialize_weights``: Xavier-uniform Linears with zero biases, N(0, 0.02) label table
        and timestep MLP, then adaLN-Zero (modulations and the final layer zero)."""
        for name, module in self.named_modules():
            if name.startswith("posenc"):
                continue  # encodings initialise their own parameters
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.normal_(self.y_embed.table.weight, std=0.02)
        nn.init.normal_(self.t_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embed.mlp[2].weight, std=0.02)
        for module in self.modules():
            if isinstance(module, (AdaLNBlock, AdaLNFinal)):
                module.zero_init()

    def embed(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """x (B, C, H, W), t (B,), y (B,) or None (unconditional) → tokens (B, N, D), c (B, D), pos (N, 2), mask."""
        B = x.shape[0]
        pos = patch_positions(x, self.patch_size, type(self).__name__)  # (N, 2) (row, col)
        if y is None:
            y = torch.full((B,), self.null_class, dtype=torch.long, device=x.device)
        t = t.expand(B) if t.dim() == 0 else t
        tokens = self.posenc.embed(self.patch_embed(x), pos)  # (B, N, D)
        c = self.t_embed(t).to(tokens.dtype) + self.y_embed(y).to(tokens.dtype)  # (B, D)
        N = tokens.shape[1]
        mask = attention_mask(self.posenc.bias(pos, pos), False, N, N)  # once per forward: (nh, N, N) or None
        return tokens, c, pos, mask

    def unpatchify(self, tokens: torch.Tensor, H: int, W: int) -> torch.Tensor:
        """(B, N, p·p·C) in PatchEmbed's (C, p, p) order → (B, C, H, W); the inverse of patchifying."""
        B = tokens.shape[0]
        p, C = self.patch_size, self.in_chans
        x = tokens.reshape(B, H // p, W // p, C, p, p)  # (B, rows, cols, C, p, p)
        return x.permute(0, 3, 1, 4, 2, 5).reshape(B, C, H, W)

    def output(self, tokens: torch.Tensor, c: torch.Tensor, H: int, W: int) -> torch.Tensor:
        """Final adaLN layer and unpatchify: (B, N, D) → ε̂ (B, C, H, W)."""
        return self.unpatchify(self.final(tokens, c), H, W)


class DiT(DiffusionTransformer):
    """Diffusion transformer: ``forward(x, t, y)`` → ε̂ shaped like x. Parameter names (``patch_embed.proj``,
    ``t_embed.mlp``, ``y_embed.table``, ``blocks.{i}.attn.qkv``, ``blocks.{i}.adaLN_modulation.1``,
    ``final.linear``) are stable; the dit recipes keep the embeddings and ``final`` in high precision.

    Args:
        image_size, patch_size, in_chans: the training images (square) and p×p patches.
        num_classes: class labels; label ``num_classes`` is the null (unconditional) class.
        dim, n_layers, n_heads, mlp_ratio, bias: the trunk (SwiGLU MLP, SDPA attention).
        class_dropout: probability of the null class in training (classifier-free guidance).
        posenc: a posenc plugin name or ``{name: ..., **options}`` taking 2-D positions.
        norm: ``layernorm`` (DiT) or ``rmsnorm``, without affine (adaLN supplies it).
        freq_dim: width of the sinusoidal timestep features.
    """

    def __init__(self, *, n_layers: int = 6, mlp_ratio: float = 8 / 3, bias: bool = True, **backbone: Any) -> None:
        check_sizes(n_layers=n_layers)
        super().__init__(**backbone)  # the options DiffusionTransformer names
        self.blocks = nn.ModuleList(
            AdaLNBlock(self.dim, self.n_heads, mlp_ratio, bias, self.norm) for _ in range(n_layers)
        )
        self._init_weights()

    @property
    def blocks_per_step(self) -> int:
        """Transformer blocks one denoising step evaluates (the sampling cost unit shared with FPDM)."""
        return len(self.blocks)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, C, H, W) noisy images, t (B,) timesteps, y (B,) labels → predicted noise (B, C, H, W)."""
        H, W = x.shape[-2:]
        h, c, pos, mask = self.embed(x, t, y)  # (B, N, D), (B, D)
        for block in self.blocks:
            h = block(h, c, pos, self.posenc, mask)
        return self.output(h, c, H, W)
