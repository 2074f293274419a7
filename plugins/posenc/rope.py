"""Rotary position embedding (RoPE) for text and image grids, with context extension and xPos.

RoPE (Su et al. 2021, "RoFormer", eq. 34): channel pair i of a head at position n is rotated by
the angle n·ω_i with ω_i = θ^(−2i/d), so ⟨R_m q, R_n k⟩ depends on m − n only.

Which channels form pair i of a head's d rotary channels (``layout``):
  "half"         (i, i + d/2)  GPT-NeoX, HF Llama, timm ``rotate_half=True``
  "interleaved"  (2i, 2i + 1)  RoFormer, GPT-J, Meta's complex Llama, timm ``rotate_half=False``
Both rotate pair i by the same angle, so they agree after the channel permutation
``x_interleaved = x_half[..., half_to_interleaved(d)]`` (x_int[2i] = x_half[i], x_int[2i+1] = x_half[i + d/2]).

2-D (axial, as timm's ``RotaryEmbedding`` with ``in_pixels=False`` and EVA): the d/2 pair angles are
[row·ω, col·ω], ω the frequencies of a 1-D RoPE over d/2 channels: the first d/4 pairs encode the
row, the last d/4 the column (in "half" layout channels [0, d/4) ∪ [d/2, 3d/4) carry the row; in
"interleaved" layout channels [0, d/2) carry the row). Partial rotary (``fraction`` < 1) rotates the
first ``fraction``·head_dim channels of each head and passes the rest through (GPT-NeoX ``rotary_pct``).
"""

from __future__ import annotations

import math

import torch

from lowbit.errors import LowbitError
from lowbit.nn.posenc import PositionalEncoding
from lowbit.plugins.posenc._tables import PositionCache

__all__ = [
    "RoPE",
    "apply_rotary",
    "half_to_interleaved",
    "rope_frequencies",
    "scaled_frequencies",
    "xpos_decay",
    "yarn_attention_factor",
]

LAYOUTS = ("half", "interleaved")
SCALINGS = ("none", "pi", "ntk", "yarn")


# ---- functions -----------------------------------------------------------------------------------


def rope_frequencies(dim: int, theta: float) -> torch.Tensor:
    """ω_i = θ^(−2i/dim), i < dim/2 (RoFormer eq. 15), float64 (dim/2,)."""
    return theta ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)


def scaled_frequencies(
    dim: int,
    theta: float,
    scaling: str = "none",
    scale: float = 1.0,
    original_max_len: int | None = None,
    yarn_alpha: float = 1.0,
    yarn_beta: float = 32.0,
) -> torch.Tensor:
    """Rotary frequencies (dim/2,) float64 under a context-extension scaling by factor s = ``scale``.

    pi:   ω_i / s, i.e. positions divided by s (Chen et al. 2023, "Position Interpolation").
    ntk:  base θ' = θ·s^(d/(d−2)) ("NTK-aware" scaling, bloc97 2023).
    yarn: ω'_i = (1−γ_i)·ω_i/s + γ_i·ω_i, γ_i a linear ramp of r_i = L/λ_i, λ_i = 2π/ω_i, from 0 at
          r ≤ α to 1 at r ≥ β (Peng et al. 2023, "YaRN", eqs. 17-19; L = original_max_len).
    """
    omega = rope_frequencies(dim, theta)
    if scaling == "none":
        return omega
    if scaling == "pi":
        return omega / scale
    if scaling == "ntk":
        return rope_frequencies(dim, theta * scale ** (dim / (dim - 2)))
    if scaling == "yarn":
        ratio = original_max_len * omega / (2 * math.pi)  # r_i = L / λ_i: turns made over the training length
        gamma = ((ratio - yarn_alpha) / (yarn_beta - yarn_alpha)).clamp(0.0, 1.0)
        return (1 - gamma) * omega / scale + gamma * omega
    raise LowbitError(f"unknown rope scaling '{scaling}'; valid: {', '.join(SCALINGS)}")


def yarn_attention_factor(scale: float) -> float:
    """YaRN's temperature as a factor on q and k each: sqrt(1/t) = 0.1·ln(s) + 1 (Peng et al. 2023, eq. 22)."""
    return 0.1 * math.log(scale) + 1.0 if scale > 1 else 1.0


def xpos_decay(dim: int, gamma: float = 0.4) -> torch.Tensor:
    """xPos per-pair decay ζ_i = (2i/d + γ)/(1 + γ), float64 (dim/2,) (Sun et al. 2022, eq. 11)."""
    return (torch.arange(0, dim, 2, dtype=torch.float64) / dim + gamma) / (1 + gamma)


