"""What lowbit's model plugins share: the base class with the plugin API and ``num_params``, the
checks on their shape options, their positional-encoding builders (text and image grid), and
GPT-2's weight init.

Nothing here creates a parameter on its own schedule: a model calls these in its constructor, in
the order its parameters are created, so shared code never changes a model's random init.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from torch import nn

from lowbit.errors import LowbitError
from lowbit.nn.posenc import PositionalEncoding
from lowbit.registry import registry

__all__ = [
    "ModelPlugin",
    "build_grid_posenc",
    "build_text_posenc",
    "check_heads",
    "check_patches",
    "check_sizes",
    "count_parameters",
    "init_gpt2_weights",
]


# ---- functions -----------------------------------------------------------------------------------
def count_parameters(module: nn.Module) -> int:
    """Elements in ``module``'s parameters; a tied matrix counts once (``parameters()`` yields it once)."""
    return sum(p.numel() for p in module.parameters())


def check_sizes(**sizes: int) -> None:
    """Each ``model.<name>`` is an integer >= 1 (widths, depths, heads, patch and image sides, classes)."""
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise LowbitError(f"model.{name} must be an integer of at least 1, got {value!r}")


def check_heads(dim: int, n_heads: int) -> None:
    """The width splits into whole heads."""
    check_sizes(dim=dim, n_heads=n_heads)
    if dim % n_heads:
        raise LowbitError(f"model.dim {dim} is not divisible by model.n_heads {n_heads}; pick dim = k·n_heads")


def check_patches(image_size: int, patch_size: int) -> None:
    """The (square) training images split into whole p×p patches."""
    check_sizes(image_size=image_size, patch_size=patch_size)
    if image_size % patch_size:
        raise LowbitError(
            f"model.image_size {image_size} is not divisible by model.patch_size {patch_size}; pick image_size = k·patch_size"
        )


def build_text_posenc(
    posenc: str | Mapping[str, Any], *, dim: int, n_heads: int, max_len: int, model: str
) -> PositionalEncoding:
    """A posenc plugin for a language model of context ``max_len``: it must take 1-D positions."""
    enc = registry.build(
        "posenc", posenc, dim=dim, n_heads=n_heads, head_dim=dim // n_heads, max_len=max_len, grid=None
    )
    if 1 not in enc.pos_dims:
        raise LowbitError(f"positional encoding {type(enc).__name__} is 2-D only; a {model} needs a 1-D encoding")
    return enc


def build_grid_posenc(
    posenc: str | Mapping[str, Any], *, dim: int, n_heads: int, grid: tuple[int, int], model: str
) -> PositionalEncoding:
    """A posenc plugin for a bidirectional model on a (rows, cols) grid: it must take 2-D positions and not be causal."""
    enc = registry.build(
        "posenc",
        posenc,
        dim=dim,
        n_heads=n_heads,
        head_dim=dim // n_heads,
        max_len=grid[0] * grid[1],
        grid=grid,
        causal=False,  # encodings with a `causal` option attend both ways unless configured otherwise
    )
    name = type(enc).__name__
    if 2 not in enc.pos_dims:
        raise LowbitError(
            f"positional encoding {name} takes 1-D (text) positions only; a {model} needs one that takes 2-D grid positions (e.g. rope, sinusoidal, learned, alibi)"
        )
    if getattr(enc, "causal", False):
        raise LowbitError(
            f"positional encoding {name} has causal=true; a {model} attends both ways: set posenc.causal=false"
        )
    return enc


def init_gpt2_weights(model: nn.Module, std: float, n_layers: int) -> None:
    """GPT-2's init (Radford et al. 2019, §2.3): N(0, std) matrices, residual output projections scaled
    by 1/sqrt(2·n_layers), zero biases; the positional encoding initialises its own parameters."""
    for name, p in model.named_parameters():
        if name.startswith("posenc."):
            continue
        if p.dim() >= 2:
            scale = 1 / math.sqrt(2 * n_layers) if name.endswith(("attn.proj.weight", "mlp.fc_out.weight")) else 1.0
            nn.init.normal_(p, mean=0.0, std=std * scale)
        elif name.endswith(".bias"):
            nn.init.zeros_(p)


# ---- base class ----------------------------------------------------------------------------------
class ModelPlugin(nn.Module):
    """Base of lowbit's model plugins: the plugin API version they target and their parameter count."""

    lowbit_plugin_api = 1

    def num_params(self) -> int:
        """Elements in all parameters, a tied embedding and head counted once."""
        return count_parameters(self)
