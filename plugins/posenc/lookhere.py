"""LookHere: directed 2-D attention masks plus a distance penalty (Fuller et al., NeurIPS 2024,
"LookHere: Vision Transformers with Directed Attention Generalize and Extrapolate", arXiv:2405.13985).

Each head looks in one direction: a key outside the head's field of view (FOV) is masked, a key inside
it is penalised by the head's slope times the Euclidean patch distance, as 2-D ALiBi does. Some heads
see every direction (distance penalty only). A patch always sees itself (distance 0, inside every cone).

With δ = (col_j − col_i, row_i − row_j) the offset from query patch i to key patch j (y points up, to
row 0), head h with cone [α_h, β_h] (β_h − α_h = FOV, both boundary rays included) adds

    B[h, i, j] = −g · s_h · ‖p_j − p_i‖₂   if δ = 0 or angle(δ) ∈ [α_h, β_h],   −∞ otherwise,

g the global slope and s_h the head slope. Heads are laid out as the authors' code
(github.com/GreenCUBIC/lookhere, ``lookhere.py``) and their configs (github.com/DanielKyr/mmsegmentation,
``configs/lookhere/LH{2,4,8}-ADE.py``: ``halves-diagonals-none``, ``corners-triangles-none``,
``eighths1-eighths2-none``, global slope 2): per FOV two families of four cones, each family's copy c
with s_h = 2^−(c+1), then the all-direction heads with s_h = 1/4, 1/16, 1/64, 1/256. The reference
stores the bias in bf16 with −bf16max for masked keys; here it is float32 with −inf (the trunk casts it).
"""

from __future__ import annotations

import math

import torch

from lowbit.errors import LowbitError
from lowbit.nn.posenc import PositionalEncoding
from lowbit.plugins.posenc._tables import PositionCache, pair_distances

__all__ = ["LookHere", "auto_layout", "cone_mask", "head_layout", "lookhere_bias"]

FOVS = (180, 90, 45)
DIRECTIONS = (4, 8)

# the ray k·45° counterclockwise from "right" (east), as an integer (x, y) = (Δcol, −Δrow) vector
_RAYS = ((1, 0), (1, 1), (0, 1), (-1, 1), (-1, 0), (-1, -1), (0, -1), (1, -1))

# per FOV the two families of four cones (compass name, first ray, last ray; rays in units of 45°), in the
# reference's head order: LH-180 halves then diagonal halves, LH-90 quadrants then axis cones, LH-45 the
# eighths1 then the eighths2 wedges
_FAMILIES: dict[int, tuple[tuple[tuple[str, int, int], ...], ...]] = {
    180: (
        (("N", 0, 4), ("S", 4, 8), ("W", 2, 6), ("E", -2, 2)),
        (("NE", -1, 3), ("NW", 1, 5), ("SE", 5, 9), ("SW", 3, 7)),
    ),
    90: (
        (("NW", 2, 4), ("NE", 0, 2), ("SW", 4, 6), ("SE", 6, 8)),
        (("N", 1, 3), ("S", 5, 7), ("W", 3, 5), ("E", -1, 1)),
    ),
    45: (
        (("NNW", 2, 3), ("SSW", 5, 6), ("WNW", 3, 4), ("ENE", 0, 1)),
        (("NNE", 1, 2), ("SSE", 6, 7), ("WSW", 4, 5), ("ESE", 7, 8)),
    ),
}
_ALL_DIRECTION_SLOPES = (1 / 4, 1 / 16, 1 / 64, 1 / 256)  # the reference's slopes for its unmasked heads


# ---- functions -----------------------------------------------------------------------------------


def auto_layout(n_heads: int, fov: int, directions: int | str, unmasked_heads: int | str) -> tuple[int, int]:
    """(directions, unmasked_heads) with ``"auto"`` resolved for ``n_heads``: eight directions when there
    are 8 heads or more (or fov=45), else four; the heads left over after whole copies of the cones see
    every direction. 12 heads give the paper's layout (8 directed + 4 all-direction), 4 heads one cone each."""
    if n_heads < 4:
        raise LowbitError(f"lookhere needs at least 4 heads (one per direction of its cones), got n_heads={n_heads}")
    if directions == "auto":
        directions = 8 if fov == 45 or n_heads >= 8 else 4
    if unmasked_heads == "auto" and directions in DIRECTIONS:
        unmasked_heads = n_heads % directions
    return directions, unmasked_heads


