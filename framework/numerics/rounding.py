"""Rounding a non-negative float32 tensor to integers: nearest-even, ties-away, stochastic.

Every format in lowbit rounds the same way: scale the magnitude by an exact power of two so
the representable values become the integers, round to an integer here, and scale back.
Because the scaling is exact, rounding the scaled value *is* rounding to the format.

Stochastic rounding (SR) rounds ``y`` up with probability ``y - floor(y)`` and down otherwise,
so ``E[SR(y)] = y`` and the result is always one of the two neighbouring integers. Each element
draws 31 uniform random bits ``r`` and rounds up where ``r < floor(frac * 2^31)`` (the rule of
lowbit's Triton kernels, and of hardware SR, which also compares a fixed number of random bits):
the probability is exact whenever ``frac`` is a multiple of 2^-31, which every fraction of a
value >= 2^-8 is (float32 has 24 significant bits); below that it is low by less than 2^-31.

The bits come from :class:`RandomBits`, a counter-based generator: element ``i`` of a tensor
gets ``fmix32(fmix32(i + k0) ^ k1)`` (MurmurHash3's 32-bit finalizer, a bijection with full
avalanche), the two keys drawn from a ``torch.Generator`` once per call. So the bits of an
element depend only on its flat index and the keys: computing a tensor in chunks, or in one
compiled kernel, gives the same bits, and the draw costs a few integer ops per element instead
of a serial Mersenne-Twister call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.errors import LowbitError
from lowbit.numerics import _native

__all__ = ["ROUNDING_MODES", "RandomBits", "check_rounding", "make_generator", "round_to_integer", "sr_round_up"]

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


def _signed32(value: int) -> int:
    """A 32-bit pattern as the int32 value with the same bits."""
    return value - (1 << 32) if value >= 1 << 31 else value


_FMIX_1, _FMIX_2 = _signed32(0x85EBCA6B), _signed32(0xC2B2AE35)


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finalizer on int32 bit patterns (multiplies wrap mod 2^32; ``>>`` on
    int32 is arithmetic, so the masks make each shift logical)."""
    h = h ^ ((h >> 16) & 0xFFFF)  # a fresh tensor: the rest runs in place
    h.mul_(_FMIX_1)
    h.bitwise_xor_((h >> 13).bitwise_and_(0x7FFFF))
    h.mul_(_FMIX_2)
    return h.bitwise_xor_((h >> 16).bitwise_and_(0xFFFF))


@dataclass(frozen=True)
class RandomBits:
    """31 uniform random bits per element for stochastic rounding (see the module docstring):
    ``keys`` is an int32 tensor (2,) on the tensor's device; ``offset`` is the flat index of the
    first element this view covers (a chunk of a larger tensor)."""

    keys: torch.Tensor
    offset: int = 0

    @classmethod
    def draw(cls, generator: torch.Generator | None, device: torch.device | str) -> RandomBits:
        """Fresh keys from ``generator`` (torch's global generator when None): two int32 draws."""
        gen_device = generator.device if generator is not None else torch.device("cpu")
        keys = torch.randint(-(2**31), 2**31, (2,), generator=generator, device=gen_device, dtype=torch.int32)
        return cls(keys.to(device))

    @classmethod
    def of(
        cls, generator: torch.Generator | RandomBits | None, device: torch.device | str, rounding: str = "sr"
    ) -> RandomBits | None:
        """The bits one rounding call uses: None without SR; ``generator`` itself when it is already
        RandomBits (a chunk continuing a larger tensor's stream); else fresh keys drawn from it."""
        if rounding != "sr":
            return None
        return generator if isinstance(generator, RandomBits) else cls.draw(generator, device)

    def at(self, offset: int) -> RandomBits:
        """The bits of the elements from flat index ``offset`` on."""
        return RandomBits(self.keys, self.offset + int(offset))

    def bits(self, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
        """int32 tensor of ``shape`` holding the bits of elements offset, offset + 1, ... in row-major order."""
        n = 1
        for size in shape:
            n *= size
        native = _native.sr_bits(self.offset, n, self.keys)  # the same bits by a C loop, on CPU
        if native is not None:
            return native.view(shape)
        index = torch.arange(self.offset, self.offset + n, dtype=torch.int64, device=self.keys.device)
        return hash_bits(index.to(torch.int32), self.keys).view(shape)


def hash_bits(index: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """The 31 random bits of the elements at int32 flat indices ``index`` under ``keys``."""
    return _fmix32(_fmix32(index + keys[0]).bitwise_xor_(keys[1])).bitwise_and_(0x7FFFFFFF)


def sr_round_up(frac: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Whether SR rounds up: ``bits < floor(frac * 2^31)`` for float32 ``frac`` in [0, 1) (the
    product is exact, a power-of-two scaling, and below 2^31, so it fits int32)."""
    return bits < torch.floor(frac * 2147483648.0).to(torch.int32)


def round_to_integer(
    y: torch.Tensor, rounding: str = "rne", generator: torch.Generator | RandomBits | None = None
) -> torch.Tensor:
    """Round a non-negative, finite float32 tensor to integer values (still float32).

    ``y`` must be below 2^24 so every integer near it is exact in float32; callers scale
    into that range first. ``generator`` is used by ``sr`` only: a ``torch.Generator`` (fresh
    keys drawn from it; None: torch's global generator) or the :class:`RandomBits` of ``y``.
    """
    if rounding == "rne":
        return torch.round(y)  # torch.round is round-half-to-even
    floor = torch.floor(y)
    frac = y - floor  # exact: floor(y) and y share y's binade or floor is 0
    if rounding == "ta":
        return floor + (frac >= 0.5).to(y.dtype)
    if rounding == "sr":
        return floor + sr_round_up(frac, RandomBits.of(generator, y.device).bits(y.shape)).to(y.dtype)
    raise LowbitError(f"unknown rounding '{rounding}'; valid: {', '.join(ROUNDING_MODES)}")
