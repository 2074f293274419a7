"""KERPLE: kernelized relative positional bias (Chi et al. 2022, NeurIPS), logarithmic and power variants.

A conditionally positive definite kernel of the distance, per head, with learnable r1, r2 (eq. 5):
  log:    −r1·log(1 + r2·|i − j|)      r1, r2 > 0
  power:  −r1·|i − j|^r2               r1 > 0, 0 < r2 ≤ 2
The constraints are kept as the official code does: the stored parameters are clamped into range
in place before each use (so a large optimizer step cannot leave them outside, and they keep
receiving gradients), and the bias is computed from the clamped values. On image grids |i − j| is
the Euclidean distance between (row, col) positions.
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.nn.posenc import PositionalEncoding
from lowbit.plugins.posenc._tables import PositionCache, check_causal_positions, pair_distances

__all__ = ["KERPLE", "kerple_bias"]

VARIANTS = ("log", "power")


# ---- functions -----------------------------------------------------------------------------------


def kerple_bias(distance: torch.Tensor, r1: torch.Tensor, r2: torch.Tensor, variant: str = "log") -> torch.Tensor:
    """distance (Tq, Tk) float, r1 and r2 (nh,) → bias (nh, Tq, Tk) (Chi et al. 2022, eq. 5)."""
    d = distance[None]  # (1, Tq, Tk)
    r1, r2 = r1[:, None, None], r2[:, None, None]  # (nh, 1, 1)
    if variant == "log":
        return -r1 * torch.log1p(r2 * d)
    # d^r2 with d = 0 has a NaN gradient in r2 (0·log 0); those entries are exactly 0
    positive = d > 0
    return -r1 * torch.where(positive, torch.where(positive, d, 1.0) ** r2, 0.0)


# ---- module --------------------------------------------------------------------------------------


class KERPLE(PositionalEncoding):
    """Learnable per-head kernel bias (nh, Tq, Tk); Euclidean distance on image grids.

    Args (context): n_heads.
    Options:
        variant: "log" (−r1·log(1 + r2·d), the paper's best) or "power" (−r1·d^r2).
        causal: text only; keys after the query get 0 (the trunk's causal mask hides them). False for encoders/images.
        eps: lower bound kept on r1 and r2 (the official code's 1e-2).
    """

    lowbit_plugin_api = 1
    pos_dims = (1, 2)

    def __init__(self, n_heads: int, variant: str = "log", causal: bool = True, eps: float = 1e-2) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise LowbitError(f"unknown kerple variant '{variant}'; valid: {', '.join(VARIANTS)}")
        if not 0 < eps < 1:
            raise LowbitError(f"kerple eps is the lower bound kept on r1, r2; it must be in (0, 1), got {eps}")
        self.n_heads, self.variant, self.causal, self.eps = n_heads, variant, causal, eps
        self.r2_max = 2.0 if variant == "power" else float("inf")
        self.r1 = nn.Parameter(torch.empty(n_heads))  # (nh,) kernel scale
        self.r2 = nn.Parameter(torch.empty(n_heads))  # (nh,) log: distance scale; power: exponent
        self._cache = PositionCache()
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """log: r1 ~ U(0, 2), r2 ~ U(0, 1) as the official code; power: r1 ~ U(0, 1), r2 ~ U(0, 2) (its whole range)."""
        r1_high, r2_high = (2.0, 1.0) if self.variant == "log" else (1.0, 2.0)
        self.r1.uniform_(0.0, r1_high)
        self.r2.uniform_(0.0, r2_high)
        self._project()

    def _project(self) -> None:
        # ``.data`` as the official code: no version bump, so graphs of earlier forwards stay valid;
        # skipped under inference_mode (an inference tensor must not become a parameter's data)
        if torch.is_inference_mode_enabled():
            return
        self.r1.data = self.r1.data.clamp(min=self.eps)
        self.r2.data = self.r2.data.clamp(min=self.eps, max=self.r2_max)

    def effective_params(self) -> dict[str, torch.Tensor]:
        """The r1, r2 the bias uses, (nh,) each, always inside the paper's ranges."""
        return {"r1": self.r1.clamp(min=self.eps), "r2": self.r2.clamp(min=self.eps, max=self.r2_max)}

    def _distance(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        distance = pair_distances(q_pos, k_pos)  # (Tq, Tk)
        if self.causal:
            distance = distance.masked_fill(k_pos[None, :] > q_pos[:, None], 0.0)
        return distance

    def bias(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """Kernel bias (nh, Tq, Tk) in the parameters' dtype; distances cached, the kernel rebuilt per call."""
        self.check_positions(q_pos)
        self.check_positions(k_pos)
        check_causal_positions("kerple", self.causal, q_pos)
        self._project()  # a step may have pushed r1, r2 out of range
        distance = self._cache.get((q_pos, k_pos), None, lambda: self._distance(q_pos, k_pos))
        params = self.effective_params()
        return kerple_bias(distance.to(self.r1.dtype), params["r1"], params["r2"], self.variant)

    def extra_repr(self) -> str:
        return f"n_heads={self.n_heads}, variant={self.variant}, causal={self.causal}"