def head_layout(
    n_heads: int, fov: int = 180, directions: int | str = "auto", unmasked_heads: int | str = "auto"
) -> list[tuple[str, tuple[int, int] | None, float]]:
    """Per head (name, cone as (first, last) ray in units of 45° or None for all directions, head slope s_h).

    n_heads = unmasked_heads + k · directions (k ≥ 1 copies of each cone; copy c has s_h = 2^−(c+1));
    ``"auto"`` as ``auto_layout``.
    """
    directions, unmasked_heads = auto_layout(n_heads, fov, directions, unmasked_heads)
    if fov not in FOVS:
        raise LowbitError(f"unknown lookhere fov {fov!r}; valid: 180, 90, 45 (LH-180, LH-90, LH-45; degrees)")
    if directions not in DIRECTIONS:
        raise LowbitError(f"unknown lookhere directions {directions!r}; valid: 4, 8 (cones per copy), auto")
    if fov == 45 and directions == 4:
        raise LowbitError("lookhere fov=45 needs directions=8: four 45° cones leave half the directions unseen")
    if isinstance(unmasked_heads, bool) or not isinstance(unmasked_heads, int) or unmasked_heads < 0:
        raise LowbitError(f"lookhere unmasked_heads must be an integer >= 0 or auto, got {unmasked_heads!r}")
    if unmasked_heads > 4 and unmasked_heads % 4:
        raise LowbitError(f"lookhere unmasked_heads must be 0-4 or a multiple of 4, got {unmasked_heads}")
    copies, rest = divmod(n_heads - unmasked_heads, directions)
    if copies < 1 or rest:
        valid = ", ".join(str(unmasked_heads + k * directions) for k in (1, 2, 3))
        hint = "; e.g. 4 heads: posenc.directions=4 posenc.unmasked_heads=0" if fov != 45 else ""
        raise LowbitError(
            f"lookhere with directions={directions}, unmasked_heads={unmasked_heads} needs "
            f"n_heads = {unmasked_heads} + {directions}·k ({valid}, ...), got n_heads={n_heads}{hint}"
        )
    layout = []
    for family in _FAMILIES[fov][: directions // 4]:
        for c in range(copies):
            layout += [(name, (first, last), 2.0 ** -(c + 1)) for name, first, last in family]
    if unmasked_heads <= 4:
        unmasked = _ALL_DIRECTION_SLOPES[:unmasked_heads]
    else:  # as the reference's np.repeat: each slope for a quarter of the heads
        unmasked = [s for s in _ALL_DIRECTION_SLOPES for _ in range(unmasked_heads // 4)]
    return layout + [("all", None, s) for s in unmasked]


def _cross(u: tuple[int, int], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """z-component of u × (x, y): ≥ 0 where (x, y) lies counterclockwise of u, within 180°."""
    return u[0] * y - u[1] * x


def cone_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, cone: tuple[int, int] | None) -> torch.Tensor:
    """(Tq, Tk) bool: key j inside query i's cone [first, last] (rays in units of 45°, both included).

    Exact integer test: δ lies counterclockwise of the first ray and clockwise of the last ray; δ = 0 passes.
    """
    x = k_pos[None, :, 1] - q_pos[:, None, 1]  # (Tq, Tk) Δcol, to the right
    y = q_pos[:, None, 0] - k_pos[None, :, 0]  # (Tq, Tk) −Δrow, upwards
    if cone is None:
        return torch.ones(x.shape, dtype=torch.bool, device=x.device)
    first, last = _RAYS[cone[0] % 8], _RAYS[cone[1] % 8]
    return (_cross(first, x, y) >= 0) & (-_cross(last, x, y) >= 0)


def lookhere_bias(
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    layout: list[tuple[str, tuple[int, int] | None, float]],
    global_slope: float,
) -> torch.Tensor:
    """(nh, Tq, Tk) float32: −g · s_h · Euclidean distance inside each head's cone, −inf outside."""
    distance = pair_distances(q_pos, k_pos)  # (Tq, Tk)
    cones = {cone: cone_mask(q_pos, k_pos, cone) for _, cone, _ in layout}  # at most 9 distinct masks
    seen = torch.stack([cones[cone] for _, cone, _ in layout])  # (nh, Tq, Tk)
    slopes = torch.tensor([global_slope * s for _, _, s in layout], dtype=torch.float32, device=distance.device)
    return (-slopes[:, None, None] * distance).masked_fill(~seen, float("-inf"))


# ---- module --------------------------------------------------------------------------------------


class LookHere(PositionalEncoding):
    """Directed attention masks with a per-head distance penalty, (nh, Tq, Tk); 2-D image grids only.

    Args (context): n_heads.
    Options:
        fov: each directed head's field of view in degrees: 180 (LH-180, the default), 90 (LH-90) or 45 (LH-45).
        directions: cones per copy: 8 (the paper's: four axis and four diagonal directions; the eight
            45° wedges for fov=45), 4 (one family: N, S, W, E halves for 180, the quadrants for 90), or
            auto (the default: 8 with 8 heads or more, else 4).
        unmasked_heads: heads that see every direction with distance penalty only (the paper's 4 of 12);
            auto (the default): the heads left after whole copies of the cones (n_heads mod directions).
        global_slope: g; 2 as the authors' configs (the reference also scales layer l by a slope running
            1.5 → 0.5 over depth, mean 1; the trunk shares one bias between layers, so lowbit uses the mean).
    The default is LH-180; with 12 heads (ViT-B) the paper's layout: N, S, W, E, NE, NW, SE, SW halves and 4
    all-direction heads; with 4 heads (lowbit's small ViT recipes) the N, S, W, E halves.
    A class token (ViT ``pool: cls``) is unmasked and unpenalised to and from every patch, as in the reference.
    """

    lowbit_plugin_api = 1
    pos_dims = (2,)

    def __init__(
        self,
        n_heads: int,
        fov: int = 180,
        directions: int | str = "auto",
        unmasked_heads: int | str = "auto",
        global_slope: float = 2.0,
    ) -> None:
        super().__init__()
        if isinstance(global_slope, bool) or not isinstance(global_slope, (int, float)) or not global_slope >= 0:
            raise LowbitError(f"lookhere global_slope must be a number >= 0 (0: masks only), got {global_slope!r}")
        if not math.isfinite(global_slope):
            raise LowbitError(f"lookhere global_slope must be finite, got {global_slope!r}")
        directions, unmasked_heads = auto_layout(n_heads, fov, directions, unmasked_heads)
        self.layout = head_layout(n_heads, fov, directions, unmasked_heads)
        self.n_heads, self.fov, self.directions = n_heads, fov, directions
        self.unmasked_heads, self.global_slope = unmasked_heads, float(global_slope)
        self._cache = PositionCache()

    def check_positions(self, pos: torch.Tensor) -> None:
        """Only (T, 2) (row, col) grid positions: text has no directions to look in."""
        if pos.dim() != 2 or pos.shape[-1] != 2:
            got = "1-D (text)" if pos.dim() == 1 else f"shape {tuple(pos.shape)}"
            raise LowbitError(
                f"positional encoding lookhere takes 2-D (row, col) image-grid positions, got {got} positions; "
                "use it in a model with a patch grid (vit, deq_vit, dit)"
            )

    def _bias(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        bias = lookhere_bias(q_pos, k_pos, self.layout, self.global_slope)  # (nh, Tq, Tk)
        blind = ~torch.isfinite(bias).any(-1)  # (nh, Tq): a query that sees no key would give NaN
        if blind.any():
            h, i = (int(v) for v in blind.nonzero()[0])
            raise LowbitError(
                f"lookhere: query at (row, col) {tuple(q_pos[i].tolist())} sees no key in head {h} "
                f"({self.layout[h][0]}); every query's own position must be among the keys"
            )
        return bias

    def bias(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """(nh, Tq, Tk) float32, −inf outside each head's cone; built once per positions and reused."""
        self.check_positions(q_pos)
        self.check_positions(k_pos)
        return self._cache.get((q_pos, k_pos), None, lambda: self._bias(q_pos, k_pos))

    def extra_repr(self) -> str:
        return (
            f"n_heads={self.n_heads}, fov={self.fov}, directions={self.directions}, "
            f"unmasked_heads={self.unmasked_heads}, global_slope={self.global_slope}"
        )
