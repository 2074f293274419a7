"""Any stock timm model as a lowbit model plugin: ``model=timm model.model_name=vit_tiny_patch16_224``.

``timm.create_model(model_name, pretrained=False, **options)``: nothing is ever downloaded, so a run
trains from scratch. The architecture options left null keep timm's defaults for that model; any
other ``create_model`` keyword goes in ``kwargs``. Precision plugins convert its ``nn.Linear``
layers by fully-qualified name like lowbit's own (``net.blocks.3.attn.qkv``, ``net.head``).
The run's ``posenc`` is not used: a timm model brings its own position embedding. ``attn_bias`` adds
an attention-bias encoding to a timm ViT (``lookhere``, ``alibi``, ``kerple``): built for the
patch grid of every input, zero to and from the prefix tokens (class, registers), and passed to timm's
``VisionTransformer.forward(x, attn_mask=...)``; ``kwargs: {pos_embed: none, dynamic_img_size: true}``
drops timm's absolute table and lets the images grow.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from lowbit.errors import LowbitError
from lowbit.models.base import ModelPlugin, build_grid_posenc
from lowbit.nn.posenc import PositionalEncoding, positions_2d

__all__ = ["TimmModel"]


class TimmModel(ModelPlugin):
    """Wraps ``timm.create_model(model_name, pretrained=False, ...)`` as ``self.net``; forward is the timm model's.

    Args:
        model_name: a timm model name (``timm.list_models()``; ``name`` is the plugin's, as in every model config).
        img_size, patch_size, in_chans, num_classes, embed_dim, depth, num_heads, mlp_ratio: passed to
            ``create_model`` when not None (the ViT family's keywords; other families take fewer).
        kwargs: any other ``create_model`` keywords (``{class_token: false, global_pool: avg}``).
        attn_bias: a positional encoding with an additive attention bias (name or ``{name: ..., **options}``),
            for a ViT-family model whose ``forward`` takes ``attn_mask``; None: none.
    """

    def __init__(
        self,
        *,
        model_name: str = "vit_tiny_patch16_224",
        img_size: int | None = None,
        patch_size: int | None = None,
        in_chans: int | None = None,
        num_classes: int | None = None,
        embed_dim: int | None = None,
        depth: int | None = None,
        num_heads: int | None = None,
        mlp_ratio: float | None = None,
        kwargs: Mapping[str, Any] | None = None,
        attn_bias: str | Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        import timm

        if not timm.is_model(model_name):
            raise LowbitError(
                f"unknown timm model '{model_name}'; see timm.list_models() (e.g. vit_tiny_patch16_224, resnet18)"
            )
        named = {
            "img_size": img_size,
            "patch_size": patch_size,
            "in_chans": in_chans,
            "num_classes": num_classes,
            "embed_dim": embed_dim,
            "depth": depth,
            "num_heads": num_heads,
            "mlp_ratio": mlp_ratio,
        }
        options = {k: v for k, v in named.items() if v is not None} | dict(kwargs or {})
        if options.pop("pretrained", False):
            raise LowbitError(
                "model.kwargs.pretrained=true: lowbit trains timm models from scratch and downloads nothing; drop it"
            )
        self.model_name = model_name
        try:
            self.net = timm.create_model(model_name, pretrained=False, **options)
        except TypeError as err:  # a keyword this model family does not take
            raise LowbitError(
                f"timm model '{model_name}' rejected its options {sorted(options)}: {err}; set the ones it does not take to null"
            ) from err
        self.attn_bias = None if attn_bias is None else self._build_attn_bias(attn_bias)

    def _build_attn_bias(self, attn_bias: str | Mapping[str, Any]) -> PositionalEncoding:
        net = self.net
        blocks = getattr(net, "blocks", None)
        attn = getattr(blocks[0], "attn", None) if blocks else None
        if getattr(net, "patch_embed", None) is None or getattr(attn, "num_heads", None) is None:
            raise LowbitError(
                f"model.attn_bias needs a timm ViT (patch_embed and blocks[i].attn); '{self.model_name}' is not one"
            )
        grid = tuple(net.patch_embed.grid_size)
        heads, dim = attn.num_heads, net.embed_dim
        enc = build_grid_posenc(attn_bias, dim=dim, n_heads=heads, grid=grid, model=f"timm model '{self.model_name}'")
        if type(enc).bias is PositionalEncoding.bias:
            raise LowbitError(
                f"model.attn_bias {type(enc).__name__} adds no attention bias; use one that does "
                "(lookhere, alibi, kerple)"
            )
        return enc

    def _mask(self, images: torch.Tensor) -> torch.Tensor:
        """The bias (nh, T, T) for this input's patch grid, zero in the prefix tokens' rows and columns, in
        the dtype the attention runs in (SDPA takes a float mask of the query's dtype)."""
        p = self.net.patch_embed.patch_size
        rows, cols = images.shape[-2] // p[0], images.shape[-1] // p[1]
        pos = positions_2d(rows, cols, images.device)
        n = self.net.num_prefix_tokens
        bias = F.pad(self.attn_bias.bias(pos, pos), (n, 0, n, 0))
        device = images.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else images.dtype
        return bias.to(dtype)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, C, H, W) → logits (B, num_classes)."""
        if self.attn_bias is None:
            return self.net(images)
        return self.net(images, attn_mask=self._mask(images))
