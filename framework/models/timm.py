"""Any stock timm model as a lowbit model plugin: ``model=timm model.model_name=vit_tiny_patch16_224``.

``timm.create_model(model_name, pretrained=False, **options)``: nothing is ever downloaded, so a run
trains from scratch. The architecture options left null keep timm's defaults for that model; any
other ``create_model`` keyword goes in ``kwargs``. Precision plugins convert its ``nn.Linear``
layers by fully-qualified name like lowbit's own (``net.blocks.3.attn.qkv``, ``net.head``).
The run's ``posenc`` is not used: a timm model brings its own position embedding.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from lowbit.errors import LowbitError
from lowbit.models.base import ModelPlugin

__all__ = ["TimmModel"]


class TimmModel(ModelPlugin):
    """Wraps ``timm.create_model(model_name, pretrained=False, ...)`` as ``self.net``; forward is the timm model's.

    Args:
        model_name: a timm model name (``timm.list_models()``; ``name`` is the plugin's, as in every model config).
        img_size, patch_size, in_chans, num_classes, embed_dim, depth, num_heads, mlp_ratio: passed to
            ``create_model`` when not None (the ViT family's keywords; other families take fewer).
        kwargs: any other ``create_model`` keywords (``{class_token: false, global_pool: avg}``).
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

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, C, H, W) → logits (B, num_classes)."""
        return self.net(images)
