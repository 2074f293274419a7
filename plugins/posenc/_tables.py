"""Helpers shared by the positional encodings: a per-positions table cache and distances.

The trunk builds ``pos`` once per forward and hands the same tensor to ``bias`` and to every
attention layer's ``rotate``, so a table keyed on (positions, device, dtype) is built once per
forward and reused by every layer, and reused across forwards while the positions are equal.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch

from lowbit.errors import LowbitError

__all__ = ["PositionCache", "check_causal_positions", "pair_distances", "relative_positions"]


class PositionCache:
    """Remember a few values per (positions shape, device, dtype); reuse one while the same positions return.

    A hit needs the very same tensor (unchanged since) or an equal one. Values built under
    ``torch.inference_mode`` are never handed to code outside it (autograd cannot save them).
    Only non-learned tables belong here: anything depending on parameters is rebuilt per call.
    """

    def __init__(self, size: int = 4) -> None:
        self.size = size
        self._entries: OrderedDict[tuple, tuple[tuple[torch.Tensor, ...], tuple[int, ...], Any]] = OrderedDict()

    def get(self, positions: Sequence[torch.Tensor], dtype: torch.dtype | None, build: Callable[[], Any]) -> Any:
        positions = tuple(positions)
        key = (tuple(tuple(p.shape) for p in positions), positions[0].device, dtype)
        entry = self._entries.get(key)
        if entry is not None and self._same(entry, positions):
            self._entries.move_to_end(key)
            return entry[2]
        value = build()
        self._entries[key] = (positions, tuple(_version(p) for p in positions), value)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)
        return value

    @staticmethod
    def _same(entry: tuple, positions: tuple[torch.Tensor, ...]) -> bool:
        cached, versions, value = entry
        stale = (
            value.is_inference() if isinstance(value, torch.Tensor) else any(v.is_inference() for v in value)
        ) and not torch.is_inference_mode_enabled()
        if stale:
            return False
        return all((a is b and _version(a) == v) or torch.equal(a, b) for a, b, v in zip(cached, positions, versions))

    def clear(self) -> None:
        self._entries.clear()


def _version(t: torch.Tensor) -> int:
    """In-place edit counter (inference tensors have none and cannot be edited outside inference mode)."""
    return -1 if t.is_inference() else t._version


def relative_positions(q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """Signed 1-D offsets key − query, (Tq, Tk) long: negative for keys in the past (T5's convention)."""
    return k_pos[None, :] - q_pos[:, None]  # (Tq, Tk)


def pair_distances(q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """Distances between query and key positions, (Tq, Tk) float32: |i − j| in 1-D, Euclidean in 2-D."""
    if q_pos.dim() == 1:
        return relative_positions(q_pos, k_pos).abs().float()
    delta = k_pos[None, :, :].float() - q_pos[:, None, :].float()  # (Tq, Tk, 2)
    return delta.square().sum(-1).sqrt()


def check_causal_positions(name: str, causal: bool, pos: torch.Tensor) -> None:
    """A causal bias is defined over 1-D (text) positions only; image grids need causal=false."""
    if causal and pos.dim() != 1:
        raise LowbitError(
            f"{name} with causal=true takes 1-D (text) positions, got {pos.shape[-1]}-D; set causal: false for image grids"
        )