def half_to_interleaved(dim: int) -> torch.Tensor:
    """Channel index so that ``x[..., idx]`` turns a "half" layout vector into the "interleaved" one."""
    half = torch.arange(dim // 2)
    return torch.stack([half, half + dim // 2], dim=-1).flatten()  # [0, d/2, 1, d/2+1, ...]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: str = "half") -> torch.Tensor:
    """Rotate channel pairs of x (..., T, d) by the angles whose cos/sin are (T, d/2), pair order."""
    if layout == "half":
        x1, x2 = x.chunk(2, dim=-1)  # pair i = (i, i + d/2)
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    x1, x2 = x[..., 0::2], x[..., 1::2]  # pair i = (2i, 2i + 1)
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)


def _training_length(ndim: int, max_len: int | None, grid: tuple[int, int] | None) -> int | None:
    """Training extent per axis: max_len for text; the longer grid side for images."""
    if ndim == 1:
        return max_len
    if grid is not None:
        return max(grid)
    return math.isqrt(max_len) if max_len else None


# ---- module --------------------------------------------------------------------------------------


class RoPE(PositionalEncoding):
    """Rotary embedding on q and k, 1-D or axial 2-D, with PI / NTK / YaRN scaling and optional xPos.

    Args (context): head_dim; max_len and grid give YaRN's training length when original_max_len is unset.
    Options:
        theta: base θ of the frequencies.
        fraction: share of each head's channels that rotate (partial rotary); the rest pass through.
        layout: "half" (pairs (i, i+d/2), GPT-NeoX) or "interleaved" (pairs (2i, 2i+1), GPT-J).
        scaling: "none", "pi", "ntk" or "yarn" context extension by factor ``scale``.
        scale: the extension factor s (only with a scaling).
        original_max_len: YaRN's training length L (per axis for grids); default max_len (1-D), max(grid) (2-D).
        yarn_alpha, yarn_beta: YaRN's ramp bounds α, β on r = L/λ.
        xpos: multiply q by ζ^(n/scale_base) and k by ζ^(−n/scale_base) (Sun et al. 2022); 1-D only.
        scale_base: xPos's scale base.
    In 2-D each axis is a 1-D RoPE over half the rotary channels, so d in the scaling formulas is d/2.
    """

    lowbit_plugin_api = 1
    pos_dims = (1, 2)

    def __init__(
        self,
        head_dim: int,
        max_len: int | None = None,
        grid: tuple[int, int] | None = None,
        theta: float = 10000.0,
        fraction: float = 1.0,
        layout: str = "half",
        scaling: str = "none",
        scale: float = 1.0,
        original_max_len: int | None = None,
        yarn_alpha: float = 1.0,
        yarn_beta: float = 32.0,
        xpos: bool = False,
        scale_base: float = 512.0,
    ) -> None:
        super().__init__()
        if head_dim % 2:
            raise LowbitError(f"rope needs an even head_dim, got {head_dim}; pick dim/n_heads even")
        if not 0 < fraction <= 1:
            raise LowbitError(f"rope fraction must be in (0, 1], got {fraction}")
        rotary_dim = int(head_dim * fraction)
        if rotary_dim == 0 or rotary_dim % 2:
            raise LowbitError(
                f"rope rotates fraction·head_dim = {fraction}·{head_dim} = {rotary_dim} channels; that must be a positive even number"
            )
        if layout not in LAYOUTS:
            raise LowbitError(f"unknown rope layout '{layout}'; valid: {', '.join(LAYOUTS)}")
        if scaling not in SCALINGS:
            raise LowbitError(f"unknown rope scaling '{scaling}'; valid: {', '.join(SCALINGS)}")
        if theta <= 0 or scale_base <= 0:
            raise LowbitError(f"rope theta and scale_base must be positive, got theta={theta}, scale_base={scale_base}")
        if scaling == "none" and scale != 1:
            raise LowbitError(f"rope scale={scale} has no effect with scaling='none'; set scaling to pi, ntk or yarn")
        if scaling != "none" and scale < 1:
            raise LowbitError(f"rope scale is a context-extension factor s ≥ 1, got {scale}")
        if scaling == "yarn" and not 0 <= yarn_alpha < yarn_beta:
            raise LowbitError(
                f"rope YaRN ramp needs 0 ≤ yarn_alpha < yarn_beta, got yarn_alpha={yarn_alpha}, yarn_beta={yarn_beta}; the paper uses 1 and 32"
            )
        if original_max_len is not None and original_max_len < 1:
            raise LowbitError(f"rope original_max_len is a training length ≥ 1, got {original_max_len}")
        if grid is not None and rotary_dim % 4:
            raise LowbitError(
                f"2-D rope splits its {rotary_dim} rotary channels into row and column pairs; that must divide by 4"
            )
        if grid is not None and xpos:
            raise LowbitError("rope xpos is defined for 1-D (text) positions; set xpos: false for image grids")
        self.head_dim, self.rotary_dim, self.layout, self.xpos = head_dim, rotary_dim, layout, xpos
        self.scaling, self.scale, self.scale_base = scaling, scale, scale_base
        self.attention_factor = yarn_attention_factor(scale) if scaling == "yarn" else 1.0

        # frequencies per position dimensionality, float64 on the CPU (never downcast by .to(bf16))
        self._freqs: dict[int, torch.Tensor] = {}
        self._refused: dict[int, str] = {}  # why a dimensionality cannot be served
        for ndim, axis_dim in ((1, rotary_dim), (2, rotary_dim // 2)):
            length = original_max_len or _training_length(ndim, max_len, grid)
            if axis_dim % 2:
                why = (
                    f"2-D rope splits its {rotary_dim} rotary channels into row and column pairs; that must divide by 4"
                )
            elif scaling == "ntk" and axis_dim <= 2:
                why = f"rope scaling='ntk' needs more than 2 rotary channels per axis, got {axis_dim}"
            elif scaling == "yarn" and length is None:
                why = "rope scaling='yarn' needs original_max_len (the training length)"
            else:
                self._freqs[ndim] = scaled_frequencies(axis_dim, theta, scaling, scale, length, yarn_alpha, yarn_beta)
                continue
            if ndim == 1:
                raise LowbitError(why)
            self._refused[ndim] = why
        self._zeta = xpos_decay(rotary_dim)
        self._cache = PositionCache()

    def inv_freq(self, ndim: int = 1) -> torch.Tensor:
        """The (scaled) rotary frequencies used for positions of this dimensionality, float64 (pairs per axis,)."""
        self._check(ndim)
        return self._freqs[ndim]

    def _check(self, ndim: int) -> None:
        if ndim == 2 and self.xpos:
            raise LowbitError("rope xpos is defined for 1-D (text) positions; set xpos: false for image grids")
        if ndim in self._refused:
            raise LowbitError(self._refused[ndim])

    def _tables(self, pos: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """cos/sin for q and for k, each (T, rotary_dim/2) in pair order, scaled by YaRN's factor and xPos."""
        ndim = 1 if pos.dim() == 1 else pos.shape[-1]
        freqs = self._freqs[ndim].to(device=pos.device, dtype=torch.float32)
        p = pos.float().reshape(pos.shape[0], -1)  # (T, M), M = 1 or 2 axes
        angles = (p[:, :, None] * freqs).flatten(1)  # (T, M, d/2M) → (T, d/2): row pairs, then col pairs
        cos, sin = angles.cos() * self.attention_factor, angles.sin() * self.attention_factor
        if not self.xpos:
            return tuple(t.to(dtype) for t in (cos, sin, cos, sin))
        # ζ^(n/B) on q, ζ^(−n/B) on k; positions centred first (only n − m survives) so ζ^n stays finite
        zeta = self._zeta.to(device=pos.device, dtype=torch.float32)
        up = zeta ** ((p - p.mean()) / self.scale_base)  # (T, 1) → (T, d/2)
        return tuple(t.to(dtype) for t in (cos * up, sin * up, cos / up, sin / up))

    def rotate(self, q: torch.Tensor, k: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q, k (B, nh, T, hs) → rotated (q, k); pos (T,) or (T, 2)."""
        self.check_positions(pos)
        self._check(1 if pos.dim() == 1 else pos.shape[-1])
        if q.shape[-1] != self.head_dim or k.shape[-1] != self.head_dim:
            raise LowbitError(
                f"rope was built for head_dim {self.head_dim}, got q/k with {q.shape[-1]}/{k.shape[-1]} channels"
            )
        cos_q, sin_q, cos_k, sin_k = self._cache.get((pos,), q.dtype, lambda: self._tables(pos, q.dtype))
        r = self.rotary_dim
        q_rot = apply_rotary(q[..., :r], cos_q, sin_q, self.layout)  # (B, nh, T, r)
        k_rot = apply_rotary(k[..., :r], cos_k, sin_k, self.layout)  # (B, nh, T, r)
        if r < self.head_dim:  # partial rotary: the other channels carry no position
            q_rot = torch.cat([q_rot, q[..., r:]], dim=-1)
            k_rot = torch.cat([k_rot, k[..., r:]], dim=-1)
        return q_rot, k_rot

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, rotary_dim={self.rotary_dim}, layout={self.layout}, scaling={self.scaling}, scale={self.scale}, xpos={self.xpos}"
