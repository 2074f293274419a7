"""Random Hadamard transform (RHT), blockwise along the last dimension.

H_n is the orthonormal Sylvester-Hadamard matrix (entries +-1/sqrt(n), H = H^T, H H^T = I).
The random Hadamard matrix is R = D H with D = diag(s), s in {+-1}^n drawn from a seeded
CPU ``torch.Generator`` (the same signs on every device). The transform maps each length-n
block b of the last dim to b R, i.e. flip signs then Hadamard (as TE's NVFP4 RHT and QuaRot /
Quartet); the inverse is y R^T = (y H) * s. Spreading an outlier over the block shrinks the
block amax, which is why FP4 recipes apply it before quantizing (arXiv 2509.25149 section 4.2).

Two equivalent evaluations: a matmul with R (BLAS; the default) and the fast Walsh-Hadamard
butterfly (log2 n stages of add/sub), exposed as :func:`fwht`; the tests check they agree.
"""

from __future__ import annotations

import functools
import math

import torch

from lowbit.errors import LowbitError

__all__ = ["fwht", "hadamard_matrix", "inverse_rht", "random_hadamard", "random_signs", "rht"]


def _check_size(n: int) -> int:
    if not isinstance(n, int) or n < 1 or n & (n - 1):
        raise LowbitError(f"Hadamard size must be a power of two (16, 32, ..., 256), got {n!r}")
    return n


def hadamard_matrix(
    n: int, *, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> torch.Tensor:
    """Orthonormal Sylvester-Hadamard matrix of size n (a power of two): H_2n = [[H, H], [H, -H]] / sqrt(2)."""
    _check_size(n)
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], dim=1), torch.cat([h, -h], dim=1)], dim=0)
    return (h / math.sqrt(n)).to(dtype=dtype, device=device)


def random_signs(n: int, seed: int, *, device: torch.device | str | None = None) -> torch.Tensor:
    """n random +-1 (float32) from a CPU generator seeded with ``seed`` (device-independent)."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int(seed))
    signs = torch.randint(0, 2, (n,), generator=gen, dtype=torch.int64) * 2 - 1
    return signs.to(dtype=torch.float32, device=device)


def random_hadamard(
    n: int, seed: int = 0, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """R = diag(s) H_n, orthonormal; a row vector b transforms to b @ R."""
    signs = random_signs(n, seed).double()
    return (signs[:, None] * hadamard_matrix(n, dtype=torch.float64)).to(dtype=dtype, device=device)


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal fast Walsh-Hadamard transform of the last dim (a power of two): x @ H_n."""
    n = _check_size(x.shape[-1])
    lead = x.shape[:-1]
    y = x.reshape(-1, n)
    h = 1
    while h < n:
        pairs = y.view(-1, n // (2 * h), 2, h)  # (M, groups, 2, h): the two halves of each group
        a, b = pairs[:, :, 0, :], pairs[:, :, 1, :]
        y = torch.stack((a + b, a - b), dim=2).view(-1, n)
        h *= 2
    return (y * (1.0 / math.sqrt(n))).view(*lead, n)


def _blocks(x: torch.Tensor, size: int) -> torch.Tensor:
    _check_size(size)
    if x.ndim == 0 or x.shape[-1] % size:
        shape = tuple(x.shape)
        raise LowbitError(f"RHT size {size} must divide the last dim of shape {shape}; use a size that divides it")
    return x.reshape(-1, size)


@functools.lru_cache(maxsize=64)
def _shared_random_hadamard(n: int, seed: int, device: torch.device) -> torch.Tensor:
    """``random_hadamard(n, seed)`` on ``device``, built once: quantization applies the same R to
    every operand of every step (building it costs ~40 us). Read only, never handed out."""
    return random_hadamard(n, seed, device=device)


def rht(x: torch.Tensor, size: int, seed: int = 0) -> torch.Tensor:
    """Random Hadamard transform of each length-``size`` block of the last dim (float32 result)."""
    blocks = _blocks(x, size).float()  # (M, size)
    return (blocks @ _shared_random_hadamard(size, int(seed), x.device)).view(x.shape)


def inverse_rht(y: torch.Tensor, size: int, seed: int = 0) -> torch.Tensor:
    """Inverse of :func:`rht` (its transpose): y @ R^T blockwise."""
    blocks = _blocks(y, size).float()
    return (blocks @ _shared_random_hadamard(size, int(seed), y.device).T).view(y.shape)
