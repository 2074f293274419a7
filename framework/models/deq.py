"""Deep equilibrium transformers: embedding → one weight-tied block solved to its fixed point → head
(Bai, Kolter, Koltun 2019, "Deep Equilibrium Models", §3 and the DEQ-Transformer of §5).

The weight-tied cell is the shared trunk's pre-norm ``Block`` with input injection and a normalised output,

    f(z, x̃) = RMSNorm(Block(z + x̃)),    x̃ = RMSNorm(embedding (+ absolute posenc)),

so z* is bounded and a fresh cell contracts (the output norm divides the Jacobian by ‖Block(z + x̃)‖/√D
while the injection keeps x̃ in every step). ``DEQViT`` classifies images as the ViT does (2-D grid
positions, class token or mean pooling; the class token has no position); ``DEQGPT`` is a causal byte
LM as the GPT (exactly causal with fixed-point iteration; Anderson and Broyden mix each sample's whole
sequence, so earlier positions feel later ones up to the solver tolerance). The solve is the ``deq`` layer plugin
(``registry.load("layers", "deq")``); its options pass through ``deq``. Positional biases and masks are
built once per forward, outside the solve (a data-dependent encoding, path, computes its Householder
products from the cell's input in every evaluation of the cell).
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from lowbit.models.base import ModelPlugin, init_gpt2_weights
from lowbit.models.gpt import CausalLM
from lowbit.models.vit import PatchClassifier
from lowbit.nn.attention import attach_posenc
from lowbit.nn.norm import RMSNorm
from lowbit.nn.transformer import Block, attention_mask
from lowbit.registry import registry

__all__ = ["DEQ_DEFAULTS", "DEQGPT", "DEQViT", "EquilibriumCell", "double_backward_attention"]

# the deq layer's defaults for these models (any DEQ option may be given in model.deq)
DEQ_DEFAULTS: dict[str, Any] = {
    "name": "deq",
    "solver": "anderson",
    "max_iter": 12,
    "tol": 1e-3,
    "grad": "phantom",  # k damped unrolled steps from z* (Geng et al. 2021): cheap and stable
    "phantom_steps": 3,
    "phantom_damping": 0.8,
}


def double_backward_attention(deq: nn.Module) -> AbstractContextManager:
    """SDPA's math kernel while a DEQ layer computes its Jacobian regulariser, a nullcontext otherwise.

    The regulariser differentiates a vector-Jacobian product (double backward); SDPA's fused kernels
    (flash / memory-efficient, CPU and CUDA) have no derivative for their backward, the math kernel has.
    """
    if deq.training and torch.is_grad_enabled() and getattr(deq, "jac_reg_weight", 0) > 0:
        return sdpa_kernel(SDPBackend.MATH)
    return nullcontext()


class EquilibriumCell(nn.Module):
    """f(z, (x̃, pos, posenc, mask, causal)) = RMSNorm(Block(z + x̃)): z and x̃ (B, T, D)."""

    def __init__(self, dim: int, n_heads: int, mlp_ratio: float, bias: bool) -> None:
        super().__init__()
        self.block = Block(dim, n_heads, mlp_ratio, bias)
        self.norm = RMSNorm(dim)

    def forward(self, z: torch.Tensor, inputs: tuple) -> torch.Tensor:
        x, pos, posenc, mask, causal = inputs
        return self.norm(self.block(z + x, pos, posenc, mask, causal))


class _Equilibrium(ModelPlugin):
    """The input norm, the DEQ-wrapped cell, and the stats/aux-loss accessors both models share."""

    def _build_equilibrium(self, dim: int, n_heads: int, mlp_ratio: float, bias: bool, deq: Mapping | None) -> None:
        self.inject_norm = RMSNorm(dim)
        options = {**DEQ_DEFAULTS, **dict(deq or {})}
        self.equilibrium = registry.build("layers", options, f=EquilibriumCell(dim, n_heads, mlp_ratio, bias))

    def _init_weights(self, std: float) -> None:
        # as GPT/ViT, the residual projections of the one block scaled as in a 2-layer net (1/sqrt(2·2))
        init_gpt2_weights(self, std, n_layers=2)

    def deq_stats(self) -> dict[str, float]:
        """Solver stats of the last forward, keyed ``deq/...`` (empty before the first)."""
        return self.equilibrium.stats_dict()

    def deq_aux_loss(self) -> torch.Tensor:
        """The layer's Jacobian regulariser of the last training forward (zero when off)."""
        return self.equilibrium.jac_loss


class DEQViT(_Equilibrium, PatchClassifier):
    """Equilibrium ViT classifier: patches → x̃ → z* = f(z*, x̃) → [class token | mean] → ``head``.

    Args: as ViT (image_size, patch_size, in_chans, num_classes, dim, n_heads, mlp_ratio, pool, posenc,
    bias, init_std) — there is one block, so no n_layers — and ``deq``: the deq layer's options.
    """

    display_name = "DEQ ViT"

    def __init__(
        self,
        *,
        image_size: int = 16,
        patch_size: int = 4,
        in_chans: int = 1,
        num_classes: int = 10,
        dim: int = 128,
        n_heads: int = 4,
        mlp_ratio: float = 8 / 3,
        pool: str = "mean",
        posenc: str | Mapping[str, Any] = "rope",
        bias: bool = False,
        init_std: float = 0.02,
        deq: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self._build_patches(image_size, patch_size, in_chans, dim, n_heads, pool, posenc)
        self._build_equilibrium(dim, n_heads, mlp_ratio, bias, deq)
        self.head = nn.Linear(dim, num_classes)
        self._init_weights(init_std)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, C, H, W) → logits (B, num_classes)."""
        x, pos, posenc = self._tokens(images)  # (B, T, D), (T, 2)
        T = x.shape[1]
        mask = attention_mask(posenc.bias(pos, pos), False, T, T)  # once, outside the solve
        with double_backward_attention(self.equilibrium):
            z = self.equilibrium((self.inject_norm(x), pos, posenc, mask, False))  # (B, T, D)
        return self._pool(z)


class DEQGPT(_Equilibrium, CausalLM):
    """Equilibrium causal LM: tokens → x̃ → z* = f(z*, x̃) (causal attention) → ``lm_head``.

    Args: as GPT (vocab_size, dim, n_heads, mlp_ratio, max_len, posenc, tie_weights, bias, init_std) —
    one block, so no n_layers — and ``deq``: the deq layer's options.
    """

    display_name = "DEQ GPT"

    def __init__(
        self,
        *,
        vocab_size: int = 256,
        dim: int = 192,
        n_heads: int = 4,
        mlp_ratio: float = 8 / 3,
        max_len: int = 256,
        posenc: str | Mapping[str, Any] = "rope",
        tie_weights: bool = True,
        bias: bool = False,
        init_std: float = 0.02,
        deq: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self._build_embedding(vocab_size, dim, n_heads, max_len, posenc)
        self._build_equilibrium(dim, n_heads, mlp_ratio, bias, deq)
        attach_posenc(self.equilibrium, self.posenc)  # a data-dependent encoding's modules in the cell (path)
        self._build_head(vocab_size, dim, tie_weights)
        self._init_weights(init_std)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """idx (B, T) token ids → logits (B, T, vocab)."""
        x, pos = self._embed(idx)  # (B, T, D), (T,)
        T = idx.shape[1]
        mask = attention_mask(self.posenc.bias(pos, pos), True, T, T)  # once, outside the solve
        with double_backward_attention(self.equilibrium):
            z = self.equilibrium((self.inject_norm(x), pos, self.posenc, mask, True))  # (B, T, D)
        return self.lm_head(z)
