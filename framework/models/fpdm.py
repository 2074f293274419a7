"""FPDM: Fixed Point Diffusion Models (Bai & Melas-Kyriazi, CVPR 2024, arXiv 2401.08741).

A DiT whose middle blocks are replaced by one implicit layer (§3.1, Fig. 2): image → embeddings (as DiT)
→ ``pre_blocks`` (explicit adaLN-Zero blocks) → x̃ → the fixed point z* = f(z*, x̃, c) of ONE
weight-tied cell → ``post_blocks`` → final layer → ε̂. The cell (as the authors' code) mixes the state
with the input injection W x̃ through an MLP, then applies an adaLN-Zero block:

    f(z) = Block(W₂ gelu(W₁ [z ; W_inj x̃]), c)

The fixed point is solved by the ``deq`` layer plugin (``registry.load("layers", "deq")``): its solver
options and FPDM's stochastic Jacobian-free training (``grad: fpdm``: n ~ U{nograd_iters_range} steps
without gradient, then m ~ U{grad_iters_range} with it, §3.2 "S-JFB") pass through ``deq``. The solve
starts at x̃ (the paper's initialisation), or at a given z0: the previous timestep's solution when
sampling (§3.3 "solution reuse"); ``iters`` caps the solver's evaluations for one call, which is how a
sampler spreads a fixed iteration budget over timesteps (§3.3 "smoothing computation across timesteps").
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.errors import LowbitError
from lowbit.models.deq import double_backward_attention
from lowbit.models.dit import DiffusionTransformer
from lowbit.nn.adaln import AdaLNBlock
from lowbit.nn.posenc import PositionalEncoding
from lowbit.registry import registry

__all__ = ["DEQ_DEFAULTS", "FPDM", "FixedPointCell"]

# FPDM's defaults for the deq layer (any DEQ option may be given in model.deq)
DEQ_DEFAULTS: dict[str, Any] = {
    "name": "deq",
    "solver": "fixed_point",  # the paper iterates plainly; anderson / broyden also work
    "max_iter": 8,  # evaluations per solve outside training (a sampler may set its own per timestep)
    "tol": 1e-3,
    "grad": "fpdm",  # S-JFB (§3.2)
    "nograd_iters_range": (0, 6),
    "grad_iters_range": (1, 3),
}


class FixedPointCell(nn.Module):
    """FPDM's weight-tied cell f(z, (inj, c, pos, posenc, mask)) = Block(W₂ gelu(W₁ [z ; inj]), c).

    z and inj (B, N, D), c (B, D). The injection ``inj`` = W_inj x̃ is computed once per forward, outside the solve.
    """

    def __init__(self, dim: int, n_heads: int, mlp_ratio: float, bias: bool, norm: str) -> None:
        super().__init__()
        self.mix_in = nn.Linear(2 * dim, 2 * dim)
        self.mix_out = nn.Linear(2 * dim, dim)
        self.block = AdaLNBlock(dim, n_heads, mlp_ratio, bias, norm)

    def forward(self, z: torch.Tensor, inputs: tuple) -> torch.Tensor:
        inj, c, pos, posenc, mask = inputs
        u = self.mix_out(F.gelu(self.mix_in(torch.cat([z, inj], dim=-1)), approximate="tanh"))  # (B, N, D)
        return self.block(u, c, pos, posenc, mask)


@contextmanager
def _solver_budget(deq: nn.Module, iters: int | None) -> Iterator[None]:
    """Cap the layer's solver at ``iters`` evaluations for one call, restoring its own setting after."""
    if iters is None:
        yield
        return
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise LowbitError(f"FPDM iters (solver evaluations for one call) must be a positive integer, got {iters!r}")
    saved = deq.max_iter
    deq.max_iter = iters
    try:
        yield
    finally:
        deq.max_iter = saved


