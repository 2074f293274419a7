"""Rounding a non-negative float32 tensor to integers: nearest-even, ties-away, stochastic.

Every format in lowbit rounds the same way: scale the magnitude by an exact power of two so
the representable values become the integers, round to an integer here, and scale back.
Because the scaling is exact, rounding the scaled value *is* rounding to the format.

Stochastic rounding (SR) rounds ``y`` up with probability ``y - floor(y)`` and down otherwise,
so ``E[SR(y)] = y`` and the result is always one of the two neighbouring integers. The uniform
draw is float64 (53 random bits), so the probability is exact whenever ``y - floor(y)`` is a
multiple of 2^-53; every float32 fraction in a format's normal range is.
"""

from __future__ import annotations

import torch

from lowbit.errors import LowbitError

__all__ = ["ROUNDING_MODES", "check_rounding", "make_generator", "round_to_integer"]

ROUNDING_MODES = ("rne", "ta", "sr")
"""``rne``: round to nearest, ties to even (IEEE 754 default). ``ta``: nearest, ties away from
zero (HiFloat8's TA). ``sr``: stochastic rounding, unbiased."""


def check_rounding(rounding: str, valid: tuple[str, ...] = ROUNDING_MODES) -> str:
    """Return ``rounding`` if it is one of ``valid``; otherwise a clear error."""
    if rounding not in valid:
        raise LowbitError(f"unknown rounding '{rounding}'; valid: {', '.join(valid)}")
    return rounding


def make_generator(
    generator: torch.Generator | None, seed: int | None, device: torch.device | str
) -> torch.Generator | None:
    """The generator for stochastic rounding: the one given, a fresh one seeded with ``seed``,
    or ``None`` (torch's global generator, reproducible through ``torch.manual_seed``)."""
    if generator is not None and seed is not None:
        raise LowbitError("pass either generator or seed for stochastic rounding, not both")
    if generator is not None:
        return generator
    if seed is None:
        return None
    gen = torch.Generator(device=torch.device(device))
    gen.manual_seed(int(seed))
    return gen


def round_to_integer(y: torch.Tensor, rounding: str = "rne", generator: torch.Generator | None = None) -> torch.Tensor:
    """Round a non-negative, finite float32 tensor to integer values (still float32).

    ``y`` must be below 2^24 so every integer near it is exact in float32; callers scale
    into that range first. ``generator`` is used by ``sr`` only.
    """
    if rounding == "rne":
        return torch.round(y)  # torch.round is round-half-to-even
    floor = torch.floor(y)
    frac = y - floor  # exact: floor(y) and y share y's binade or floor is 0
    if rounding == "ta":
        return floor + (frac >= 0.5).to(y.dtype)
    if rounding == "sr":
        u = torch.rand(y.shape, generator=generator, dtype=torch.float64, device=y.device)
        return floor + (u < frac.to(torch.float64)).to(y.dtype)
    raise LowbitError(f"unknown rounding '{rounding}'; valid: {', '.join(ROUNDING_MODES)}")
