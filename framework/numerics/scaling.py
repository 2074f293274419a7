"""FP8 scaling: amax -> scale for current (just-in-time) and delayed scaling.

Conventions follow NVIDIA Transformer Engine: the *scale* multiplies the high-precision tensor
before the cast (``q = cast(x * scale)``), so ``scale = fmt_max / amax / 2^margin``; its
reciprocal ``scale_inv`` multiplies the decoded values. QTensor stores ``scale_inv`` (decode
scales) in ``QTensor.scales``.

Special cases (TE's ``compute_scale_from_amax``): amax == 0 gives scale 1; a scale that
overflows float32 (tiny amax) becomes FLT_MAX; a NaN or Inf amax gives scale 1, so the NaN/Inf
elements show up in the result instead of poisoning the whole tensor. ``pow2`` rounds the
scale down to a power of two (TE's ``power_2_scale``), so scaling is exact.
"""

from __future__ import annotations

import torch

from lowbit.errors import LowbitError
from lowbit.numerics.formats import FLT_MAX

__all__ = [
    "DelayedScaling",
    "amax_from_history",
    "current_scale",
    "roll_amax_history",
    "round_scale_to_pow2",
    "tensor_amax",
]


def tensor_amax(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """max |x| as float32 (over everything, or along ``dim`` keeping it); NaN propagates; +0 for
    all zeros (max(-0, +0) may be -0, which made NVFP4's global scale -Inf and the tensor NaN)."""
    if not x.numel():
        return torch.zeros((), dtype=torch.float32)
    if dim is None:
        lo, hi = torch.aminmax(x)
    else:
        lo, hi = torch.aminmax(x, dim=dim, keepdim=True)
    amax = torch.maximum(hi.float(), -lo.float())
    return torch.where(amax == 0, 0.0, amax)


def round_scale_to_pow2(scale: torch.Tensor) -> torch.Tensor:
    """Largest power of two <= scale (positive, normal float32 scales): clear the mantissa bits."""
    return (scale.float().view(torch.int32) & ~0x7FFFFF).view(torch.float32)


def current_scale(
    amax: torch.Tensor | float, fmt_max: float | torch.Tensor, *, margin: int = 0, pow2: bool = False
) -> torch.Tensor:
    """Encode scale ``fmt_max / amax / 2^margin`` (float32), TE current scaling; see module doc.
    ``fmt_max`` may be a 0-d float32 tensor (a compiled graph's input)."""
    amax = torch.as_tensor(amax, dtype=torch.float32)
    scale = torch.as_tensor(fmt_max, dtype=torch.float32, device=amax.device) / amax
    if margin:
        scale = scale / float(2**margin)
    scale = torch.clamp(scale, max=FLT_MAX)  # amax tiny: scale overflowed to Inf
    scale = torch.where((amax == 0) | ~torch.isfinite(amax), 1.0, scale)
    return round_scale_to_pow2(scale) if pow2 else scale


def roll_amax_history(history: torch.Tensor, amax: torch.Tensor | float) -> torch.Tensor:
    """New history with ``amax`` as the most recent entry (index 0), oldest dropped (TE layout)."""
    new = torch.roll(history, 1, dims=0)
    new[0] = torch.as_tensor(amax, dtype=history.dtype, device=history.device)
    return new


def amax_from_history(history: torch.Tensor, amax_compute: str = "max") -> torch.Tensor:
    """The amax delayed scaling uses: ``max`` over the window, or ``most_recent`` (index 0)."""
    if amax_compute == "max":
        return history.amax(dim=0)
    if amax_compute == "most_recent":
        return history[0]
    raise LowbitError(f"unknown amax_compute '{amax_compute}'; valid: max, most_recent")


class DelayedScaling:
    """Delayed scaling state for one tensor (TE ``DelayedScaling``): the scale used at step t is
    computed from the amax history of steps before t.

    ``observe(amax)`` records this step's amax; ``update()`` recomputes ``scale`` from the
    history (keeping the previous scale where the history's amax is 0 or not finite, as TE).
    ``state_dict`` / ``load_state_dict`` save ``amax_history`` and ``scale``.
    """

    def __init__(
        self,
        fmt_max: float,
        *,
        history_len: int = 1024,
        amax_compute: str = "max",
        margin: int = 0,
        pow2: bool = False,
        device: torch.device | str = "cpu",
    ) -> None:
        if history_len < 1:
            raise LowbitError(f"history_len must be >= 1, got {history_len}")
        amax_from_history(torch.zeros(1), amax_compute)  # validate the name early
        self.fmt_max = float(fmt_max)
        self.amax_compute = amax_compute
        self.margin = int(margin)
        self.pow2 = bool(pow2)
        self.amax_history = torch.zeros(history_len, dtype=torch.float32, device=device)
        self.scale = torch.ones((), dtype=torch.float32, device=device)

    @property
    def scale_inv(self) -> torch.Tensor:
        return 1.0 / self.scale

    def observe(self, amax: torch.Tensor | float) -> None:
        """Record the amax of the tensor quantized at this step."""
        self.amax_history = roll_amax_history(self.amax_history, amax)

    def update(self) -> torch.Tensor:
        """Recompute ``scale`` from the history and return it."""
        amax = amax_from_history(self.amax_history, self.amax_compute)
        new = current_scale(amax, self.fmt_max, margin=self.margin, pow2=self.pow2)
        self.scale = torch.where((amax > 0) & torch.isfinite(amax), new, self.scale)
        return self.scale

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"amax_history": self.amax_history.clone(), "scale": self.scale.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.amax_history = state["amax_history"].clone()
        self.scale = state["scale"].clone()