class FPDM(DiffusionTransformer):
    """Fixed Point Diffusion Model: ``forward(x, t, y, z0=None, iters=None, return_z=False)`` → ε̂ shaped like x
    (and the fixed point z* (B, N, D) with ``return_z``, to warm-start the next timestep).

    Args (as DiT, plus):
        n_pre, n_post: explicit adaLN-Zero blocks before and after the fixed-point layer (the paper: 1 and 1).
        deq: options of the ``deq`` layer plugin (solver, max_iter, tol, grad, nograd_iters_range, ...),
            merged over ``DEQ_DEFAULTS``; ``name`` picks another layers plugin.
    ``deq_stats()`` gives the last forward's solver stats (``deq/iters``, ``deq/abs_res``, ``deq/fallbacks``, ...).
    """

    fixed_point = True  # samplers may pass z0 / iters (solution reuse, budget reallocation)

    def __init__(
        self,
        *,
        n_pre: int = 1,
        n_post: int = 1,
        mlp_ratio: float = 8 / 3,
        bias: bool = True,
        deq: Mapping[str, Any] | None = None,
        **backbone: Any,
    ) -> None:
        super().__init__(**backbone)  # the options DiffusionTransformer names
        dim, n_heads, norm = self.dim, self.n_heads, self.norm
        for what, n in (("n_pre", n_pre), ("n_post", n_post)):
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise LowbitError(f"model.{what} must be an integer >= 0, got {n!r}")
        self.pre_blocks = nn.ModuleList(AdaLNBlock(dim, n_heads, mlp_ratio, bias, norm) for _ in range(n_pre))
        self.inject = nn.Linear(dim, dim)  # W_inj: the input injection, once per forward
        options = {**DEQ_DEFAULTS, **dict(deq or {})}
        self.fixed_point_layer = registry.build(
            "layers", options, f=FixedPointCell(dim, n_heads, mlp_ratio, bias, norm)
        )
        self.post_blocks = nn.ModuleList(AdaLNBlock(dim, n_heads, mlp_ratio, bias, norm) for _ in range(n_post))
        self._init_weights()

    @property
    def explicit_blocks(self) -> int:
        """Blocks evaluated once per denoising step (pre + post); the fixed-point iterations add to these."""
        return len(self.pre_blocks) + len(self.post_blocks)

    def deq_stats(self) -> dict[str, float]:
        """Solver stats of the last forward, keyed ``deq/...`` (empty before the first)."""
        return self.fixed_point_layer.stats_dict()

    def deq_aux_loss(self) -> torch.Tensor:
        """The layer's Jacobian regulariser of the last training forward (zero when off)."""
        return self.fixed_point_layer.jac_loss

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor | None = None,
        z0: torch.Tensor | None = None,
        iters: int | None = None,
        return_z: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """x (B, C, H, W), t (B,), y (B,) → ε̂ (B, C, H, W); z0 (B, N, D) warm-starts the solve, ``iters`` caps it."""
        H, W = x.shape[-2:]
        h, c, pos, mask = self.embed(x, t, y)  # (B, N, D), (B, D)
        for block in self.pre_blocks:
            h = block(h, c, pos, self.posenc, mask)
        inj = self.inject(h)  # (B, N, D)
        if z0 is not None and z0.shape != h.shape:
            raise LowbitError(f"FPDM z0 must be shaped like the tokens {tuple(h.shape)}, got {tuple(z0.shape)}")
        posenc: PositionalEncoding = self.posenc
        with _solver_budget(self.fixed_point_layer, iters), double_backward_attention(self.fixed_point_layer):
            z = self.fixed_point_layer((inj, c, pos, posenc, mask), z0=h if z0 is None else z0)  # (B, N, D)
        z_star = self.fixed_point_layer.last_z
        for block in self.post_blocks:
            z = block(z, c, pos, self.posenc, mask)
        eps = self.output(z, c, H, W)
        return (eps, z_star) if return_z else eps
